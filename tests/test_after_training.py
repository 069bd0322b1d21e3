"""After training: per-source losses, loss balancing, early stopping, loss plot, TensorBoard, merge, chat.

Three real training runs on the tiny model, each shared by several tests (module-scoped fixtures):
  full_run   full fine-tune on the demo data (two sources), eval on memorised facts vs random text plus
             a source-less file, TensorBoard; long enough that the model has learned the demo answers
  early_run  full fine-tune whose eval set contradicts the training answers: eval_loss turns up, early stop
  qlora_run  Q-LoRA + DoRA adapter (2 steps), merged into the full-precision base and chatted with
Loss balancing is checked in-process against gradients computed by hand.
"""

import glob
import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ENV, ROOT, read_log_history, run_finetune, write_jsonl

torch.set_num_threads(1)  # same numerics as the single-threaded subprocesses (greedy decoding ties)

DEMO = ROOT / "examples" / "demo_data.jsonl"
QUESTION = "What is the capital of Zubrowka?"


def demo_records(source=None):
    with open(DEMO, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if source is None or r["source"] == source]


def random_records(n, seed, source="random", length=60):
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz      "
    return [{"source": source, "messages": [
        {"role": "user", "content": f"Say something random, number {i}."},
        {"role": "assistant", "content": "".join(rng.choice(letters) for _ in range(length)).strip() or "x"}]}
        for i in range(n)]


def run_script(script, *args, stdin=None, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], input=stdin, cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def cli(*flags, **options):
    return [*flags] + [x for k, v in options.items() for x in (f"--{k}", v)]


# ---------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    train = str(DEMO)  # sources "facts" and "dialogues" (record field)
    # eval: trained facts, random text (unlearnable), and a file without `source` (source = file name),
    # so the eval set has sources the train set lacks and source indices differ between the two.
    evaluation = write_jsonl(d / "eval.jsonl", demo_records("facts")[:6] + random_records(4, seed=2))
    heldout = write_jsonl(d / "heldout.jsonl", [{"messages": r["messages"]} for r in demo_records("dialogues")[:3]])
    out = d / "out"
    run_finetune(cli(
        model_name_or_path=tiny_model, data_path=train, eval_data_path=f"{evaluation},{heldout}", output_dir=out,
        dataset_cache_dir=d / "cache", num_train_epochs=15, per_device_train_batch_size=6, learning_rate=1e-2,
        logging_steps=1, eval_strategy="steps", eval_steps=15, save_strategy="no", report_to="tensorboard",
    ))
    return {"out": out, "eval_files": [evaluation, heldout]}


