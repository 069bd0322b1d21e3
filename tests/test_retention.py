"""Retention (finetune_retention.py): how much of the base model's behaviour the model under training keeps.

Tiny model: a bad --retention_data stops the run with the very `file:line` errors --data_path gives; --retention_min
stops a run (exit code 4, one line, the checkpoint before kept) or warns; eval_retention reaches trainer_state.json,
all_results.json, TensorBoard and the plot on a run without an evaluation set; ZeRO-3 on two processes measures what
one process measures. Real model (SmolLM2-135M-Instruct): learning rate 0 leaves every figure exactly unchanged
(full and LoRA, a reference set with answers); the demo prints the figure before and after, with what it rests on;
the demo's settings at lr 2e-3 x 8 epochs (which make the model answer "Lutz" for France) retain less than the
demo's lr 1e-3 x 5 on the built-in set, on a quiz with short answers in a user's wording and on its questions alone, as
their answers to general questions say (one trained run each, measured on every set in this process)."""

import json
import re
from pathlib import Path

import pytest

from conftest import read_log_history, run_finetune, write_jsonl
from test_distributed import DEMO, ZERO3, torchrun

FIGURES = ("eval_retention", "eval_retention_extra_nll", "eval_retention_answers")


def results(out):
    return json.loads((Path(out) / "all_results.json").read_text())


def error_lines(log, path):
    return [line for line in log.splitlines() if line.startswith(str(path))]


