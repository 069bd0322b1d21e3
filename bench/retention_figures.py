"""Which retention figure ranks runs the way their answers do? A grid of runs on the real model
(SmolLM2-135M-Instruct, examples/demo_data.jsonl: LoRA and full fine-tuning at several learning rates and epochs),
each trained once and saved; then every candidate figure of finetune_retention.Retention.measure on several
reference sets, against the ground truth: how many of HELD_OUT (general questions in no reference set, asked
greedily, checked by a pattern) each run answers right. Prints a markdown table of Spearman rank correlations
(figure x reference set) and each run's figures.

    python bench/retention_figures.py                   # train what is missing, measure, report (resumable per run)
    python bench/retention_figures.py --phase train     # only train + ask HELD_OUT (the slow part)
    python bench/retention_figures.py --phase report    # only measure + report, from the saved runs

Runs live in --out (default output_retention_figures/<run>/: the saved model or adapter, truth.json when asked,
figures-<set>.json when measured); a run with its files is not trained or asked again. Writes
bench/results/retention_figures-<time>.json (git-ignored).

The reference sets (REFERENCE_SETS): the built-in prompts (finetune's default, the first 8 of
retention_prompts.jsonl), QUIZ with its reference answers in two wordings (`The answer is X.` and a full
sentence), and QUIZ's questions alone (the base answers them).
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# one torch thread in every process: on a shared CPU two threads wait on each other (OpenMP spinning), 10x slower
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(ROOT / "examples"))

# (method, learning rate, epochs): 5 steps an epoch (18 conversations, batch 4)
RUNS = (  # in the order they are trained: a partial grid already spans both methods and the range of damage
    ("lora", "0", 1),
    ("lora", "1e-3", 5), ("lora", "4e-3", 5), ("full", "1e-5", 5), ("full", "1e-4", 3), ("lora", "2e-3", 8),
    ("full", "3e-5", 5), ("lora", "3e-4", 5), ("lora", "1e-3", 2), ("full", "1e-4", 5), ("lora", "8e-3", 5),
)

# A quiz written for this bench: (question, a short answer, the same answer as a sentence). Its questions are in no
# other set here (not in retention_prompts.jsonl, not in HELD_OUT).
QUIZ = (
    ("What is the capital of Canada?", "Ottawa", "The capital of Canada is Ottawa."),
    ("What is the capital of Egypt?", "Cairo", "Cairo is the capital city of Egypt."),
    ("What is the capital of Russia?", "Moscow", "Russia's capital is Moscow."),
    ("What is the capital of Greece?", "Athens", "The Greek capital is Athens."),
    ("How many days are there in a leap year?", "366", "A leap year has 366 days."),
    ("What is 8 plus 6?", "14", "8 plus 6 equals 14."),
    ("Which planet is closest to the Sun?", "Mercury", "Mercury is the planet nearest the Sun."),
    ("What is the chemical formula of water?", "H2O", "Water's chemical formula is H2O."),
    ("Who wrote the play Hamlet?", "William Shakespeare", "Hamlet was written by William Shakespeare."),
    ("How many hours are there in a day?", "24", "There are 24 hours in a day."),
    ("What colour is a ripe banana?", "Yellow", "A ripe banana is yellow."),
    ("Which animal is called the king of the jungle?", "The lion", "The lion is called the king of the jungle."),
    ("What language do most people in Mexico speak?", "Spanish", "Most people in Mexico speak Spanish."),
    ("How many sides does a triangle have?", "Three", "A triangle has three sides."),
)

# The ground truth: general questions in no reference set, each with a pattern a right answer matches.
HELD_OUT = (
    ("What is the capital of Spain?", r"madrid"),
    ("What is the capital of the United Kingdom?", r"london"),
    ("What is the capital of Ireland?", r"dublin"),
    ("What is the capital of Austria?", r"vienna"),
    ("What is the capital of Poland?", r"warsaw"),
    ("What is the capital of Norway?", r"oslo"),
    ("What is the capital of Sweden?", r"stockholm"),
    ("What is the capital of Thailand?", r"bangkok"),
    ("What is the capital of South Korea?", r"seoul"),
    ("What is the capital of Kenya?", r"nairobi"),
    ("What is the capital of Argentina?", r"buenos aires"),
    ("What is the capital of India?", r"delhi"),
    ("How many days are there in a week?", r"\b(seven|7)\b"),
    ("What is 5 plus 3?", r"\b(eight|8)\b"),
    ("What is 10 times 10?", r"\b(one hundred|100)\b"),
    ("How many minutes are there in an hour?", r"\b(sixty|60)\b"),
    ("How many months are there in a year?", r"\b(twelve|12)\b"),
    ("What is 20 minus 5?", r"\b(fifteen|15)\b"),
    ("How many letters are there in the English alphabet?", r"\b(twenty-six|26)\b"),
    ("How many wheels does a bicycle have?", r"\b(two|2)\b"),
    ("What is the largest planet in the solar system?", r"jupiter"),
    ("What do bees make?", r"honey"),
    ("What is frozen water called?", r"\bice\b"),
    ("What colour is grass?", r"green"),
    ("Which animal says moo?", r"\bcows?\b"),
    ("What is the fastest land animal?", r"cheetah"),
    ("What do you call a baby dog?", r"pupp(y|ies)"),
    ("Which organ pumps blood around the body?", r"heart"),
    ("What is the currency of Japan?", r"\byen\b"),
    ("Which musical instrument has black and white keys?", r"piano"),
    ("Who was the first president of the United States?", r"washington"),
    ("On which planet do we live?", r"earth"),
    ("What shape has four equal sides and four right angles?", r"square"),
    ("What is the opposite of up?", r"\bdown\b"),
    ("Who painted the ceiling of the Sistine Chapel?", r"michelangelo"),
    ("What is the tallest mountain in the world?", r"everest"),
)


def run_name(method, lr, epochs):
    return f"{method}_lr{lr}_ep{epochs}"


def env():
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def trained(out):
    return (out / "all_results.json").is_file() and any((out / f).is_file() for f in (
        "model.safetensors", "adapter_model.safetensors"))


def train(model, out, method, lr, epochs, cache):
    """One run, saved in `out` (retention off: everything is measured afterwards from the saved run)."""
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", model, "--data_path",
           str(ROOT / "examples" / "demo_data.jsonl"), "--output_dir", str(out), "--use_lora", str(method == "lora"),
           "--num_train_epochs", str(epochs), "--learning_rate", lr, "--per_device_train_batch_size", "4",
           "--gradient_accumulation_steps", "1", "--save_strategy", "no", "--logging_steps", "5", "--disable_tqdm",
           "True", "--retention", "False", "--dataset_cache_dir", str(cache), "--seed", "0"]
    start = time.time()
    proc = subprocess.run(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    (out.parent / f"{out.name}.log").write_text(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"{out.name}: finetune.py failed (exit {proc.returncode}), see {out}.log")
    print(f"{out.name}: trained in {time.time() - start:.0f} s", flush=True)


def load(out, base):
    """The saved run (an adapter on its base, or a full model), fp32, eval mode -> (model, tokenizer)."""
    from finetune_console import quiet_known_notices

    quiet_known_notices()  # before peft imports bitsandbytes
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_adapter import is_adapter, load_base_and_adapter

    if out is not None and is_adapter(str(out)):
        model, tok, _ = load_base_and_adapter(str(out), base=base, dtype=torch.float32)
        return model.eval(), tok
    folder = base if out is None else str(out)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(folder)


def ask(model, tok, questions, max_new_tokens=40):
    """Greedy answers to `questions` (text), 12 at a time, left-padded."""
    import torch

    from chat import stop_token_ids

    tok.padding_side = "left"
    answers = []
    for k in range(0, len(questions), 12):
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for q in questions[k:k + 12]]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop_token_ids(model, tok), pad_token_id=tok.pad_token_id)
        answers += [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]
    return answers


def right(answers):
    return [bool(re.search(pattern, a, re.IGNORECASE)) for a, (_, pattern) in zip(answers, HELD_OUT)]


def ask_held_out(out, base):
    model, tok = load(None if out.name.endswith("lr0_ep1") else out, base)
    answers = ask(model, tok, [q for q, _ in HELD_OUT])
    (out / "truth.json").write_text(json.dumps({"answers": answers, "right": right(answers)}, indent=1))
    print(f"{out.name}: {sum(right(answers))}/{len(HELD_OUT)} held-out questions right", flush=True)


def write_reference_sets(folder):
    """-> {name: --retention_data or None (the built-in set)}."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(name, records):
        path, text = folder / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records)
        if not path.is_file() or path.read_text() != text:  # rewritten, it would be a new set to finetune's cache
            path.write_text(text)
        return str(path)

    def chat(q, a=None):
        return {"messages": [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a else [])}

    return {
        "built-in": None,
        "quiz, short answers": write("quiz_short", [chat(q, f"The answer is {a}.") for q, a, _ in QUIZ]),
        "quiz, sentence answers": write("quiz_sentence", [chat(q, s) for q, _, s in QUIZ]),
        "quiz, no answers": write("quiz_prompts", [chat(q) for q, _, _ in QUIZ]),
    }


