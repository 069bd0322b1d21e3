"""The real-model tier: finetune.py on SmolLM2-135M-Instruct (a real pretrained chat model from PyPI, converted by
examples/smollm2.py and shared with the demo), on real data (LLaMA-Factory's alpaca_en_demo.json).

What a random tiny model cannot show, each checked against plain transformers / peft, not against finetune.py's
own code: the masking of the model's own template (with its default system prompt), that a short LoRA run makes
the held-out loss go down, that the saved generation config stops generation at the turn end, that a merged
adapter is the base + adapter, that Q-LoRA runs on CPU, and that full fine-tuning with learning rate 0 changes
no bit and reports the plain forward's loss. One torch thread per process (conftest.ENV)."""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED, read_log_history, run_finetune, write_jsonl
from test_console import warning_lines

# This process's own forward passes: one thread, as the training subprocesses (two threads on two shared cores
# spin-wait on each other and made a few forward passes take minutes).
torch.set_num_threads(1)

ALPACA = SHARED / "data" / "alpaca_en_demo.json"
MAX_LEN = 384  # model_max_length of the runs


def alpaca(rows, max_chars=None):
    """Records `rows` of alpaca_en_demo.json; with max_chars only those of at most that many characters (short
    conversations keep CPU runs short)."""
    with open(ALPACA, encoding="utf-8") as f:
        data = json.load(f)
    picked = [data[i] for i in rows]
    if max_chars:
        picked = [r for r in picked if len(r["instruction"]) + len(r["input"]) + len(r["output"]) <= max_chars]
    return picked


TRAIN = dict(rows=range(0, 100), max_chars=500)      # the LoRA run's training slice
HELD_OUT = dict(rows=range(900, 960), max_chars=500)  # never trained on