def test_bad_retention_data_gets_the_data_path_errors(tiny_model, tmp_path):
    """The same bad file as --data_path and as --retention_data: the same `file:line: field: problem` lines, exit 2,
    before any model is loaded."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        '{"messages": [{"role": "user", "content": "broken"',
        {"messages": [{"role": "robot", "content": "Hello"}]},
        {"mesages": [{"role": "user", "content": "typo"}]},
    ])
    common = ["--model_name_or_path", tiny_model, "--output_dir", tmp_path / "out", "--dataset_cache_dir",
              tmp_path / "cache", "--max_steps", 1]
    as_data = run_finetune([*common, "--data_path", bad], check=False)
    as_reference = run_finetune([*common, "--data_path", DEMO, "--retention_data", bad], check=False)
    assert as_data.returncode == as_reference.returncode == 2, as_reference.stdout[-3000:]
    lines = error_lines(as_data.stdout, bad)
    assert len(lines) == 3 and ":2: " in lines[0] and ":3: " in lines[1] and ":4: " in lines[2], as_data.stdout
    assert error_lines(as_reference.stdout, bad) == lines, as_reference.stdout
    assert "--retention_data" in as_reference.stdout and "LoRA" not in as_reference.stdout
    assert "retention:" not in as_reference.stdout  # stopped before the base model was asked anything
    missing = run_finetune([*common, "--data_path", DEMO, "--retention_data", tmp_path / "none.jsonl"], check=False)
    assert missing.returncode == 2 and "none.jsonl" in missing.stdout.strip().splitlines()[-1], missing.stdout


def test_retention_min_stops_or_warns_and_is_logged_everywhere(tiny_model, tmp_path):
    """No evaluation set, --eval_strategy steps: retention is measured every 2 steps. --retention_min 0.999 (a random
    tiny model at lr 1e-2 drops far below): `stop` ends at step 2 with exit code 4 and one line naming the measure
    and the bound, checkpoint-1 kept, no checkpoint-2 and no final model; `warn` trains on, and eval_retention is in
    the log lines, trainer_state.json, all_results.json, TensorBoard and training_loss.png."""
    common = ["--model_name_or_path", tiny_model, "--data_path", DEMO, "--dataset_cache_dir", tmp_path / "cache",
              "--max_steps", 4, "--learning_rate", 1e-2, "--per_device_train_batch_size", 4, "--eval_strategy",
              "steps", "--eval_steps", 2, "--retention_min", 0.999, "--disable_tqdm", True, "--logging_steps", 1]
    stop = tmp_path / "stop"
    proc = run_finetune([*common, "--output_dir", stop, "--save_steps", 1], check=False)
    assert proc.returncode == 4, proc.stdout[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    pattern = r"error: retention fell below --retention_min at step 2: eval_retention 0\.\d+ < 0\.999"
    assert re.search(pattern, last), last
    assert (stop / "checkpoint-1").is_dir() and not (stop / "checkpoint-2").exists()
    assert not (stop / "model.safetensors").exists()
    assert [h["step"] for h in read_log_history(stop) if "eval_retention" in h] == [2]

    warn = tmp_path / "warn"
    proc = run_finetune([*common, "--output_dir", warn, "--save_strategy", "no", "--retention_action", "warn",
                         "--report_to", "tensorboard"])
    assert proc.stdout.count("WARNING: retention fell below --retention_min") == 2, proc.stdout[-3000:]
    measured = [h for h in read_log_history(warn) if "eval_retention" in h]
    assert [h["step"] for h in measured] == [2, 4], measured
    assert all(0 <= h["eval_retention"] < 0.999 and 0 <= h["eval_retention_answers"] <= 1 for h in measured)
    final = results(warn)
    assert {k: final[k] for k in FIGURES} == {k: measured[-1][k] for k in FIGURES}  # the end: not measured twice
    assert "retention after training:" in proc.stdout and "'eval_retention': " in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(warn.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/retention")] == [2, 4]
    assert (warn / "training_loss.png").stat().st_size > 10_000


def test_zero3_two_processes_measure_what_one_process_measures(tiny_model, tmp_path):
    """One process (batch 4) and ZeRO-3 on two processes (2 x 2), each with a cache of its own so that both generate
    and score the base: the same base answers, the same base figures, and after 4 steps the same figures
    (the top-1 ones exactly; those of likelihoods within 1e-3 relative: the two layouts sum gradients in another
    order)."""
    runs = {}
    for n, per_device in ((1, 4), (2, 2)):
        out = tmp_path / f"p{n}"
        torchrun(n, ["--model_name_or_path", tiny_model, "--data_path", DEMO, "--output_dir", out,
                     "--dataset_cache_dir", tmp_path / f"cache{n}", "--deepspeed", ZERO3, "--ddp_backend", "gloo",
                     "--per_device_train_batch_size", per_device, "--max_steps", 4, "--save_strategy", "no",
                     "--learning_rate", 1e-3, "--seed", 0, "--train_sampling_strategy", "random"])
        runs[n] = (json.loads((out / "retention_base.json").read_text()), results(out))
    (base1, final1), (base2, final2) = runs[1], runs[2]
    assert base1["items"] == base2["items"] and base1["top1"] == base2["top1"]
    assert base2["nll"] == pytest.approx(base1["nll"], rel=1e-5, abs=1e-6)
    assert final1["eval_retention"] < 1  # something was forgotten, so the comparison means something
    assert final2["eval_retention_top1"] == final1["eval_retention_top1"]
    assert final2["eval_retention_answers"] == final1["eval_retention_answers"]
    for figure in ("eval_retention", "eval_retention_extra_nll", "eval_retention_kl"):
        assert final2[figure] == pytest.approx(final1[figure], rel=1e-3), figure


# ---------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------

# A reference set as a user writes one: general questions with short answers in their own wording (the quiz of
# bench/retention_figures.py). On this wording top-1 agreement, the figure before, ranked the demo (0.505) below
# lr 2e-3 x 8 epochs (0.516), which answers far fewer general questions right.
QUIZ = (
    ("What is the capital of Canada?", "The answer is Ottawa."),
    ("What is the capital of Egypt?", "The answer is Cairo."),
    ("What is the capital of Russia?", "The answer is Moscow."),
    ("What is the capital of Greece?", "The answer is Athens."),
    ("How many days are there in a leap year?", "The answer is 366."),
    ("What is 8 plus 6?", "The answer is 14."),
    ("Which planet is closest to the Sun?", "The answer is Mercury."),
    ("What is the chemical formula of water?", "The answer is H2O."),
    ("Who wrote the play Hamlet?", "The answer is William Shakespeare."),
    ("How many hours are there in a day?", "The answer is 24."),
    ("What colour is a ripe banana?", "The answer is Yellow."),
    ("Which animal is called the king of the jungle?", "The answer is The lion."),
    ("What language do most people in Mexico speak?", "The answer is Spanish."),
    ("How many sides does a triangle have?", "The answer is Three."),
)
# General questions in no reference set, with a pattern a right answer matches: what a run still knows
GENERAL = (
    ("What is the capital of Austria?", r"vienna"), ("What is the capital of Poland?", r"warsaw"),
    ("What is the capital of Norway?", r"oslo"), ("What is the capital of Sweden?", r"stockholm"),
    ("What is the capital of Thailand?", r"bangkok"), ("What is the capital of South Korea?", r"seoul"),
    ("What is the capital of Kenya?", r"nairobi"), ("What is the capital of the United Kingdom?", r"london"),
    ("How many months are there in a year?", r"\b(twelve|12)\b"), ("What is the opposite of up?", r"\bdown\b"),
    ("What is the tallest mountain in the world?", r"everest"), ("What is the currency of Japan?", r"\byen\b"),
)


def quiz_file(folder, answers=True):
    return write_jsonl(Path(folder) / ("quiz.jsonl" if answers else "quiz_prompts.jsonl"), [
        {"messages": [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if answers else [])}
        for q, a in QUIZ])


def test_lr0_keeps_retention_exactly_full_and_lora(smollm2, tmp_path):
    """Learning rate 0, full fine-tuning and LoRA (sharing one cache: the LoRA run's base figures are the full run's,
    computed in another process), a reference set with answers of its own: retention exactly 1, every other figure
    exactly unchanged (extra NLL and KL 0, every answer kept)."""
    cache, quiz = tmp_path / "cache", quiz_file(tmp_path)
    for method in ("full", "lora"):
        out = tmp_path / method
        proc = run_finetune(["--model_name_or_path", smollm2, "--data_path", DEMO, "--output_dir", out,
                             "--dataset_cache_dir", cache, "--max_steps", 1, "--learning_rate", 0,
                             "--per_device_train_batch_size", 2, "--save_strategy", "no", "--use_lora",
                             method == "lora", "--retention_data", quiz])
        assert ("answers generated" in proc.stdout) == (method == "full"), proc.stdout[-2000:]
        final = {k.removeprefix("eval_"): v for k, v in results(out).items() if k.startswith("eval_retention")}
        unchanged = {k: 0.0 if "nll" in k or "kl" in k else 1.0 for k in final}
        assert final == unchanged and len(final) >= 4, (method, final)


def retention_after(log):
    """(retention, extra NLL) of the log's closing retention line."""
    found = re.search(r"retention after training: (\d\.\d+) .*extra NLL ([+-]\d\.\d+)", log)
    return float(found.group(1)), float(found.group(2))


