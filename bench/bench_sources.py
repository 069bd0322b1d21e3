"""Preprocessing speed by data source: the same conversations as JSONL, Parquet, a save_to_disk folder (Arrow)
and CSV (messages as JSON text in a cell), each through finetune.build_dataset from a cold cache (read + validate
+ render + tokenize + label + Arrow on disk), in its own process. Target: Parquet within 1.1x of JSONL.

    python bench/bench_sources.py                      # 4000 conversations, 3 rounds: about 3 minutes on 2 cores
    python bench/bench_sources.py --rows 20000 --repeat 5

The sources are timed in rounds, one run of each per round in turn, and each keeps its fastest round (a shared
machine moves single runs by 2x); wall and CPU time (all threads) are both reported, with the ratio to JSONL.
Conversations and model: bench.py's (synthetic long-tailed chats, a tiny random Qwen2 with its BPE tokenizer).
Results: a table on stdout and bench/results/sources-<time>.json (git-ignored).
"""

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402


def write_sources(workdir, rows):
    """The same records in each layout -> {name: --data_path}."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = bench.write_data(os.path.join(workdir, f"chats-{rows}.jsonl"), rows)
    with open(jsonl, encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    table = pa.Table.from_pylist(records)
    paths = {"jsonl": jsonl, "parquet": os.path.join(workdir, "chats.parquet"),
             "save_to_disk": os.path.join(workdir, "saved"), "csv": os.path.join(workdir, "chats.csv")}
    pq.write_table(table, paths["parquet"])
    datasets.disable_progress_bars()
    datasets.Dataset(table).save_to_disk(paths["save_to_disk"])
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerows([json.dumps(r["messages"], ensure_ascii=False)] for r in records)
    return paths


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--repeat", type=int, default=3, help="rounds; each source keeps its fastest")
    p.add_argument("--sources", default="jsonl,parquet,save_to_disk,csv")
    p.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    opts = p.parse_args()
    keep = opts.workdir is not None
    workdir = os.path.abspath(opts.workdir or tempfile.mkdtemp(prefix="finetune-bench-sources-"))
    os.makedirs(workdir, exist_ok=True)
    from make_tiny_model import make_tiny_model

    model = os.path.join(workdir, "model-h128-l4")
    if not os.path.isdir(model):
        make_tiny_model(model, hidden_size=128, num_layers=4)
    paths = write_sources(workdir, opts.rows)
    names = [s for s in opts.sources.split(",") if s]
    worker = SimpleNamespace(workdir=workdir, model=model, data=None, train_samples=0, batch_size=1, pad_steps=0,
                             threads=1)
    runs = {n: [] for n in names}
    for r in range(opts.repeat):
        for name in names:
            cache = os.path.join(workdir, f"cache-{name}")
            shutil.rmtree(cache, ignore_errors=True)
            print(f"[bench] round {r + 1}/{opts.repeat}: {name} ...", flush=True)
            runs[name].append(bench.run_worker("preprocess", worker, data=paths[name], cache=cache))
            shutil.rmtree(cache, ignore_errors=True)
    errors = {n: next(x["error"] for x in rs if "error" in x)
              for n, rs in runs.items() if any("error" in x for x in rs)}
    if errors:
        raise SystemExit(f"[bench] failed: {json.dumps(errors)[:3000]}")
    best = {n: min(rs, key=lambda x: x["wall_s"]) for n, rs in runs.items()}
    ref = best.get("jsonl")
    rows = [[n, b["rows"], b["tokens"], b["wall_s"], b["cpu_s"],
             f"{b['wall_s'] / ref['wall_s']:.2f}x" if ref else "", f"{b['cpu_s'] / ref['cpu_s']:.2f}x" if ref else "",
             b["conv_per_s"], b["peak_rss_mb"]] for n, b in best.items()]
    print(f"\n{opts.rows} conversations, fastest of {opts.repeat} rounds, {os.cpu_count()} CPU cores (shared)\n")
    print(bench.table(["source", "samples", "tokens", "wall s", "cpu s", "wall vs jsonl", "cpu vs jsonl", "conv/s",
                       "peak RSS MB"], rows))
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = os.path.join(HERE, "results", time.strftime("sources-%Y%m%d-%H%M%S.json"))
    with open(out, "w") as f:
        json.dump({"rows": opts.rows, "repeat": opts.repeat, "best": best, "runs": runs,
                   "command": "python bench/bench_sources.py " + " ".join(sys.argv[1:])}, f, indent=1)
    print(f"\n[bench] results: {out}")
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