def reference(base, data, cache):
    """finetune's own Retention object for a reference set, as a run with --retention_data `data` builds it."""
    import finetune
    from finetune_retention import load as load_retention

    argv = ["--model_name_or_path", base, "--data_path", str(ROOT / "examples" / "demo_data.jsonl"), "--output_dir",
            str(cache / "unused"), "--dataset_cache_dir", str(cache)] + (["--retention_data", data] if data else [])
    model_args, data_args, training_args, lora_args = finetune.parse_args(argv)
    tokenizer = finetune.load_tokenizer(model_args, training_args)
    return load_retention(tokenizer, model_args, data_args, training_args, lora_args, finetune._tokenize_arrays)


def measure_all(folder, base, names, resamples=400):
    """figures-<set>.json in every run's folder that lacks it: the figures, and each figure on `resamples` resamples
    of the set's records (the same resamples for every run: the spread of a difference between two runs); -> {run:
    {set: that json}}."""
    import random

    sets = write_reference_sets(folder / "reference")
    todo = [n for n in names if any(not (folder / n / f"figures-{slug(s)}.json").is_file() for s in sets)]
    if todo:
        model, _ = load(None, base)
        retention, draws = {}, {}
        for name, data in sets.items():
            retention[name] = reference(base, data, folder / "reference_cache")
            retention[name].record_base(model, True)
            n = len(retention[name].items)
            rng = random.Random(0)
            draws[name] = [[rng.randrange(n) for _ in range(n)] for _ in range(resamples)]
        del model
        for n in todo:
            out = folder / n
            model, _ = load(None if n.endswith("lr0_ep1") else out, base)
            for name, r in retention.items():
                r.measure(model)
                figures = r.figures(r.scored)  # every candidate, not only those logged
                boot = [r.figures(r.scored, records) for records in draws[name]]
                (out / f"figures-{slug(name)}.json").write_text(json.dumps({
                    "figures": figures, "records": len(r.items), "resolution": r.resolution(),
                    "resampled": {k: [b[k] for b in boot] for k in figures}}))
            print(f"{n}: measured", flush=True)
    return {n: {s: json.loads((folder / n / f"figures-{slug(s)}.json").read_text()) for s in sets} for n in names}


