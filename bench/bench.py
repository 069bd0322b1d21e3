"""Throughput benchmark for finetune.py: batching modes side by side, preprocessing speed, memory.

    python bench/bench.py                                   # about 10 minutes on 2 CPU cores
    python bench/bench.py --preprocess_rows 1000000         # + the 1M-conversation memory run (opt-in)

Everything is built here, nothing is downloaded: a tiny random Qwen2 model (examples/make_tiny_model.py,
--hidden_size 128, --num_layers 4) and synthetic chats with a long-tailed length mix (1-6 turns,
log-normal turn lengths; the default 2000: median 159 tokens, mean 253, p90 606, p99 1213, max 1877).

Part 1, training throughput (same model, same conversations, batch size 4, fp32, one process each):
  pad_to_max_2048   the old Qwen script: every sample padded to model_max_length 2048, random order
                    (its preprocessing: apply_chat_template(padding="max_length") into in-memory tensors)
  padding_random    ours: PaddingCollator (pad to the batch's longest), random order
  padding_grouped   ours default without flash-attention: PaddingCollator + group_by_length
  packing           ours: PackingCollator, padding-free (--packing true; default with flash-attention)
  trl_sft_default   TRL SFTTrainer with SFTConfig defaults (if trl is installed); only bf16=False (no GPU)
                    and per_device_train_batch_size=4 are set
Columns: real (non-pad) tokens/s of training, the padding share of computed positions, the speed-up
over pad_to_max_2048, preprocessing conversations/s and tokens/s of that row's own preprocessing, and
the peak RSS of the process. Timing skips the first optimizer step (warm-up).

Part 2, preprocessing (--rows conversations, from a JSONL file to a cached Arrow dataset):
  ours (cold)       finetune.build_dataset: read + validate + render + tokenize + label + Arrow on disk
  baseline          render with tokenizer.apply_chat_template(tokenize=False) + one batched fast-tokenizer
                    call, on conversations already in memory (no file reading, no labels, no storage)
  ours (cached)     a second run: build_dataset hits the cache, load_from_disk, read the length column
Targets: ours <= 1.3x baseline; cached <= 10% of cold. Wall time and CPU time (all threads) are both
reported because the machine may be shared; ratios are computed from both.

Part 3 (opt-in, --preprocess_rows N): ours (cold) on N synthetic conversations, peak RSS (target < 3 GB
for 1M: Arrow on disk, memory independent of the data size).

Timing noise: on a shared machine numbers move by 2x or more between runs; --repeat N keeps each mode's
fastest of N runs (all runs are in the JSON), and --threads 1 (default) avoids OpenMP spin-waiting.

Results: a table on stdout and bench/results/bench-<time>.json (git-ignored).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

MODES = ["pad_to_max_2048", "padding_random", "padding_grouped", "packing", "trl_sft_default"]
MAX_LEN = 2048
WORDS = ("the quick brown fox jumps over lazy dog a language model predicts next token you are helpful assistant "
         "hello how can i help today please answer question fine tuning adapts pretrained to follow instructions "
         "is 42 def add return print import json name get_weather arguments city paris capital of france "
         "translate german guten morgen bonjour comment allez vous knowledge date environment system user tool "
         "data 今天天气很好 1234567890 + - * / = ( ) [ ] { }").split()


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Peak anonymous memory (RssAnon) of this process, sampled every 0.2 s. Peak RSS also counts the pages
    of memory-mapped Arrow files that were read, which the kernel reclaims at will; RssAnon is what the
    process really holds."""

    def __init__(self):
        import threading

        self.peak = 0
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        while True:
            try:
                with open("/proc/self/status") as f:
                    kb = next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))
                self.peak = max(self.peak, kb)
            except (OSError, StopIteration):
                return
            time.sleep(0.2)