@pytest.fixture(scope="module")
def aggressive_run(smollm2, tmp_path_factory):
    """The demo's settings at lr 2e-3 x 8 epochs (LoRA), which make SmolLM2 answer "Lutz" for capitals (France's
    too) and break most general answers (bench/README.md: 5 of 36 held-out questions right, the demo 21, the base
    20); retention measured on the built-in set: {"log", "model"}. (lr 4e-3 x 5 breaks as much in fewer steps, but
    top-1 agreement, the figure before, also ordered it right on a quiz with answers: no test of the change.)"""
    out = tmp_path_factory.mktemp("aggressive") / "out"
    proc = run_finetune(["--model_name_or_path", smollm2, "--data_path", DEMO, "--output_dir", out, "--use_lora",
                         "--num_train_epochs", 8, "--learning_rate", 2e-3, "--per_device_train_batch_size", 4,
                         "--gradient_accumulation_steps", 1, "--save_strategy", "no", "--disable_tqdm", True],
                        timeout=1200)
    return {"log": proc.stdout, "model": out}


def test_aggressive_run_forgets_more_than_the_demo(demo_run, aggressive_run):
    """The demo (LoRA, lr 1e-3 x 5 epochs) prints retention before and after, with what the measurement rests on;
    the aggressive run ends with a lower retention and a larger extra NLL (built-in set). The bounds leave room for
    another machine's rounding, not for the order to turn (bench/README.md: the figures of both)."""
    log = demo_run["log"]
    for line in (r"retention before training: 1\.000 .*measured on \d+ answer tokens of 8 prompts",
                 r"retention after training: .* on \d+ answer tokens of 8 prompts"):
        assert re.search(line, log), log[-3000:]
    gentle, aggressive = retention_after(log), retention_after(aggressive_run["log"])
    assert aggressive[0] < gentle[0] - 0.05 and aggressive[1] > 2 * gentle[1], (gentle, aggressive)