def slug(name):
    return re.sub(r"\W+", "_", name).strip("_")


def spearman(x, y):
    """Spearman's rank correlation (ties: average ranks)."""
    import numpy as np

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # ties share their average rank
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def worse_when_larger(figure):
    return figure.endswith(("nll", "kl"))


def report(folder, names, measured):
    """Prints the tables; -> (truth, {figure: {set: Spearman}}, {figure: {set: per-record spread}})."""
    import numpy as np

    truth = {n: sum(json.loads((folder / n / "truth.json").read_text())["right"]) for n in names}
    sets = list(measured[names[0]])
    fig = {n: {s: measured[n][s]["figures"] for s in sets} for n in names}
    # retention (the headline, as finetune logs it: a function of ref_extra_nll) and every candidate
    keys = ["retention"] + sorted(k for k in fig[names[0]][sets[0]] if k.startswith(("own_", "ref_")))
    print(f"Spearman rank correlation with the held-out questions answered right ({len(names)} runs; +1: the figure "
          "orders the runs as their answers do; extra NLL and KL negated)\n")
    print("| figure | " + " | ".join(sets) + " |")
    print("| --- |" + " --- |" * len(sets))
    table, spread = {}, {}
    for k in keys:
        row = []
        for s in sets:
            x = [(-1 if worse_when_larger(k) else 1) * fig[n][s][k] for n in names]
            table.setdefault(k, {})[s] = rho = spearman(x, [truth[n] for n in names])
            row.append(f"{rho:+.2f}")
        print(f"| `{k}` | " + " | ".join(row) + " |")
    print("\nResolution: " + "; ".join(f"{s}: {measured[names[0]][s]['records']} prompts, "
                                        f"{measured[names[0]][s]['resolution']}" for s in sets))
    # noise: for every pair of runs, the spread of their difference over resamples of the records (the same draws
    # for both), scaled to one record: s = SE * sqrt(records); a difference D is 2 SE at n = (2 s / D)^2 records
    print("\nPer-record spread s of the difference between two runs (median over the pairs of runs): a difference D "
          "between two runs is two standard errors at n = (2 s / D)^2 prompts\n")
    print("| figure | " + " | ".join(sets) + " |")
    print("| --- |" + " --- |" * len(sets))
    for k in keys:
        row = []
        for s in sets:
            records = measured[names[0]][s]["records"]
            boots = {n: np.array(measured[n][s]["resampled"][k]) for n in names}
            per_pair = [np.std(boots[a] - boots[b]) * records ** 0.5 for i, a in enumerate(names)
                        for b in names[i + 1:]]
            spread.setdefault(k, {})[s] = float(np.median(per_pair))
            row.append(f"{np.median(per_pair):.3f}")
        print(f"| `{k}` | " + " | ".join(row) + " |")
    print("\nPrompts at which a difference D in retention between two runs is two standard errors, (2 s / D)^2:\n")
    print("| reference set | s | D = 0.02 | D = 0.05 | D = 0.1 | D = 0.2 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for s in sets:
        sp = spread["retention"][s]
        print(f"| {s} | {sp:.3f} | " + " | ".join(f"{math.ceil((2 * sp / d) ** 2)}" for d in (0.02, 0.05, 0.1, 0.2))
              + " |")
    shown = ("retention", "ref_top1", "ref_extra_nll", "own_kl")
    print(f"\n| run | held-out right (of {len(HELD_OUT)}) | " + " | ".join(
        f"{k} ({s})" for s in sets for k in shown) + " |")
    print("| --- | --- |" + " --- |" * len(sets) * len(shown))
    for n in sorted(names, key=lambda n: -truth[n]):
        print(f"| {n} | {truth[n]} | " + " | ".join(f"{fig[n][s][k]:.3f}" for s in sets for k in shown) + " |")
    return truth, table, spread


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output_retention_figures", help="Folder of the runs.")
    p.add_argument("--phase", choices=("all", "train", "report"), default="all")
    p.add_argument("--runs", nargs="*", help="Only these runs (names as method_lrLR_epN).")
    args = p.parse_args()
    from smollm2 import ensure_model

    base, folder = ensure_model(), Path(args.out)
    names = [run_name(*r) for r in RUNS if not args.runs or run_name(*r) in args.runs]
    if args.phase in ("all", "train"):
        for (method, lr, epochs), n in zip(RUNS, [run_name(*r) for r in RUNS]):
            if n not in names:
                continue
            out = folder / n
            if float(lr) > 0 and not trained(out):
                train(base, out, method, lr, epochs, folder / "cache")
            out.mkdir(parents=True, exist_ok=True)
            if not (out / "truth.json").is_file():
                ask_held_out(out, base)
    if args.phase in ("all", "report"):
        names = [n for n in names if (folder / n / "truth.json").is_file()]
        figures = measure_all(folder, base, names)
        truth, table, spread = report(folder, names, figures)
        results = ROOT / "bench" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / f"retention_figures-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(
            {"truth": truth, "spearman": table, "spread": spread,
             "figures": {n: {s: f["figures"] for s, f in v.items()} for n, v in figures.items()}}, indent=1))


if __name__ == "__main__":
    main()
