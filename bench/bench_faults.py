"""What the non-finite guard (finetune_faults.NonFiniteGuard, on by default) costs per optimizer step.

    python bench/bench_faults.py                   # about 6 minutes on 2 CPU cores
    python bench/bench_faults.py --steps 300 --repeats 4

1. The step-end work alone, 1 process (CPU), the best of 9 rounds of --calls steps of 4 micro-batches (the
   two setups alternate round by round): the run's StepAgreement.on_step_end with preemption alone registered,
   and with the guard too, as train() sets them up (note_loss per micro-batch, note_grad_norm): the difference
   is what the guard adds (a NaN test of loss + norm on the device; its flag rides in the same all-reduce, one
   more number in it: no collective, no sync of its own).
   Not timed this way with 2 processes: on gloo, any work at all before an all-reduce (40 us of matmuls just
   as well) turns its 120-200 us into 500 us on a loaded 2-core machine, the ranks no longer arriving together,
   which a real step (milliseconds of work before it) pays with or without the guard.
2. Whole runs of finetune.py, guard on (the default) and off (--stop_on_nonfinite False), alternated
   --repeats times: a tiny random Qwen2 (examples/make_tiny_model.py, --hidden_size 128, --num_layers 4),
   --max_steps --steps, batch 4, fp32, 1 process and 2 processes (torchrun, gloo). train_runtime per step,
   min over the repeats (the machine is shared: the min is the least disturbed run).
Nothing is read or computed that the step does not have already: no extra pass over the data, no extra forward.
Results: a table on stdout.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def step_end_alone(calls):
    """Part 1 in this process (under torchrun: WORLD_SIZE processes, see above): microseconds per step."""
    import torch
    import transformers

    from finetune_agreement import StepAgreement
    from finetune_faults import NonFiniteGuard
    from finetune_preemption import PreemptionCallback

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    args = types.SimpleNamespace(device=torch.device("cpu"), fp16=False, world_size=world, learning_rate=1e-3,
                                 max_grad_norm=1.0, stop_on_nonfinite=True, output_dir=tempfile.gettempdir())
    state, control = types.SimpleNamespace(global_step=1, max_steps=10**9), transformers.TrainerControl()
    batch = {"token_source": torch.zeros(4, 512, dtype=torch.long), "position_ids": torch.arange(512).expand(4, 512)}
    loss, norm = torch.tensor(2.5), torch.tensor(1.0)
    alone, shared = StepAgreement(), StepAgreement()
    PreemptionCallback(alone)
    PreemptionCallback(shared)
    guard = NonFiniteGuard(args, ["a"], shared)
    setups = {"preemption only": alone, "preemption + guard": shared}
    rounds = {name: [] for name in setups}
    for _ in range(9):  # the setups alternate, round by round: a busy machine disturbs both alike
        for name, agreement in setups.items():
            if world > 1:
                torch.distributed.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                if agreement is shared:
                    for _ in range(4):
                        guard.note_loss(loss, batch)
                    guard.note_grad_norm(norm)
                agreement.on_step_end(args, state, control)
            rounds[name].append((time.perf_counter() - start) / calls)
    return {name: min(r) * 1e6 for name, r in rounds.items()}  # the least disturbed round


def run(cmd):
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode:
        raise SystemExit(f"failed:\n{out.stdout[-4000:]}")
    return float(re.findall(r"'train_runtime': '([\d.]+)'", out.stdout)[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--step_end_only", action="store_true", help="part 1 only, as JSON (also under torchrun)")
    a = parser.parse_args()

    if a.step_end_only:
        print(json.dumps(step_end_alone(a.calls)))
        return
    t = step_end_alone(a.calls)
    print(f"step end alone, 1 process, us per optimizer step (4 micro-batches): preemption only "
          f"{t['preemption only']:.1f}, preemption + guard {t['preemption + guard']:.1f}, the guard "
          f"{t['preemption + guard'] - t['preemption only']:+.1f}")

    from make_tiny_model import make_tiny_model

    work = tempfile.mkdtemp(prefix="bench-faults-")
    model = make_tiny_model(os.path.join(work, "model"), hidden_size=128, num_layers=4)
    data = os.path.join(ROOT, "examples", "demo_data.jsonl")
    results = {}
    for nproc in (1, 2):
        launch = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
                  if nproc == 2 else [sys.executable])
        for rep in range(a.repeats):
            for guard in (True, False):
                out = os.path.join(work, f"out-{nproc}-{guard}-{rep}")
                cmd = [*launch, os.path.join(ROOT, "finetune.py"), "--model_name_or_path", model, "--data_path", data,
                       "--output_dir", out, "--dataset_cache_dir", os.path.join(work, "cache"),
                       "--per_device_train_batch_size", "4", "--max_steps", str(a.steps), "--save_strategy", "no",
                       "--logging_steps", "50", "--learning_rate", "1e-4", "--disable_tqdm", "True",
                       "--stop_on_nonfinite", str(guard)] + (["--ddp_backend", "gloo"] if nproc == 2 else [])
                results.setdefault((nproc, guard), []).append(run(cmd) / a.steps)
    print(f"\nwhole runs, {a.steps} steps, min over {a.repeats} (all runs: ms per step)")
    print("processes | guard on ms/step | guard off ms/step | difference")
    for nproc in (1, 2):
        on, off = min(results[nproc, True]), min(results[nproc, False])
        print(f"{nproc:9d} | {on * 1e3:16.2f} | {off * 1e3:17.2f} | {100 * (on - off) / off:+.1f}%   "
              f"on {[round(x * 1e3, 2) for x in results[nproc, True]]} "
              f"off {[round(x * 1e3, 2) for x in results[nproc, False]]}")
    print(json.dumps({f"{k[0]}proc_guard_{k[1]}": v for k, v in results.items()}))


if __name__ == "__main__":
    main()
