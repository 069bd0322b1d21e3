"""Does eval_retention order runs the way their answers to general questions do? Several learning rates on the real
model (SmolLM2-135M-Instruct, LoRA, the demo data, 5 epochs), each measured two ways after training:

- eval_retention, as finetune.py logs it (the built-in reference set, default 8 prompts);
- a quiz (QUIZ below: general questions the retention set does not hold but France, each with words a right
  answer contains), asked greedily: how many are answered right, and how many word for word as the base model.

    python bench/retention_sweep.py                       # 5 runs, ~10-20 min on 2 shared cores
    python bench/retention_sweep.py --lrs 0 1e-3 4e-3     # other learning rates
    python bench/retention_sweep.py --quiz_as_reference   # retention measured on the quiz's own questions
                                                          # (--retention_data: a user's own prompts)

Prints a markdown table (one row per run, in learning-rate order) and whether the retention order matches the
quiz's; writes bench/results/retention_sweep-<time>.json (git-ignored).
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUIZ = (  # (question, any of these words in a right answer), France is also the built-in set's first
    # prompt (the demo's breakage); the others are not in retention_prompts.jsonl
    ("What is the capital of Italy?", ("rome",)),
    ("What is the capital of Spain?", ("madrid",)),
    ("What is the capital of Germany?", ("berlin",)),
    ("What is the capital of France?", ("paris",)),
    ("How many days are there in a week?", ("seven", "7")),
    ("What is 6 times 7?", ("42",)),
    ("What is the largest planet in our solar system?", ("jupiter",)),
    ("What gas do plants absorb from the air?", ("carbon dioxide", "co2")),
    ("Who wrote Romeo and Juliet?", ("shakespeare",)),
    ("What is the boiling point of water in degrees Celsius?", ("100",)),
    ("What is the freezing point of water in degrees Celsius?", ("0", "zero")),
    ("How many legs does an insect have?", ("six", "6")),
    ("What is the opposite of hot?", ("cold",)),
    ("Which ocean is the largest?", ("pacific",)),
    ("What color is the sky on a clear day?", ("blue",)),
    ("What is the square root of 81?", ("9", "nine")),
)


def train(model, out, lr, epochs, cache, extra):
    subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", model, "--data_path",
                    str(ROOT / "examples" / "demo_data.jsonl"), "--output_dir", str(out), "--use_lora", "True",
                    "--num_train_epochs", str(epochs), "--learning_rate", lr, "--per_device_train_batch_size", "4",
                    "--save_strategy", "no", "--logging_steps", "5", "--disable_tqdm", "True",
                    "--dataset_cache_dir", str(cache), *extra], check=True, stdout=subprocess.DEVNULL)
    with open(out / "all_results.json") as f:
        return json.load(f)


def quiz(model_dir):
    """Greedy answers to QUIZ (48 new tokens at most), one batch."""
    from finetune_console import quiet_known_notices

    quiet_known_notices()  # before peft imports bitsandbytes
    import torch

    from chat import stop_token_ids
    from finetune_adapter import load_base_and_adapter

    model, tok, _ = load_base_and_adapter(str(model_dir), dtype=torch.float32)
    model.eval()
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q, _ in QUIZ]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=48, do_sample=False, eos_token_id=stop_token_ids(model, tok),
                             pad_token_id=tok.pad_token_id)
    return [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for row in out]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", nargs="+", default=["0", "3e-4", "1e-3", "2e-3", "4e-3"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", default="output_retention_sweep", help="Folder of the runs.")
    p.add_argument("--quiz_as_reference", action="store_true",
                   help="Measure retention on the quiz's questions (--retention_data) instead of the built-in set.")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "examples"))
    from smollm2 import ensure_model

    model, folder, rows, extra = ensure_model(), Path(args.out), [], []
    if args.quiz_as_reference:
        folder.mkdir(parents=True, exist_ok=True)
        quiz_file = folder / "quiz.jsonl"
        quiz_file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n"
                                     for q, _ in QUIZ))
        extra = ["--retention_data", str(quiz_file)]
    for lr in args.lrs:
        out = folder / f"lr{lr}"
        results = train(model, out, lr, args.epochs, folder / "cache", extra)
        answers = quiz(out)
        rows.append({"lr": lr, "results": results, "answers": answers,
                     "right": sum(any(w in a.lower() for w in words) for a, (_, words) in zip(answers, QUIZ))})
    base = next((r["answers"] for r in rows if float(r["lr"]) == 0), None)
    print(f"| lr × {args.epochs} epochs | eval_retention | eval_retention_extra_nll | quiz right (of {len(QUIZ)}) "
          "| quiz answers as the base's |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        same = "" if base is None else sum(a == b for a, b in zip(r["answers"], base))
        r["as_base"] = same
        print(f"| {r['lr']} | {r['results']['eval_retention']:.3f} | {r['results']['eval_retention_extra_nll']:+.3f} "
              f"| {r['right']} | {same} |")
    ret = [r["results"]["eval_retention"] for r in rows]
    print(f"reference set: {'the quiz (--retention_data)' if extra else 'built-in'}")
    print("retention falls as the learning rate grows:", all(a >= b for a, b in zip(ret, ret[1:])))
    for r in rows:
        print(f"\nlr {r['lr']}:", *[f"  {q} -> {a[:90]!r}" for (q, _), a in zip(QUIZ, r["answers"])], sep="\n")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"retention_sweep-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