def as_messages(record):
    """An alpaca record as the chat a user would send (instruction, then the input if any)."""
    prompt = record["instruction"] + (f"\n{record['input']}" if record["input"] else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def assistant_labels(tokenizer, messages, max_length=None):
    """input_ids and labels of a conversation, by the template alone: each assistant turn's trained tokens are
    those between the prompt that asks for it (add_generation_prompt) and the end of its <|im_end|>."""
    full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    labels = [-100] * len(full)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        assert full[:len(prompt)] == prompt  # the prompt is a token prefix of the whole chat
        stop = full.index(end, len(prompt)) + 1
        labels[len(prompt):stop] = full[len(prompt):stop]
    if max_length:
        full, labels = full[:max_length], labels[:max_length]
    return full, labels


def assistant_loss(model, tokenizer, chats, max_length=None):
    """Mean next-token cross-entropy over all assistant tokens of `chats` (one plain forward per chat)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in chats:
            ids, labels = assistant_labels(tokenizer, messages, max_length)
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            target = torch.tensor(labels[1:])
            keep = target != -100
            total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
            count += int(keep.sum())
    return total / count


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


def load_adapter(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base), adapter).eval()


def safetensors_of(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# a. masking with the model's own template
# ---------------------------------------------------------------------------------------------

def test_show_masking_marks_each_answer_and_its_turn_end(smollm2, tmp_path):
    """--show_masking on SmolLM2's own template (it inserts a default system prompt when a chat has none): the
    marked text is exactly each assistant answer followed by <|im_end|>, in order, and nothing else; the default
    system prompt, the user turns and the `<|im_start|>assistant` openers are untrained."""
    from transformers import AutoTokenizer

    chats = [as_messages(r) for r in alpaca(range(1, 4))]
    chats.append([{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "And another one, in French?"},
                  {"role": "assistant", "content": "Rouge — red.\nIt is a primary colour."}])
    chats.append([{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Sky colour?"},
                  {"role": "assistant", "content": " Blue "}])
    data = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in chats])
    out = run_finetune(["--model_name_or_path", smollm2, "--data_path", data, "--output_dir", tmp_path / "out",
                        "--show_masking", len(chats), "--model_max_length", 2048,
                        "--dataset_cache_dir", tmp_path / "cache"]).stdout
    default_system = AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False).split("<|im_end|>")[0]
    assert "SmolLM" in default_system  # the template's own default system prompt
    samples = out.split("----- sample ")[1:]
    assert len(samples) == len(chats), out
    for chat, sample in zip(chats, samples):
        text = sample.split("-----\n", 1)[1]
        marked = re.findall(r"\[\[(.*?)\]\]", text, flags=re.S)
        assert marked == [m["content"] + "<|im_end|>" for m in chat if m["role"] == "assistant"], sample
        untrained = re.sub(r"\[\[.*?\]\]", "", text, flags=re.S)
        if chat[0]["role"] != "system":
            assert default_system in untrained, sample
        assert untrained.count("<|im_start|>assistant") == len(marked), sample


# ---------------------------------------------------------------------------------------------
# b, c, d. one short LoRA run on real data
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(smollm2, tmp_path_factory):
    """LoRA (finetune.py's defaults: all linear layers) on 43 short alpaca conversations, 1 epoch, batch 4, lr 1e-3:
    held-out loss 1.470 -> 1.415 (test_lora_lowers_the_held_out_loss; 2 epochs at lr 5e-4 gave 1.426, in 1.6x the time).
    -> {"out": adapter folder, "merged": merge_lora.py's output (its console: no warning)}."""
    import subprocess
    import sys

    from conftest import ENV

    tmp = tmp_path_factory.mktemp("real-lora")
    out = tmp / "out"
    run_finetune(["--model_name_or_path", smollm2, "--data_path", write_jsonl(
        tmp / "train.jsonl", [{"messages": as_messages(r)} for r in alpaca(**TRAIN)]), "--output_dir", out,
        "--use_lora", "True", "--learning_rate", 1e-3, "--num_train_epochs", 1, "--per_device_train_batch_size", 4,
        "--model_max_length", MAX_LEN, "--save_strategy", "no", "--logging_steps", 4, "--report_to", "none",
        "--disable_tqdm", "True", "--lr_scheduler_type", "constant", "--dataset_cache_dir", tmp / "cache"])
    merged = tmp / "merged"
    env = {k: v for k, v in ENV.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}  # the console a user sees
    proc = subprocess.run([sys.executable, str(ROOT / "merge_lora.py"), "--base", smollm2, "--adapter", str(out),
                           "--output", str(merged), "--dtype", "fp32"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout
    assert warning_lines(proc.stdout) == [], proc.stdout
    return {"out": out, "merged": merged}


def test_lora_lowers_the_held_out_loss(smollm2, lora_run):
    """The assistant-token loss on 25 held-out alpaca conversations, computed with plain transformers + peft,
    is lower with the adapter than without it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    held_out = [as_messages(r) for r in alpaca(**HELD_OUT)]
    before = assistant_loss(load_model(smollm2), tokenizer, held_out, MAX_LEN)
    after = assistant_loss(load_adapter(smollm2, lora_run["out"]), tokenizer, held_out, MAX_LEN)
    losses = [e["loss"] for e in read_log_history(lora_run["out"]) if "loss" in e]  # for the message
    assert after < before - 0.02, (before, after, losses)


def test_saved_generation_config_stops_at_the_turn_end(smollm2, lora_run):
    """model.generate with only the run's saved generation_config.json (greedy, no stop list of ours) ends each
    answer by itself with <|im_end|>, well before max_new_tokens."""
    from transformers import AutoTokenizer, GenerationConfig

    out = lora_run["out"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = GenerationConfig.from_pretrained(out)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    assert eos == [end] and tokenizer.eos_token == "<|im_end|>", (config, tokenizer.eos_token)
    model = load_adapter(smollm2, out)
    budget = 160
    for question in ["What is the capital of France?", "Name three primary colors.", "Give a synonym of happy."]:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        config.update(do_sample=False, max_new_tokens=budget, temperature=None, top_p=None, top_k=None)
        new = model.generate(**ids, generation_config=config)[0, ids["input_ids"].shape[1]:].tolist()
        assert new[-1] == end and end not in new[:-1] and len(new) < budget, (question, tokenizer.decode(new))


def test_merged_model_is_base_plus_adapter(smollm2, lora_run):
    """merge_lora.py's folder loads with plain transformers (no peft) as an ordinary LlamaForCausalLM, with the
    tokenizer and generation config, and its logits equal base + adapter through peft."""
    from transformers import AutoTokenizer, GenerationConfig

    merged = lora_run["merged"]
    assert not (merged / "adapter_config.json").exists()
    plain = load_model(merged)
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config.tie_word_embeddings
    peft_model = load_adapter(smollm2, lora_run["out"])
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert GenerationConfig.from_pretrained(merged).eos_token_id in (
        tokenizer.convert_tokens_to_ids("<|im_end|>"), [tokenizer.convert_tokens_to_ids("<|im_end|>")])
    base = load_model(smollm2)
    with torch.no_grad():
        for messages in [as_messages(r) for r in alpaca(**HELD_OUT)[:3]]:
            ids = torch.tensor([assistant_labels(tokenizer, messages, MAX_LEN)[0]])
            want, got = peft_model(input_ids=ids).logits, plain(input_ids=ids).logits
            assert (want - got).abs().max().item() < 1e-3
            assert (base(input_ids=ids).logits - got).abs().max().item() > 0.1  # the adapter did change it


# ---------------------------------------------------------------------------------------------
# e. Q-LoRA on CPU
# ---------------------------------------------------------------------------------------------

def test_q_lora_trains_on_cpu_and_its_adapter_loads(smollm2, tmp_path):
    """--q_lora (4-bit NF4 base through bitsandbytes' CPU kernels): a few optimizer steps with finite, logged
    losses, then the adapter loads onto the full-precision base with plain peft and changes its logits."""
    out = tmp_path / "out"
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": as_messages(r)} for r in alpaca(range(40, 52))])
    run_finetune(["--model_name_or_path", smollm2, "--data_path", data, "--output_dir", out, "--q_lora", "True",
                  "--learning_rate", 1e-3, "--max_steps", 3, "--per_device_train_batch_size", 2,
                  "--model_max_length", 256, "--save_strategy", "no", "--logging_steps", 1, "--report_to", "none",
                  "--disable_tqdm", "True", "--dataset_cache_dir", tmp_path / "cache"])
    losses = [e["loss"] for e in read_log_history(out) if "loss" in e]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses), losses
    model = load_adapter(smollm2, out)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - load_model(smollm2)(input_ids=ids).logits).abs().max() > 0


# ---------------------------------------------------------------------------------------------
# f. full fine-tuning with learning rate 0
# ---------------------------------------------------------------------------------------------

def test_full_fine_tuning_with_lr_0_is_exact(smollm2, tmp_path):
    """Full fine-tuning, one optimizer step over 6 conversations (two micro-batches of 3, one of them padded)
    with --learning_rate 0: the saved model.safetensors holds the base's tensors bit for bit, and train_loss
    equals the mean cross-entropy of a plain forward pass over the assistant tokens."""
    from transformers import AutoTokenizer

    chats = [as_messages(r) for r in alpaca(range(60, 66))]
    out = tmp_path / "out"
    run_finetune(["--model_name_or_path", smollm2, "--data_path", write_jsonl(
        tmp_path / "train.jsonl", [{"messages": c} for c in chats]), "--output_dir", out, "--learning_rate", 0,
        "--num_train_epochs", 1, "--per_device_train_batch_size", 3, "--gradient_accumulation_steps", 2,
        "--model_max_length", 2048, "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
        "--warmup_steps", 0, "--dataset_cache_dir", tmp_path / "cache"])
    base, saved = safetensors_of(smollm2), safetensors_of(out)
    assert sorted(base) == sorted(saved)
    changed = [k for k in base if base[k].dtype != saved[k].dtype or not torch.equal(base[k], saved[k])]
    assert changed == [], changed
    with open(out / "train_results.json") as f:
        train_loss = json.load(f)["train_loss"]
    expected = assistant_loss(load_model(smollm2), AutoTokenizer.from_pretrained(smollm2), chats)
    assert train_loss == pytest.approx(expected, rel=1e-5), (train_loss, expected)


# ---------------------------------------------------------------------------------------------
# g. tool calling with the built-in chatml (finetune_template.CHATML_TEMPLATE), on glaive_toolcall_en_demo
# ---------------------------------------------------------------------------------------------

GLAIVE = SHARED / "data" / "glaive_toolcall_en_demo.json"


def glaive_requests():
    """glaive's conversations that call a function, each cut after its first call (sharegpt records, the
    request's history kept): [(index in the file, record)]."""
    with open(GLAIVE, encoding="utf-8") as f:
        data = json.load(f)
    out = []
    for k, r in enumerate(data):
        turns = r["conversations"]
        j = next((i for i, t in enumerate(turns) if t["from"] == "function_call"), None)
        if j is not None:
            out.append((k, {**r, "conversations": turns[:j + 1]}))
    return out


def test_lora_on_glaive_with_builtin_chatml_makes_parseable_tool_calls(smollm2, tmp_path):
    """SmolLM2's own template has no tools; with --chat_template chatml, 8 LoRA steps of 4 samples (glaive's 66
    one-turn tool requests before record 200: a request and its call) make the model answer held-out requests
    (records 200 and later, never trained) with a <tool_call> whose JSON parses and names the right function,
    through chat.py with the run's saved chat_template.jinja and the record's tools (what --tools gives). The base
    model, prompted the same way, answers in prose. About 2.5 min on one thread (5 steps were enough when measured;
    12 cost 3.5 min)."""
    from chat import generate, load
    from finetune_data import normalize_record

    requests = glaive_requests()
    train = [r for k, r in requests if k < 200 and len(r["conversations"]) == 2]  # short: a quick run
    held_out = [normalize_record(r, "sharegpt") for k, r in requests if k >= 200][:2]
    out = tmp_path / "out"
    run_finetune(["--model_name_or_path", smollm2, "--data_path", write_jsonl(tmp_path / "tools.jsonl", train),
                  "--chat_template", "chatml", "--output_dir", out, "--use_lora", "True", "--learning_rate", 2e-3,
                  "--max_steps", 8, "--per_device_train_batch_size", 4, "--model_max_length", 512,
                  "--save_strategy", "no", "--logging_steps", 4, "--report_to", "none", "--disable_tqdm", "True",
                  "--lr_scheduler_type", "constant", "--dataset_cache_dir", tmp_path / "cache"])
    assert "<tool_call>" in (out / "chat_template.jinja").read_text()
    model, tokenizer = load(str(out), dtype="fp32", device="cpu")
    for messages, tools in held_out:
        call = messages[-1]["tool_calls"][0]["function"]
        reply = generate(model, tokenizer, messages[:-1], max_new_tokens=80, tools=tools)
        found = re.search(r"<tool_call>\s*(\{.*\})\s*</tool_call>", reply, flags=re.S)
        assert found, reply
        assert json.loads(found.group(1))["name"] == call["name"], reply
