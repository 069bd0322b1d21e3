"""Base models become chat models that stop (docs/training.md: Base models).

A tiny random model sized to a real base tokenizer that has no chat template (gpt-2: GPT-2 with tied embeddings;
llama-spm: Llama with an untied head), so it gets the built-in ChatML, whose <|im_start|> and <|im_end|> are 5-7
pieces in those vocabularies. It is fine-tuned, full and LoRA (then merged), on a few conversations; the output is
loaded as any user or engine loads it (AutoModelForCausalLM, AutoTokenizer, nothing of finetune), and greedy
generate with the saved generation config must answer and stop by itself at the turn end. Also: the turn end is
one token of the saved tokenizer, the vocabulary sizes agree, the new rows start as the mean, LoRA trains only the
new rows and saves only them, padding keeps a trained turn end when the pad token is the eos, every run writes
the template's turn end into config.json and generation_config.json."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

import finetune
from conftest import ENV, ROOT, SHARED, run_finetune, write_jsonl
from finetune import tokenize_conversation

torch.set_num_threads(1)  # the numerics of the single-threaded subprocesses (greedy decoding ties)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "Four."}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."}],
]
# (prompt, answer) for every assistant turn
TURNS = [(chat[:i], m["content"]) for chat in CHATS for i, m in enumerate(chat) if m["role"] == "assistant"]
MARKERS = ["<|im_start|>", "<|im_end|>"]


def make_base_model(name, out):
    """A tiny random model with the real tokenizer `name` (its files as they are: no chat template). The weights
    are initialised at 0.2 (not 0.02): a random head that small cannot make any one token likely, so a LoRA on a
    frozen random model could not learn the answers; a pretrained head can."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SHARED / "tokenizers" / name / f, out / f)
    tok = AutoTokenizer.from_pretrained(out)
    assert not tok.chat_template and all(len(tok.encode(m, add_special_tokens=False)) > 1 for m in MARKERS)
    torch.manual_seed(0)
    common = {"vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
              "initializer_range": 0.2}
    if name == "gpt-2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                             tie_word_embeddings=False, **common))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    return {name: make_base_model(name, d / name) for name in ("gpt-2", "llama-spm")}


def run_script(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module", params=[("gpt-2", "full"), ("gpt-2", "lora"), ("llama-spm", "full"),
                                        ("llama-spm", "lora")], ids=lambda p: "-".join(p))
def trained(request, bases, tmp_path_factory):
    """A short training run on the base model; LoRA adapters merged. -> dict(base, out, model: the folder to load)."""
    name, method = request.param
    d = tmp_path_factory.mktemp(f"{name}-{method}")
    data = write_jsonl(d / "chats.jsonl", [{"messages": c} for c in CHATS])
    args = ["--model_name_or_path", bases[name], "--data_path", data, "--output_dir", d / "out",
            "--dataset_cache_dir", d / "cache", "--per_device_train_batch_size", "4", "--lr_scheduler_type",
            "constant", "--logging_steps", "10", "--save_strategy", "no", "--seed", "0", "--max_steps", "40"]
    if name == "llama-spm":
        args += ["--chat_template", "chatml"]  # by name; gpt-2 gets it as the default of a template-less tokenizer
    if method == "full":
        args += ["--learning_rate", "5e-3"]
    else:
        args += ["--use_lora", "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0", "--learning_rate", "1e-2",
                 "--lora_target_modules", "all-linear"]
    log = run_finetune(args).stdout
    run = {"name": name, "method": method, "base": bases[name], "out": d / "out", "model": d / "out", "log": log}
    if method == "lora":
        run["model"] = d / "merged"
        run_script("merge_lora.py", "--adapter", d / "out", "--output", d / "merged")
    return run


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_answers_stop_by_themselves(trained):
    """Greedy generate with nothing but the saved files (no eos_token_id passed): every answer, then the turn end."""
    model, tok = load(trained["model"])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for prompt, answer in TURNS:
        enc = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        case = (trained["name"], trained["method"], tok.decode(new))
        assert new[-1] == end and len(new) < 24, case
        assert tok.decode(new, skip_special_tokens=True) == answer, case


