"""The router loss's cost on CPU: training steps/s of a small random Qwen3-MoE (tests/moe_models.py, hidden 64, 4
layers, 8 experts, top-2) on the demo data, full fine-tuning, with the router loss added (the model's coefficient), only
logged (--router_aux_loss_coef 0) and with the MoE machinery off (finetune_moe.MoeRouting.of patched to None: what
finetune.py did before). Each mode runs `--repeats` times, interleaved; the median train_runtime is reported.

    python bench/moe_router_loss.py [--steps 40] [--repeats 3]
"""

import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "examples")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import finetune
    import finetune_moe
    from moe_models import make_moe_model

    tmp = tempfile.mkdtemp()
    model = make_moe_model("qwen3_moe", os.path.join(tmp, "model"), hidden_size=64, num_hidden_layers=4)
    original = finetune_moe.MoeRouting.of
    modes = {"router loss added (coef 0.001)": ([], original), "logged only (coef 0)":
             (["--router_aux_loss_coef", "0"], original), "MoE machinery off": ([], lambda *a, **k: None)}
    times = {m: [] for m in modes}
    for r in range(args.repeats):
        for mode, (extra, of) in modes.items():
            finetune_moe.MoeRouting.of = of
            trainer = finetune.train([
                "--model_name_or_path", model, "--data_path", os.path.join(ROOT, "examples", "demo_data.jsonl"),
                "--output_dir", os.path.join(tmp, f"out{r}"), "--dataset_cache_dir", os.path.join(tmp, "cache"),
                "--per_device_train_batch_size", "4", "--max_steps", str(args.steps), "--logging_steps", "10",
                "--save_strategy", "no", "--retention", "False", "--report_to", "none", *extra])
            times[mode].append(trainer.state.log_history[-1]["train_runtime"])
    base = statistics.median(times["MoE machinery off"])
    print("\n| mode | s per step (median) | vs machinery off |\n| --- | --- | --- |")
    for mode, ts in times.items():
        t = statistics.median(ts)
        print(f"| {mode} | {t / args.steps:.4f} | {t / base:.3f}x |")


if __name__ == "__main__":
    main()