def synthetic_conversations(n, seed=0):
    """Long-tailed chats: mostly one or two turns, a few long multi-turn ones."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    for _ in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        for _ in range(int(rng.choice([1, 1, 1, 1, 1, 2, 2, 3, 6]))):
            msgs.append({"role": "user",
                         "content": " ".join(rng.choice(words, int(min(rng.lognormal(2.5, 0.9), 600)) + 1))})
            msgs.append({"role": "assistant",
                         "content": " ".join(rng.choice(words, int(min(rng.lognormal(3.3, 1.0), 900)) + 1))})
        yield {"messages": msgs}


def write_data(path, n):
    if os.path.isfile(path):
        return path
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for record in synthetic_conversations(n):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path


def clock():
    return time.perf_counter(), time.process_time()


def since(start):
    return round(time.perf_counter() - start[0], 3), round(time.process_time() - start[1], 3)


def finetune_args(data_path, workdir, **extra):
    import finetune as ft

    data_args = ft.DataArguments(data_path=data_path, dataset_cache_dir=os.path.join(workdir, "cache"))
    training_args = ft.TrainingArguments(**{"output_dir": os.path.join(workdir, "out"), "report_to": "none",
                                            "model_max_length": MAX_LEN, **extra})
    return data_args, training_args


# ---------------------------------------------------------------------------------------------
# Workers (each in its own process: clean peak RSS, no state shared between modes)
# ---------------------------------------------------------------------------------------------


def work_preprocess(opts):
    """ours (cold) or ours (cached): build_dataset into opts.cache."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    import finetune as ft

    datasets.disable_progress_bars()
    anon = AnonPeak()
    tok = AutoTokenizer.from_pretrained(opts.model)
    data_args, training_args = finetune_args(opts.data, opts.workdir)
    data_args.dataset_cache_dir = opts.cache
    data_args.preprocessing_num_workers = opts.num_proc
    start = clock()
    path = ft.build_dataset(data_args.data_path, tok, data_args, training_args, opts.cache)
    data = datasets.load_from_disk(os.path.join(path, "data"))
    lengths = np.asarray(data["length"][:])
    wall, cpu = since(start)
    return {"rows": len(data), "tokens": int(lengths.sum()), "wall_s": wall, "cpu_s": cpu,
            "conv_per_s": round(len(data) / wall, 1), "tokens_per_s": round(int(lengths.sum()) / wall),
            "peak_rss_mb": round(peak_rss_mb()), "peak_anon_mb": round(anon.peak / 1024)}