def test_turn_end_is_one_token_and_the_eos(trained):
    from transformers import AutoTokenizer

    base_tok = AutoTokenizer.from_pretrained(trained["base"])
    for folder in {trained["out"], trained["model"]}:
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok.eos_token == "<|im_end|>" and tok.chat_template
        assert tok.pad_token is not None
        for m in MARKERS:
            assert len(tok.encode(m, add_special_tokens=False)) == 1, (folder, m)
        assert len(tok) == len(base_tok) + 2
        assert tok.encode("Hello there!", add_special_tokens=False) == base_tok.encode("Hello there!",
                                                                                        add_special_tokens=False)
        gen = json.loads((folder / "generation_config.json").read_text())
        ends = gen["eos_token_id"]  # the turn end first, then the base model's own eos
        assert ends == [tok.convert_tokens_to_ids("<|im_end|>"), base_tok.eos_token_id], (folder, ends)
    config = json.loads((trained["model"] / "config.json").read_text())
    assert config["eos_token_id"] == ends
    log = trained["log"]
    assert "added special tokens <|im_end|> <|im_start|>" in log and "turn end <|im_end|>, now the eos" in log
    assert "WARNING" not in log and "differ from the model config" not in log  # Trainer has nothing to re-align
    report = json.loads((trained["out"] / "data_report.json").read_text())
    assert report["vocabulary"]["turn_end_tokens"] == ["<|im_end|>"]
    assert report["vocabulary"]["added_tokens"] == ["<|im_end|>", "<|im_start|>"]


def test_vocabulary_sizes_agree(trained):
    from transformers import AutoConfig

    model, tok = load(trained["model"])
    rows = model.get_input_embeddings().weight.shape[0]
    base_rows = AutoConfig.from_pretrained(trained["base"]).vocab_size
    assert rows == model.get_output_embeddings().weight.shape[0] == model.config.vocab_size
    assert rows % 64 == 0 and len(tok) <= rows < len(tok) + 64 and rows > base_rows
    assert model.config.tie_word_embeddings == (trained["name"] == "gpt-2")
    if trained["method"] == "lora":  # the adapter holds the new rows only, never a copy of the embeddings
        from safetensors import safe_open

        with safe_open(str(trained["out"] / "adapter_model.safetensors"), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        token_rows = {k: s for k, s in shapes.items() if "trainable_tokens" in k}
        assert token_rows and all(s[0] == 2 for s in token_rows.values()), shapes
        assert len(token_rows) == (1 if trained["name"] == "gpt-2" else 2)  # a tied head follows its embeddings
        assert all(max(s) < base_rows for k, s in shapes.items() if k not in token_rows), shapes


def test_chat_py_answers_from_the_output_dir(trained):
    """chat.py on the output folder (an adapter: on the base, its vocabulary grown as in training) answers and
    stops at the turn end."""
    out = run_script("chat.py", "--model", trained["out"], "--prompt", "Name a color.", "--max_new_tokens", "24")
    assert out.stdout.strip() == "Blue.", out.stdout


def test_new_rows_start_as_the_mean_and_lora_trains_only_them(bases, tmp_path):
    """load_tokenizer + load_model as train() calls them, without training: the new rows of the embeddings and of
    an untied head are the mean of the base's rows; with LoRA exactly those rows are trainable (and no other row
    of the embeddings or head)."""
    from transformers import AutoModelForCausalLM

    for name, base in bases.items():
        args = finetune.parse_args(["--model_name_or_path", str(base), "--data_path", "x.jsonl", "--output_dir",
                                    str(tmp_path / name), "--lora_target_modules", "all-linear"])
        model_args, _, training_args, lora_args = args
        tok = finetune.load_tokenizer(model_args, training_args)
        new = tok.convert_tokens_to_ids(MARKERS)
        reference = AutoModelForCausalLM.from_pretrained(base)
        model = finetune.load_model(model_args, training_args, lora_args, "sdpa", tok)
        n = reference.get_input_embeddings().weight.shape[0]
        assert sorted(new) == [n, n + 1]
        for ref, got in ((reference.get_input_embeddings(), model.get_input_embeddings()),
                         (reference.get_output_embeddings(), model.get_output_embeddings())):
            assert torch.equal(got.weight[:n], ref.weight)
            assert torch.allclose(got.weight[n:], ref.weight.mean(0).expand(got.weight.shape[0] - n, -1), atol=1e-6)
        training_args.use_lora = True
        lora = finetune.load_model(model_args, training_args, lora_args, "sdpa", tok)
        trainable = {k: p.shape for k, p in lora.named_parameters() if p.requires_grad}
        rows = {k: s for k, s in trainable.items() if "trainable_tokens" in k}
        assert all(s[0] == 2 for s in rows.values()) and len(rows) == (1 if name == "gpt-2" else 2), trainable
        assert all("lora_" in k for k in set(trainable) - set(rows)), trainable
        x = torch.tensor([[5, new[0], 7, new[1]]])
        with torch.no_grad():
            assert torch.allclose(lora(x).logits, model(x).logits, atol=1e-5)  # LoRA starts as the model


def test_padding_keeps_the_turn_end_when_pad_is_eos(bases, tmp_path):
    """gpt-2 has no pad token: it pads with the eos, which is now the turn end. Padded batches (and packed ones)
    keep every trained turn end in the labels; only padding positions are ignored."""
    args = finetune.parse_args(["--model_name_or_path", str(bases["gpt-2"]), "--data_path", "x.jsonl",
                                "--output_dir", str(tmp_path)])
    tok = finetune.load_tokenizer(args[0], args[2])
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id == end
    rows = finetune.tokenize_many(tok, [(c, None) for c in CHATS], 1000)
    n_ends = sum(len([m for m in c if m["role"] == "assistant"]) for c in CHATS)
    assert sum(r["labels"].count(end) for r in rows) == n_ends
    for collator in (finetune.PaddingCollator(tok.pad_token_id, 8), finetune.PackingCollator(pad_token_id=end,
                                                                                          pad_to_multiple_of=8)):
        batch = collator(rows)
        assert int((batch["labels"] == end).sum()) == n_ends, type(collator).__name__
        assert (batch["input_ids"] == end).sum() > n_ends  # there is padding, and it is the same token


def test_every_run_writes_the_turn_end_into_the_configs(tiny_model, tmp_path):
    """Not only base models: the tiny chat model's tokenizer with a template whose turn end (<end_of_turn>) is not
    its eos (<|im_end|>): after training, config.json, generation_config.json and the tokenizer make it an eos,
    with the model's own; --show_masking names it."""
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in CHATS if c[0]["role"] != "system"])
    common = ["--model_name_or_path", tiny_model, "--data_path", data, "--dataset_cache_dir", tmp_path / "cache",
              "--chat_template", SHARED / "templates" / "google-gemma-2-2b-it.jinja"]
    shown = run_finetune(common + ["--output_dir", tmp_path / "show", "--show_masking", "1"]).stdout
    assert "turn end: <end_of_turn>; eos <end_of_turn>" in shown
    assert "[[Paris.<end_of_turn>]]" in shown, shown
    run_finetune(common + ["--output_dir", tmp_path / "out", "--max_steps", "1", "--save_strategy", "no"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    ids = [tok.convert_tokens_to_ids(t) for t in ("<end_of_turn>", "<|im_end|>")]
    assert tok.eos_token == "<end_of_turn>"
    for f in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "out" / f).read_text())["eos_token_id"] == ids, f