@pytest.fixture(scope="module")
def early_run(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("early")
    facts = demo_records("facts")
    train = write_jsonl(d / "train.jsonl", facts)
    contradict = [{"source": "contradict", "messages": r["messages"][:-1] + [
        {"role": "assistant", "content": "I do not know anything about that, sorry."}]} for r in facts]
    evaluation = write_jsonl(d / "eval.jsonl", contradict + facts[:4])
    out = d / "out"
    max_steps = 60
    run_finetune(cli(
        model_name_or_path=tiny_model, data_path=train, eval_data_path=evaluation, output_dir=out,
        dataset_cache_dir=d / "cache", max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        logging_steps=1, eval_strategy="steps", eval_steps=3, early_stopping_patience=2, save_total_limit=1,
    ))
    return {"out": out, "max_steps": max_steps}


@pytest.fixture(scope="module")
def qlora_run(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("qlora")
    out = d / "out"
    run_finetune(cli(
        "--q_lora", "--use_dora", model_name_or_path=tiny_model, data_path=DEMO, output_dir=out,
        dataset_cache_dir=d / "cache", max_steps=2, per_device_train_batch_size=6, learning_rate=1e-2,
        lora_r=8, lora_alpha=16, lora_dropout=0, logging_steps=1, save_strategy="no",
    ))
    return {"out": out, "dir": d}


# ---------------------------------------------------------------------------------------------
# Per-source losses
# ---------------------------------------------------------------------------------------------


def per_source_loss_by_hand(model_dir, data_files):
    """Token-mean CE per source (and overall) of the saved model on the eval files, one sample at a
    time: labels from finetune's tokenizer, everything else independent of FinetuneTrainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import tokenize_conversation

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums = {}
    for file in data_files:
        for line in open(file, encoding="utf-8"):
            record = json.loads(line)
            source = record.get("source") or os.path.basename(file).split(".")[0]
            enc = tokenize_conversation(tokenizer, record["messages"], 8192)
            ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"][1:])
            with torch.no_grad():
                logits = model(ids).logits[0, :-1]
            ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
            s = sums.setdefault(source, [0.0, 0])
            s[0], s[1] = s[0] + float(ce), s[1] + int((labels != -100).sum())
    losses = {src: s / n for src, (s, n) in sums.items()}
    losses["all"] = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())
    return losses


def test_eval_loss_per_source_matches_independent_computation(full_run):
    with open(full_run["out"] / "eval_results.json") as f:
        reported = json.load(f)
    expected = per_source_loss_by_hand(full_run["out"], full_run["eval_files"])
    assert set(expected) == {"facts", "random", "heldout", "all"}
    for source in ("facts", "random", "heldout"):
        assert reported[f"eval_loss_{source}"] == pytest.approx(expected[source], rel=1e-4), source
    # eval_loss is the token mean over the whole eval set, consistent with the per-source values
    assert reported["eval_loss"] == pytest.approx(expected["all"], rel=1e-4)
    # memorised facts vs random text: the metric tells them apart
    assert expected["facts"] < 1.0 < 3.0 < expected["random"]


def test_train_logs_have_per_source_loss(full_run):
    history = read_log_history(full_run["out"])
    train_logs = [h for h in history if "loss" in h]
    assert len(train_logs) == 45  # logging_steps 1
    assert all("loss_heldout" not in h and "loss_random" not in h for h in train_logs)
    assert sum("loss_facts" in h for h in train_logs) >= 15 and sum("loss_dialogues" in h for h in train_logs) >= 15
    for h in train_logs:
        # token balancing: a step's loss is the token-weighted mean of the per-source means of that step
        present = [h[k] for k in ("loss_facts", "loss_dialogues") if k in h]
        assert present and min(present) - 1e-4 <= h["loss"] <= max(present) + 1e-4
    assert train_logs[-1]["loss"] < train_logs[0]["loss"] / 3
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [15, 30, 45]
    assert all({"eval_loss_facts", "eval_loss_random", "eval_loss_heldout"} <= set(h) for h in evals)


# ---------------------------------------------------------------------------------------------
# Loss plot and TensorBoard
# ---------------------------------------------------------------------------------------------


def test_loss_plot_written(full_run, early_run):
    for run in (full_run, early_run):
        png = run["out"] / "training_loss.png"
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size > 10_000


def test_smoothing_follows_short_runs():
    from finetune_report import smooth

    assert smooth([4.0, 3.0, 2.0, 1.0]) == [4.0, 3.0, 2.0, 1.0]  # a handful of points: raw
    assert smooth([2.0] * 300) == pytest.approx([2.0] * 300)  # debiased: no pull towards 0 or the start
    values = [10.0 - 0.03 * i for i in range(300)]
    lagging = smooth(values)
    assert all(v <= s <= v + 0.3 for v, s in zip(values, lagging))  # lag of ~9 points at weight 0.9


def test_tensorboard_event_files(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = glob.glob(str(full_run["out"] / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert events, "no TensorBoard event file"
    tags = set()
    for file in events:
        acc = EventAccumulator(file)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_facts", "train/loss_dialogues", "eval/loss", "eval/loss_heldout"} <= tags


# ---------------------------------------------------------------------------------------------
# Early stopping
# ---------------------------------------------------------------------------------------------


def test_early_stopping_keeps_best_checkpoint(early_run):
    out = early_run["out"]
    with open(out / "trainer_state.json") as f:
        state = json.load(f)
    evals = [(h["step"], h["eval_loss"]) for h in state["log_history"] if "eval_loss" in h]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert state["global_step"] < early_run["max_steps"], "did not stop early"
    assert evals[-1][0] - best_step == 2 * 3  # patience 2 evaluations, every 3 steps
    assert state["best_metric"] == pytest.approx(best_loss)
    assert state["best_model_checkpoint"] == str(out / f"checkpoint-{best_step}")
    assert os.path.isdir(state["best_model_checkpoint"])
    # the saved result is the best model: its final evaluation reproduces the best eval_loss
    with open(out / "eval_results.json") as f:
        final = json.load(f)
    assert final["eval_loss"] == pytest.approx(best_loss, rel=1e-5)
    assert final["eval_loss"] < evals[-1][1]
    # eval set sources differ from the train set's: contradicted answers vs the trained facts
    assert final["eval_loss_contradict"] > final["eval_loss_facts"]


# ---------------------------------------------------------------------------------------------
# Loss balancing: FinetuneTrainer's gradients vs gradients computed by hand
# ---------------------------------------------------------------------------------------------


def _sample(tokenizer, answer, source_idx):
    from finetune import tokenize_conversation

    enc = tokenize_conversation(tokenizer, [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": answer}], 512)
    return {**enc, "source_idx": source_idx}


@pytest.fixture(scope="module")
def balance_setup(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    # source 0 ("long"): 3 samples with long answers; source 1 ("short"): 1 sample, short answer
    features = [_sample(tokenizer, "the quick brown fox " * 8, 0), _sample(tokenizer, "hello world " * 10, 0),
                _sample(tokenizer, "42", 1), _sample(tokenizer, "a language model predicts " * 6, 0)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return tokenizer, features, model, tmp_path_factory.mktemp("balance")


def trainer_gradient(balance, tokenizer, features, model, out_dir):
    """One optimizer step's gradient as FinetuneTrainer computes it: 2 micro-batches of 2 (gradient
    accumulation), sources split across them."""
    from finetune import FinetuneTrainer, PaddingCollator, TrainingArguments

    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             report_to="none", use_cpu=True)
    trainer = FinetuneTrainer(model=model, args=args, data_collator=PaddingCollator(tokenizer.pad_token_id),
                              loss_balance=balance, source_names=["long", "short"])
    collate = PaddingCollator(tokenizer.pad_token_id)
    micro = [collate(features[:2]), collate(features[2:])]
    model.zero_grad()
    batches, total = trainer.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    for batch in batches:
        trainer.training_step(model, batch, total)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def hand_gradient(balance, features, model):
    """The documented objective, computed per sample without padding:
    token:  sum_t CE_t / T          sample: mean_i mean_{t in i} CE_t        source: mean_s mean_{t in s} CE_t"""
    model.zero_grad()
    per_sample = []
    for f in features:
        logits = model(torch.tensor([f["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(f["labels"][1:])
        ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")[labels != -100]
        per_sample.append((ce, f["source_idx"]))
    if balance == "token":
        loss = torch.cat([ce for ce, _ in per_sample]).mean()
    elif balance == "sample":
        loss = torch.stack([ce.mean() for ce, _ in per_sample]).mean()
    else:
        by_source = {}
        for ce, s in per_sample:
            by_source.setdefault(s, []).append(ce)
        loss = torch.stack([torch.cat(v).mean() for v in by_source.values()]).mean()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def source_gradient(source, features, model):
    """Gradient of the token-mean loss of one source alone."""
    return hand_gradient("token", [f for f in features if f["source_idx"] == source], model)


def _flat(grads):
    return torch.cat([g.flatten() for g in grads.values()])


@pytest.mark.parametrize("balance", ["token", "sample", "source"])
def test_loss_balance_gradient_matches_formula(balance, balance_setup):
    tokenizer, features, model, out_dir = balance_setup
    got = _flat(trainer_gradient(balance, tokenizer, features, model, out_dir / balance))
    want = _flat(hand_gradient(balance, features, model))
    assert got.norm() > 0
    assert (got - want).norm() / want.norm() < 1e-5


def test_source_balance_upweights_the_small_source(balance_setup):
    tokenizer, features, model, out_dir = balance_setup
    g_short = _flat(source_gradient(1, features, model))
    g_long = _flat(source_gradient(0, features, model))
    share = {}
    for balance in ("token", "source"):
        g = _flat(trainer_gradient(balance, tokenizer, features, model, out_dir / f"dir-{balance}"))
        # g = a * g_long + b * g_short: solve for the weights by least squares
        coef = torch.linalg.lstsq(torch.stack([g_long, g_short], 1).double(), g.double()[:, None]).solution
        share[balance] = float(coef[1] / coef.sum())
    n_short = sum(int((torch.tensor(f["labels"][1:]) != -100).sum()) for f in features if f["source_idx"] == 1)
    n_all = sum(int((torch.tensor(f["labels"][1:]) != -100).sum()) for f in features)
    assert share["token"] == pytest.approx(n_short / n_all, abs=1e-3)  # the short source's share of tokens
    assert share["source"] == pytest.approx(0.5, abs=1e-3)  # each source weighs the same
    assert share["source"] > 3 * share["token"]


# ---------------------------------------------------------------------------------------------
# merge_lora.py
# ---------------------------------------------------------------------------------------------


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_merge_qlora_dora_adapter(qlora_run, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, merged = qlora_run["out"], qlora_run["dir"] / "merged"
    with open(adapter / "adapter_config.json") as f:
        assert json.load(f)["use_dora"] is True
    run_script("merge_lora.py", "--base", tiny_model, "--adapter", adapter, "--output", merged,
               "--dtype", "fp32", "--max_shard_size", "200KB")
    assert len(glob.glob(str(merged / "model-*.safetensors"))) > 1  # sharded
    assert (merged / "model.safetensors.index.json").exists()
    assert not glob.glob(str(merged / "adapter_*"))

    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = torch.randint(0, base.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    base_logits = _logits(base, ids)
    reference = _logits(PeftModel.from_pretrained(base, adapter).eval(), ids)  # unmerged, full-precision base
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    assert (reference - base_logits).abs().max() > 1e-2, "adapter has no effect: the check would be vacuous"
    assert torch.allclose(_logits(model, ids), reference, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(merged)
    assert tok.chat_template == AutoTokenizer.from_pretrained(adapter).chat_template

    # a non-empty output is refused without --overwrite, and left untouched
    before = sorted(os.listdir(merged))
    proc = run_script("merge_lora.py", "--adapter", adapter, "--output", merged, check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert sorted(os.listdir(merged)) == before

    # --overwrite (base from adapter_config.json), bf16: one file, logits within bf16 rounding
    import merge_lora

    merge_lora.main(["--adapter", str(adapter), "--output", str(merged), "--dtype", "bf16", "--overwrite"])
    assert sorted(os.listdir(merged)) != before and (merged / "model.safetensors").exists()
    bf16 = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert bf16.dtype == torch.bfloat16
    assert (bf16(ids).logits.float() - reference).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------
# chat.py
# ---------------------------------------------------------------------------------------------


def greedy_replies(model, tokenizer, lines, max_new_tokens, system=None):
    """Plain transformers greedy decoding of a conversation, one user line at a time."""
    messages, replies = ([{"role": "system", "content": system}] if system else []), []
    for line in lines:
        messages.append({"role": "user", "content": line})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                 pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


def test_chat_one_shot_prints_just_the_answer(full_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = run_script("chat.py", "--model", full_run["out"], "--prompt", QUESTION)  # the README demo
    model = AutoModelForCausalLM.from_pretrained(full_run["out"]).eval()
    (expected,) = greedy_replies(model, AutoTokenizer.from_pretrained(full_run["out"]), [QUESTION], 256)
    assert proc.stdout == expected + "\n"  # the answer alone: loading messages go to stderr
    assert "[chat] loading" in proc.stderr
    # the fine-tuned model answers with one of the trained answers (the random base would babble)
    assert expected in {r["messages"][-1]["content"] for r in demo_records()}


def test_chat_interactive_adapter_with_base_override(qlora_run, tiny_model):
    """Piped stdin, one user turn per line, conversation kept; an adapter whose adapter_config.json
    points to a missing base, fixed by --base. Replies equal plain greedy generation with peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = qlora_run["dir"] / "moved-adapter"
    shutil.copytree(qlora_run["out"], adapter)
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(qlora_run["dir"] / "no-such-base")
    config_file.write_text(json.dumps(config))

    lines = ["Hello!", "What is the capital of France?"]
    proc = run_script("chat.py", "--model", adapter, "--base", tiny_model, "--max_new_tokens", 12,
                      "--system", "Be brief.", stdin="\n".join(lines) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(qlora_run["out"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    base_replies = greedy_replies(base, tokenizer, lines, 12, system="Be brief.")
    model = PeftModel.from_pretrained(base, qlora_run["out"]).eval()
    expected = greedy_replies(model, tokenizer, lines, 12, system="Be brief.")
    assert all(expected) and expected != base_replies  # the adapter speaks, and differently from its base
    assert proc.stdout == "".join(r + "\n" for r in expected)

    # without --base the adapter's recorded base path is used (here missing: the error names it)
    import chat

    with pytest.raises(Exception, match="no-such-base"):
        chat.load(str(adapter))
    model, _ = chat.load(str(qlora_run["out"]))
    assert model.peft_config["default"].use_dora and model.base_model.model.config.vocab_size == len(tokenizer)
