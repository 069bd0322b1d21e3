"""Loss memory benchmark (issue 10): peak RSS and step time of training with a large vocabulary.

    python bench/loss_memory.py                          # about 10 minutes on 2 CPU cores, ~15 GB peak
    python bench/loss_memory.py --vocab 4096 --modes ours before

A random Qwen2 model with hidden size 128 and 2 layers, with Qwen's 151,936-token vocabulary (and a
4,096-token one: no regression where the logits are small), fp32, one process per mode, the same
synthetic chats (~980 tokens each: a short question, a long answer) in batches of 8:

  ours          finetune.py: CE at the trained positions only, in chunks (one chunk of logits at a time)
  before        finetune.py at --before_rev (git), the full-logits loss it had before issue 10
  hf_default    transformers.Trainer with the model's own loss (full logits, upcast to fp32), our tokens
  trl_default   TRL SFTTrainer with SFTConfig defaults (TRL's own tokenization: loss on every token,
                chunked since TRL 1.16); only bf16=False (no GPU) and the batch size are set

Columns: peak RSS of the whole worker process (model, data, everything; ru_maxrss), seconds per
optimizer step (mean over the steps after the first, which warms up), tokens/s, and both as ratios to
ours. The machine may be shared: times move between runs; ratios within one run are the figures to use.
Results: a table on stdout and bench/results/loss_memory-<time>.json (git-ignored).
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

MODES = ["ours", "trl_default", "before", "hf_default"]


def make_model(path, vocab):
    """The tiny BPE tokenizer (2,048 tokens) with a model whose head covers `vocab` tokens."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from make_tiny_model import build_tokenizer

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_data(path, model, n, tokens):
    """n chats of about `tokens` tokens: a ~60-token question, the rest answer."""
    import numpy as np
    from transformers import AutoTokenizer

    from bench import WORDS

    if os.path.isfile(path):
        return path
    tok = AutoTokenizer.from_pretrained(model)
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    per_word = len(tok(" ".join(rng.choice(words, 2000)))["input_ids"]) / 2000
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            question = " ".join(rng.choice(words, int(60 / per_word)))
            answer = " ".join(rng.choice(words, int((tokens - 30) / per_word)))
            f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


def step_timer():
    """A callback for every Trainer (appended to the default callbacks): wall time of each optimizer step."""
    import transformers

    class StepTimer(transformers.TrainerCallback):
        ends = []

        def on_train_begin(self, *args, **kwargs):
            self.ends[:] = [time.perf_counter()]

        def on_step_end(self, *args, **kwargs):
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    transformers.trainer.DEFAULT_CALLBACKS.append(timer)
    return timer


def finetune_argv(opts, out):
    return ["--model_name_or_path", opts.model, "--data_path", opts.data, "--output_dir", out,
            "--dataset_cache_dir", os.path.join(opts.workdir, "cache-" + opts.mode),
            "--per_device_train_batch_size", opts.batch, "--max_steps", opts.steps, "--learning_rate", "1e-5",
            "--train_sampling_strategy", "random", "--save_strategy", "no", "--logging_steps", 10 ** 6,
            "--report_to", "none", "--disable_tqdm", "True", "--model_max_length", 4096]


