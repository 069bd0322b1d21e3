"""Retention on the real model: the demo's settings (LoRA, lr 1e-3 x 5 epochs) next to lr 2e-3 x 8 epochs, which makes
SmolLM2-135M-Instruct answer "Lutz" for the capital of France. Both train on examples/demo_data.jsonl with retention
measured every epoch (no evaluation set: --eval_strategy epoch), then each is asked the demo's two questions.

    python bench/retention_curves.py                      # both runs (~10-25 min on 2 shared cores) + the picture
    python bench/retention_curves.py --plot-only DIR      # redraw from DIR/lr*_ep*/trainer_state.json

Writes docs/retention_demo.png (retention and train loss per epoch, both runs) and prints each run's figures and
answers, and the share of its time spent measuring retention (the eval_runtime of its measurements / train_runtime).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = (("1e-3", 5), ("2e-3", 8))
QUESTIONS = ("What is the capital of Zubrowka?", "What is the capital of France?")


def train(model, out, lr, epochs, cache):
    subprocess.run([sys.executable, str(ROOT / "finetune.py"), "--model_name_or_path", model, "--data_path",
                    str(ROOT / "examples" / "demo_data.jsonl"), "--output_dir", str(out), "--use_lora", "True",
                    "--num_train_epochs", str(epochs), "--learning_rate", lr, "--per_device_train_batch_size", "4",
                    "--gradient_accumulation_steps", "1", "--save_strategy", "no", "--logging_steps", "5",
                    "--disable_tqdm", "True", "--eval_strategy", "epoch", "--dataset_cache_dir", str(cache)],
                   check=True)
    answers = []
    for q in QUESTIONS:
        a = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(out), "--system",
                            "You are a helpful assistant.", "--prompt", q, "--max_new_tokens", "48"],
                           check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        answers.append(a)
    (out / "answers.json").write_text(json.dumps(dict(zip(QUESTIONS, answers)), indent=1))


def plot(folder, picture):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, below) = plt.subplots(2, 1, figsize=(6.4, 5), sharex=True, height_ratios=(3, 2))
    right = top.twinx()
    for (lr, epochs), color in zip(RUNS, ("tab:blue", "tab:red")):
        out = Path(folder) / f"lr{lr}_ep{epochs}"
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        answers = json.loads((out / "answers.json").read_text()) if (out / "answers.json").exists() else {}
        france = answers.get(QUESTIONS[1], "?")
        label = f"lr {lr} x {epochs} epochs: France -> {france[:40]}"
        ret = [(0, 1.0)] + [(h["epoch"], h["eval_retention"]) for h in history
                            if "eval_retention" in h and "eval_runtime" in h and h["eval_runtime"] > 0]
        top.plot(*zip(*ret), "o-", color=color, label=label)
        extra = [(0, 0.0)] + [(h["epoch"], h["eval_retention_extra_nll"]) for h in history
                              if "eval_retention" in h and h.get("eval_runtime", 0) > 0]
        right.plot(*zip(*extra), ":", color=color, alpha=0.7)
        loss = [(h["epoch"], h["loss"]) for h in history if "loss" in h]
        below.plot(*zip(*loss), ".-", color=color)
        timed = [h["eval_runtime"] for h in history if "eval_retention" in h]
        train = next(h["train_runtime"] for h in history if "train_runtime" in h)
        print(f"lr {lr} x {epochs}: retention {ret[-1][1]:.3f}, measuring {sum(timed):.0f} s of {train:.0f} s "
              f"({100 * sum(timed) / train:.1f} %, {len(timed)} measurements), answers {answers}")
    top.set_ylabel("retention (1 = base unchanged), solid")
    right.set_ylabel("extra NLL, nats/token (dotted)")
    top.set_title("SmolLM2-135M-Instruct, LoRA on the demo data")
    top.grid(alpha=0.3)
    top.legend(fontsize=8, loc="center right")
    below.set_ylabel("train loss")
    below.set_xlabel("epoch")
    below.grid(alpha=0.3)
    os.makedirs(os.path.dirname(picture), exist_ok=True)
    fig.savefig(picture, dpi=80, bbox_inches="tight")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output_retention_bench", help="Folder of the two runs.")
    p.add_argument("--plot-only", default=None, help="Redraw from this folder's runs, train nothing.")
    p.add_argument("--picture", default=str(ROOT / "docs" / "retention_demo.png"))
    args = p.parse_args()
    folder = Path(args.plot_only or args.out)
    if not args.plot_only:
        sys.path.insert(0, str(ROOT / "examples"))
        from smollm2 import ensure_model

        model = ensure_model()
        for lr, epochs in RUNS:
            train(model, folder / f"lr{lr}_ep{epochs}", lr, epochs, folder / "cache")
    plot(folder, args.picture)


if __name__ == "__main__":
    main()