def test_unknown_template_name_is_refused_before_loading(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--chat_template chatml2: no such file, and not a built-in "
                                                r"template \(chatml\)"):
        finetune.train(["--model_name_or_path", tiny_model, "--data_path", str(ROOT / "examples" / "demo_data.jsonl"),
                        "--output_dir", str(tmp_path / "out"), "--chat_template", "chatml2"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("real", ["gpt-2", "llama-spm"])
def test_every_shared_template_on_a_base_vocabulary(real):
    """Each shared template set on a real base tokenizer that has none of its markers: prepare_tokenizer (what
    load_tokenizer calls) adds exactly the markers that were several tokens; then every marker is one token, the
    template has turn end tokens, the eos is one of them, and every trained turn ends with one of them."""
    import copy

    from finetune_template import turn_markers
    from finetune_tokens import _split_markers, prepare_tokenizer
    from test_masking import FAMILY, TEMPLATES, spans
    from test_masking_real import TOOLS, real_tokenizer

    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye now."}]
    for name in sorted(FAMILY):
        tok = copy.deepcopy(real_tokenizer(real))
        tok.chat_template = (TEMPLATES / name).read_text(encoding="utf-8")
        split = _split_markers(tok, turn_markers(tok))
        prepare_tokenizer(tok, name)
        v = tok.finetune_vocabulary
        assert v["added_tokens"] == split and not _split_markers(tok, turn_markers(tok)), (name, v)
        assert v["turn_end_tokens"] and tok.eos_token in v["turn_end_tokens"], (name, v)
        assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in v["turn_end_tokens"]), (name, v)
        out = tokenize_conversation(tok, chat, 10000, tools=TOOLS if "Hermes" in name else None)
        ends = set(tok.convert_tokens_to_ids(v["turn_end_tokens"]))
        labels = out["labels"] + [finetune.IGNORE_INDEX]
        last = [lab for lab, after in zip(labels, labels[1:]) if lab != finetune.IGNORE_INDEX == after]
        assert len(last) == 2 and set(last) <= ends, (name, spans(out, tok))  # each turn's last trained token