def ask(model, tokenizer, questions):
    """Greedy answers (text), one batch, left-padded."""
    import torch

    from chat import stop_token_ids

    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop_token_ids(model, tokenizer))
    return [tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]


@pytest.fixture(scope="module")
def judged(smollm2, demo_run, aggressive_run, tmp_path_factory):
    """The gentle (the demo) and aggressive runs as saved, each measured in this process by finetune's own
    Retention on QUIZ with its answers and on QUIZ's questions alone (one base model, its figures computed once per
    set), and asked GENERAL: {run: {"answers": figures, "no answers": figures, "right": n}}."""
    import torch


    assert demo_run["returncode"] == 0, demo_run["log"][-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every process of the suite: two threads on shared cores wait on each other
    try:
        return _judge(smollm2, demo_run, aggressive_run, tmp_path_factory.mktemp("judged"))
    finally:
        torch.set_num_threads(threads)


def _judge(smollm2, demo_run, aggressive_run, folder):
    import torch
    from transformers import AutoModelForCausalLM

    import finetune
    from finetune_adapter import load_base_and_adapter
    from finetune_retention import load as load_retention

    retention = {}
    for name, data in (("answers", quiz_file(folder)), ("no answers", quiz_file(folder, answers=False))):
        args = finetune.parse_args([str(a) for a in (
            "--model_name_or_path", smollm2, "--data_path", DEMO, "--output_dir", folder / "unused",
            "--dataset_cache_dir", folder / "cache", "--retention_data", data)])
        tokenizer = finetune.load_tokenizer(args[0], args[2])
        retention[name] = load_retention(tokenizer, *args, finetune._tokenize_arrays)
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    for r in retention.values():
        r.record_base(base, True)
    del base
    out = {}
    for run, path in (("gentle", demo_run["model"]), ("aggressive", aggressive_run["model"])):
        model, tokenizer, _ = load_base_and_adapter(str(path), dtype=torch.float32)
        out[run] = {name: r.measure(model) for name, r in retention.items()}
        answers = ask(model.eval(), tokenizer, [q for q, _ in GENERAL])
        out[run]["right"] = sum(bool(re.search(p, a, re.IGNORECASE)) for a, (_, p) in zip(answers, GENERAL))
    return out


@pytest.mark.parametrize("reference", ["answers", "no answers"])
def test_retention_orders_runs_as_their_answers_do(judged, reference):
    """A reference set with short answers in a user's own wording, and the same questions without answers: the
    gentle run (the demo) keeps a higher eval_retention than the aggressive one, as it answers more general questions
    right. With answers, top-1 agreement (the figure before) orders them the other way round: switched back, this
    fails. Without answers it ordered them right too (the base's own answers): there the test guards the order."""
    gentle, aggressive = judged["gentle"], judged["aggressive"]
    assert gentle["right"] > aggressive["right"], (gentle["right"], aggressive["right"])
    figures = gentle[reference]["eval_retention"], aggressive[reference]["eval_retention"]
    assert 1 > figures[0] > figures[1] + 0.05, figures
