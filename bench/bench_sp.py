"""Sequence parallelism on CPU: peak memory per rank and tokens/s for one long sample, N = 1 and N = 2.

    python bench/bench_sp.py                       # a 16k-token sample, 3 optimizer steps per run
    python bench/bench_sp.py --tokens 8192 --steps 2

Builds a tiny random Qwen2 (examples/make_tiny_model.py, --hidden_size 256, --num_layers 4, RoPE positions
up to 32k) and one conversation of about --tokens tokens (a short question, a long answer: almost every
token trained). Then runs finetune.py as a user would, fp32, sdpa, batch 1, no gradient checkpointing:
  N=1, 1 process      no DeepSpeed: the whole sample on one rank
  N=1, 2 processes    torchrun --nproc_per_node 2 --deepspeed ds_config_zero2.json: data parallel, a whole
                      sample per rank (the memory to compare with: same DeepSpeed buffers as N=2)
  N=2, 2 processes    the same + --sequence_parallel_size 2: each rank holds half of the sample
Peak memory: the largest resident set of each training process, sampled every 50 ms (it includes the
~0.5 GB that python + torch + the model take before any token is seen: the "idle" column). tokens/s:
trained tokens of all steps / train_runtime (the first step included). The machine is shared and has 2
cores: with N=2 both cores compute, so tokens/s is an upper bound of what contention allows.
Results: a table on stdout and bench/results/bench_sp-<time>.json (git-ignored).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()


def build(workdir, tokens):
    from transformers import AutoConfig, AutoTokenizer

    from make_tiny_model import make_tiny_model

    model = make_tiny_model(os.path.join(workdir, "model"), hidden_size=256, num_layers=4)
    config = AutoConfig.from_pretrained(model)
    config.max_position_embeddings = 32768
    config.save_pretrained(model)
    tok = AutoTokenizer.from_pretrained(model)
    per_word = len(tok(" ".join(WORDS * 20))["input_ids"]) / (len(WORDS) * 20)
    n = int((tokens - 40) / per_word)
    answer = " ".join(WORDS[i % len(WORDS)] for i in range(n))
    messages = [{"role": "user", "content": "Write a long answer."}, {"role": "assistant", "content": answer}]
    length = len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    data = os.path.join(workdir, "long.jsonl")
    with open(data, "w") as f:
        f.write(json.dumps({"messages": messages}) + "\n")
    return model, data, length


def run(cmd, env):
    """Run, sampling the RSS of every process of the tree; peak and idle RSS per training worker."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks, done = {}, threading.Event()

    def sample():
        while not done.is_set():
            try:
                procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                for p in procs:
                    if "finetune.py" in " ".join(p.cmdline()) and "torch.distributed.run" not in " ".join(p.cmdline()):
                        peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    done.set()
    thread.join()
    if proc.returncode:
        raise SystemExit(f"failed:\n{out[-4000:]}")
    return out, sorted(peaks.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    work = tempfile.mkdtemp(prefix="bench_sp-")
    model, data, length = build(work, args.tokens)
    print(f"sample: {length} tokens; model: hidden 256, 4 layers, 4 heads, 2 key/value heads", flush=True)
    common = ["--model_name_or_path", model, "--data_path", data, "--dataset_cache_dir", os.path.join(work, "cache"),
              "--model_max_length", str(length + 8), "--per_device_train_batch_size", "1", "--max_steps",
              str(args.steps), "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
              "--learning_rate", "1e-4", "--attn_implementation", "sdpa", "--packing", "false"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
           "finetune.py", *common, "--deepspeed", "ds_config_zero2.json", "--ddp_backend", "gloo"]
    runs = {  # name: (command, output dir, samples per optimizer step)
        "N=1, 1 process": ([sys.executable, "finetune.py", *common, "--output_dir", os.path.join(work, "a")], "a", 1),
        "N=1, 2 processes, ZeRO-2 (data parallel: a whole sample per rank)": (
            [*two, "--output_dir", os.path.join(work, "b")], "b", 2),
        "N=2, 2 processes, ZeRO-2 (the sample split across both)": (
            [*two, "--output_dir", os.path.join(work, "c"), "--sequence_parallel_size", "2"], "c", 1),
    }
    idle_cmd = [sys.executable, "-c", "import finetune, torch, transformers; from transformers import "
                f"AutoModelForCausalLM as A; m = A.from_pretrained({model!r}); import time; "
                "time.sleep(1)  # finetune.py"]
    _, idle = run(idle_cmd, env)
    results = []
    for name, (cmd, sub, samples) in runs.items():
        out, peaks = run(cmd, env)
        metrics = json.load(open(os.path.join(work, sub, "train_results.json")))
        tokens_per_s = args.steps * samples * length / metrics["train_runtime"]
        losses = [h["loss"] for h in json.load(open(os.path.join(work, sub, "trainer_state.json")))["log_history"]
                  if "loss" in h and "grad_norm" in h]
        results.append({"run": name, "peak_rss_mb_per_rank": [round(p / 2**20) for p in peaks],
                        "tokens_per_s": round(tokens_per_s, 1), "train_runtime_s": metrics["train_runtime"],
                        "losses": losses})
        print(results[-1], flush=True)
    print(f"\nsample of {length} tokens, {args.steps} steps, idle process (python + torch + model): "
          f"{round(idle[0] / 2**20)} MB\n")
    print("| run | peak RSS per rank | tokens/s |\n| --- | --- | --- |")
    for r in results:
        print(f"| {r['run']} | {', '.join(f'{p:,} MB' for p in r['peak_rss_mb_per_rank'])} | {r['tokens_per_s']:,} |")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", f"bench_sp-{time.strftime('%Y%m%d-%H%M%S')}.json"), "w") as f:
        json.dump({"tokens": length, "steps": args.steps, "idle_rss_mb": round(idle[0] / 2**20),
                   "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