def work_baseline(opts):
    """Render with apply_chat_template + one batched fast-tokenizer call (conversations in memory)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(opts.model)
    with open(opts.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    start = clock()
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
    render = since(start)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    wall, cpu = since(start)
    tokens = sum(len(x) for x in ids)
    return {"rows": len(records), "tokens": tokens, "wall_s": wall, "cpu_s": cpu, "render_wall_s": render[0],
            "conv_per_s": round(len(records) / wall, 1), "tokens_per_s": round(tokens / wall),
            "peak_rss_mb": round(peak_rss_mb())}


class Counting:
    """Wraps a collator: records (real tokens, computed positions) of every batch, in order."""

    def __init__(self, collator, pad_id):
        self.collator, self.pad_id, self.batches = collator, pad_id, []

    def __call__(self, features):
        batch = self.collator(features)
        ids = batch["input_ids"]
        if "attention_mask" in batch and batch["attention_mask"] is not None:
            real = int(batch["attention_mask"].sum())
        else:  # packing: every position is a real token
            real = int(ids.numel()) if "position_ids" in batch else int((ids != self.pad_id).sum())
        self.batches.append((real, int(ids.numel())))
        return batch


def qwen_pad_to_max(tok, records, max_len):
    """The old Qwen(1.5/2) finetune.py preprocessing: every chat padded to model_max_length, in memory."""
    import torch

    rows = [tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False, add_generation_prompt=False,
                                    padding="max_length", max_length=max_len, truncation=True) for r in records]
    input_ids = torch.tensor(rows, dtype=torch.int)
    labels = input_ids.clone().long()
    labels[labels == tok.pad_token_id] = -100
    return input_ids, labels, input_ids.ne(tok.pad_token_id)


def work_train(opts):
    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import finetune as ft

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    mode = opts.mode
    tok = AutoTokenizer.from_pretrained(opts.model)
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    with open(opts.data, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    steps = opts.pad_steps if mode == "pad_to_max_2048" else opts.train_samples // opts.batch_size
    common = dict(output_dir=os.path.join(opts.workdir, "out-" + mode), report_to="none", save_strategy="no",
                  per_device_train_batch_size=opts.batch_size, max_steps=steps, learning_rate=1e-5,
                  logging_steps=10 ** 6, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    prep = None
    if mode == "trl_sft_default":
        from trl import SFTConfig, SFTTrainer

        train_data = datasets.Dataset.from_list(records)
        start = clock()
        trainer = SFTTrainer(model=model, args=SFTConfig(bf16=False, **common), train_dataset=train_data,
                             processing_class=tok)
        prep = since(start)
        prep_tokens = sum(len(x) for x in trainer.train_dataset["input_ids"][:])
        trainer.train_dataset = trainer.train_dataset.select(range(opts.train_samples))
        trainer.data_collator = counter = Counting(trainer.data_collator, tok.pad_token_id)
        config = {k: getattr(trainer.args, k) for k in ("max_length", "packing", "padding_free",
                                                        "gradient_checkpointing", "train_sampling_strategy")}
    elif mode == "pad_to_max_2048":
        start = clock()
        input_ids, labels, attention_mask = qwen_pad_to_max(tok, records, MAX_LEN)
        prep = since(start)
        prep_tokens = int(attention_mask.sum())
        train_data = [{"input_ids": input_ids[i], "labels": labels[i], "attention_mask": attention_mask[i]}
                      for i in range(opts.train_samples)]
        args = transformers.TrainingArguments(train_sampling_strategy="random", **common)
        counter = Counting(transformers.default_data_collator, tok.pad_token_id)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train_data, data_collator=counter)
        config = {"padding": "max_length", "model_max_length": MAX_LEN}
    else:
        data_args, training_args = finetune_args(opts.data, opts.workdir, **common, train_sampling_strategy=(
            "group_by_length" if mode == "padding_grouped" else "random"))
        train, _, reports = ft.load_datasets(data_args, training_args, tok)  # the cache built in part 2
        train = train.select(range(opts.train_samples))
        collator = ft.PackingCollator() if mode == "packing" else ft.PaddingCollator(tok.pad_token_id)
        counter = Counting(collator, tok.pad_token_id)
        trainer = ft.FinetuneTrainer(model=model, args=training_args, train_dataset=train, data_collator=counter,
                                     processing_class=tok, source_names=reports[0]["sources"])
        config = {"train_sampling_strategy": training_args.train_sampling_strategy}

    marks = {}

    class Timer(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                marks["start"] = clock()

        def on_train_end(self, args, state, control, **kwargs):
            marks["end"] = since(marks["start"])

    trainer.add_callback(Timer())
    trainer.train()
    trained = counter.batches[:steps]
    real = sum(r for r, _ in trained[1:])
    positions = sum(p for _, p in trained[1:])
    wall, cpu = marks["end"]
    out = {"mode": mode, "steps_timed": len(trained) - 1, "real_tokens": real, "positions": positions,
           "train_wall_s": wall, "train_cpu_s": cpu, "real_tokens_per_s": round(real / wall, 1),
           "padding_share": round(1 - real / positions, 4), "peak_rss_mb": round(peak_rss_mb()), "config": config}
    if prep is not None:
        out.update(prep_rows=len(records), prep_wall_s=prep[0], prep_conv_per_s=round(len(records) / prep[0], 1),
                   prep_tokens_per_s=round(prep_tokens / prep[0]))
    return out


def run_worker(kind, opts, **extra):
    argv = [sys.executable, os.path.abspath(__file__), "--_worker", kind, "--workdir", opts.workdir,
            "--model", opts.model, "--data", extra.pop("data", opts.data)]
    for key, value in extra.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    for key in ("train_samples", "batch_size", "pad_steps", "threads"):
        argv += [f"--{key}", str(getattr(opts, key))]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    if kind == "train":
        env["OMP_NUM_THREADS"] = str(opts.threads)
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": proc.stdout[-3000:]}
    return json.loads(lines[-1][len("RESULT "):])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def table(headers, rows):
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2000, help="synthetic conversations (preprocessing, data pool)")
    p.add_argument("--train_samples", type=int, default=192, help="conversations trained per mode (one epoch)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--pad_steps", type=int, default=6, help="steps for pad_to_max_2048 (it is slow)")
    p.add_argument("--hidden_size", type=int, default=128)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per training process (1: steadier numbers on a shared machine)")
    p.add_argument("--repeat", type=int, default=1, help="run each training mode N times, keep the fastest")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--preprocess_rows", type=int, default=0, help="opt-in memory run on N conversations (1000000)")
    p.add_argument("--num_proc", type=int, default=None, help="--preprocessing_num_workers for ours")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args()

    if opts._worker:
        result = {"preprocess": work_preprocess, "baseline": work_baseline, "train": work_train}[opts._worker](opts)
        print("RESULT " + json.dumps(result), flush=True)
        return

    keep = opts.workdir is not None
    opts.workdir = os.path.abspath(opts.workdir or tempfile.mkdtemp(prefix="finetune-bench-"))
    os.makedirs(opts.workdir, exist_ok=True)
    import torch

    from make_tiny_model import make_tiny_model

    opts.model = os.path.join(opts.workdir, f"model-h{opts.hidden_size}-l{opts.num_layers}")
    if not os.path.isdir(opts.model):
        make_tiny_model(opts.model, hidden_size=opts.hidden_size, num_layers=opts.num_layers)
    opts.data = write_data(os.path.join(opts.workdir, f"chats-{opts.rows}.jsonl"), opts.rows)
    results = {"machine": f"{os.cpu_count()} CPU cores (shared), torch {torch.__version__}, "
                          f"{opts.threads} torch thread(s) per training process, no GPU",
               "command": "python bench/bench.py " + " ".join(sys.argv[1:]),
               "model": f"tiny Qwen2, hidden {opts.hidden_size}, {opts.num_layers} layers", "rows": opts.rows,
               "train_samples": opts.train_samples, "batch_size": opts.batch_size,
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"[bench] workdir {opts.workdir}; {results['machine']}", flush=True)

    # Part 2 first: it builds the cache that our training modes load.
    cache = os.path.join(opts.workdir, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    print("[bench] preprocessing ...", flush=True)
    pre = {"baseline": run_worker("baseline", opts),
           "ours_cold": run_worker("preprocess", opts, cache=cache, num_proc=opts.num_proc),
           "ours_cached": run_worker("preprocess", opts, cache=cache, num_proc=opts.num_proc)}
    results["preprocessing"] = pre

    if not opts.skip_train:
        results["train"] = {}
        modes = [m for m in opts.modes.split(",") if m]
        for mode in modes:
            if mode == "trl_sft_default":
                import importlib.util

                if importlib.util.find_spec("trl") is None:
                    results["train"][mode] = {"skipped": "trl is not installed"}
                    continue
            runs = []
            for i in range(opts.repeat):
                print(f"[bench] training: {mode} ({i + 1}/{opts.repeat}) ...", flush=True)
                runs.append(run_worker("train", opts, mode=mode))
            ok = [r for r in runs if "real_tokens_per_s" in r]
            best = max(ok, key=lambda r: r["real_tokens_per_s"]) if ok else runs[-1]
            results["train"][mode] = {**best, "all_runs_tokens_per_s": [r.get("real_tokens_per_s") for r in runs]}

    if opts.preprocess_rows:
        print(f"[bench] generating {opts.preprocess_rows} conversations ...", flush=True)
        big = write_data(os.path.join(opts.workdir, f"chats-{opts.preprocess_rows}.jsonl"), opts.preprocess_rows)
        big_cache = os.path.join(opts.workdir, "cache-big")
        shutil.rmtree(big_cache, ignore_errors=True)
        print("[bench] preprocessing them ...", flush=True)
        results["memory_run"] = run_worker("preprocess", opts, data=big, cache=big_cache, num_proc=opts.num_proc)
        shutil.rmtree(big_cache, ignore_errors=True)

    report(results)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = os.path.join(HERE, "results", time.strftime("bench-%Y%m%d-%H%M%S.json"))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n[bench] results: {out}")
    if not keep:
        shutil.rmtree(opts.workdir, ignore_errors=True)


def report(results):
    print(f"\nmachine: {results['machine']}; model: {results['model']}; command: {results['command']}")
    ours_prep = results["preprocessing"].get("ours_cold", {})
    if "train" in results:
        train = results["train"]
        base = train.get("pad_to_max_2048", {}).get("real_tokens_per_s")
        trl = train.get("trl_sft_default", {}).get("real_tokens_per_s")
        rows = []
        for mode, r in train.items():
            if "real_tokens_per_s" not in r:
                rows.append([mode] + [None] * 6 + [r.get("skipped") or "error: " + r.get("error", "")[-300:]])
                continue
            prep_conv = r.get("prep_conv_per_s", ours_prep.get("conv_per_s"))
            prep_tok = r.get("prep_tokens_per_s", ours_prep.get("tokens_per_s"))
            rows.append([mode, r["real_tokens_per_s"], f"{100 * r['padding_share']:.1f}%",
                         f"{r['real_tokens_per_s'] / base:.1f}x" if base else None,
                         f"{r['real_tokens_per_s'] / trl:.2f}x" if trl else None,
                         prep_conv, prep_tok, r["peak_rss_mb"]])
        pad_steps = next((r.get('steps_timed') for m, r in train.items() if m == 'pad_to_max_2048'), '')
        print(f"\nTraining, batch size {results['batch_size']}, {results['train_samples']} conversations per mode "
              f"(pad_to_max_2048: {pad_steps} timed steps):")
        print(table(["mode", "real tokens/s", "padding", "vs pad-to-max", "vs TRL default", "prep conv/s",
                     "prep tokens/s", "peak RSS MB"], rows))
        for mode, r in train.items():
            if "error" in r:
                print(f"\n{mode} failed:\n{r['error']}")
    pre = results["preprocessing"]
    if all("wall_s" in pre.get(k, {}) for k in ("baseline", "ours_cold", "ours_cached")):
        b, o, c = pre["baseline"], pre["ours_cold"], pre["ours_cached"]
        rows = [["baseline: apply_chat_template + batched encode", b["rows"], b["wall_s"], b["cpu_s"], b["conv_per_s"],
                 b["tokens_per_s"], "1.00x / 1.00x", b["peak_rss_mb"]],
                ["ours, cold (file -> labelled Arrow cache)", o["rows"], o["wall_s"], o["cpu_s"], o["conv_per_s"],
                 o["tokens_per_s"], f"{o['wall_s'] / b['wall_s']:.2f}x / {o['cpu_s'] / b['cpu_s']:.2f}x",
                 o["peak_rss_mb"]],
                ["ours, cached second run", c["rows"], c["wall_s"], c["cpu_s"], c["conv_per_s"], c["tokens_per_s"],
                 f"{100 * c['wall_s'] / o['wall_s']:.1f}% of cold", c["peak_rss_mb"]]]
        print(f"\nPreprocessing, {b['rows']} conversations, {b['tokens']} tokens:")
        print(table(["", "rows", "wall s", "CPU s", "conv/s", "tokens/s", "time vs baseline (wall / CPU)",
                     "peak RSS MB"], rows))
    else:
        print("\npreprocessing failed:", json.dumps(pre)[-3000:])
    if "memory_run" in results:
        m = results["memory_run"]
        if "wall_s" in m:
            print(f"\nMemory run: {m['rows']} conversations, {m['tokens']} tokens in {m['wall_s']} s "
                  f"({m['conv_per_s']} conv/s), peak RSS {m['peak_rss_mb']} MB (anonymous memory "
                  f"{m['peak_anon_mb']} MB; the rest is memory-mapped Arrow pages)")
        else:
            print("\nMemory run failed:", m.get("error"))


if __name__ == "__main__":
    main()