def worker(opts):
    """One mode, in this process: prints {"peak_rss_mb", "step_s", "tokens"} as the last line."""
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    timer = step_timer()
    out = os.path.join(opts.workdir, "out-" + opts.mode)
    argv = [str(a) for a in finetune_argv(opts, out)]
    if opts.mode in ("ours", "before"):
        path = os.path.join(ROOT, "finetune.py")
        if opts.mode == "before":
            path = os.path.join(opts.workdir, "finetune_before.py")
            with open(path, "w") as f:
                f.write(subprocess.check_output(["git", "-C", ROOT, "show", f"{opts.before_rev}:finetune.py"],
                                                text=True))
        spec = importlib.util.spec_from_file_location("finetune_" + opts.mode, path)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # datasets pickles its classes
        spec.loader.exec_module(module)
        trainer = module.train(argv)
        tokens = sum(len(x) for x in trainer.train_dataset["input_ids"][: opts.steps * opts.batch])
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(opts.model)
        model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32, attn_implementation="sdpa")
        model.config.use_cache = False
        common = dict(output_dir=out, report_to="none", save_strategy="no", per_device_train_batch_size=opts.batch,
                      max_steps=opts.steps, learning_rate=1e-5, logging_steps=10 ** 6, seed=0, disable_tqdm=True,
                      train_sampling_strategy="random")
        if opts.mode == "trl_default":
            from trl import SFTConfig, SFTTrainer

            with open(opts.data) as f:
                records = [json.loads(line) for line in f]
            trainer = SFTTrainer(model=model, args=SFTConfig(bf16=False, **common),
                                 train_dataset=datasets.Dataset.from_list(records), processing_class=tok)
        else:  # hf_default: our tokens and labels, padded; the model computes its own loss
            import finetune as ft

            data_args = ft.DataArguments(data_path=opts.data,
                                         dataset_cache_dir=os.path.join(opts.workdir, "cache-" + opts.mode))
            train, _, _ = ft.load_datasets(data_args, ft.TrainingArguments(**common), tok)
            pad = ft.PaddingCollator(tok.pad_token_id)

            def collate(rows):
                batch = pad(rows)
                return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

            trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common),
                                           train_dataset=train.select_columns(["input_ids", "labels"]),
                                           data_collator=collate)
        trainer.train()
        tokens = sum(len(x) for x in trainer.train_dataset["input_ids"][: opts.steps * opts.batch])
    steps = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    print(json.dumps({"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "step_s": round(sum(steps[1:]) / max(1, len(steps) - 1), 3), "steps": len(steps),
                      "tokens_per_step": tokens // opts.steps}))


def parse_with_worker_flags(parser):
    """--workdir, and the hidden flags this script starts its worker processes with (--mode, --model, --data),
    added to `parser` -> the parsed options (real_model.py's too)."""
    parser.add_argument("--workdir", default=None)
    for hidden in ("--mode", "--model", "--data"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[151_936, 4096])
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=980, help="tokens per chat")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is not timed)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--before_rev", default="1a24878", help="git revision of finetune.py for `before`")
    opts = parse_with_worker_flags(parser)
    if opts.mode:
        return worker(opts)
    workdir = opts.workdir or tempfile.mkdtemp(prefix="bench_loss_")
    results = []
    for vocab in opts.vocab:
        model = make_model(os.path.join(workdir, f"model-{vocab}"), vocab)
        data = make_data(os.path.join(workdir, "chats.jsonl"), model, opts.batch * opts.steps, opts.tokens)
        for mode in opts.modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--model", model, "--data", data,
                   "--workdir", os.path.join(workdir, f"v{vocab}"), "--batch", str(opts.batch),
                   "--steps", str(opts.steps), "--threads", str(opts.threads), "--before_rev", opts.before_rev]
            env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "TOKENIZERS_PARALLELISM": "false",
                   "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                results.append({"vocab": vocab, "mode": mode, "error": proc.returncode})
                continue
            row = {"vocab": vocab, "mode": mode, **json.loads(proc.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\n| vocab | mode | peak RSS (GB) | s/step | tokens/s | RSS vs ours | time vs ours |\n"
          "|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['vocab']:,} | {r['mode']} | failed ({r['error']}) | | | | |")
            continue
        ours = next((x for x in results if x["vocab"] == r["vocab"] and x["mode"] == "ours" and "error" not in x), r)
        print(f"| {r['vocab']:,} | {r['mode']} | {r['peak_rss_mb'] / 1024:.2f} | {r['step_s']:.2f} | "
              f"{r['tokens_per_step'] / r['step_s']:,.0f} | {r['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x | "
              f"{r['step_s'] / ours['step_s']:.2f}x |")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", time.strftime("loss_memory-%Y%m%d-%H%M%S.json")), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
