"""Faults that no input check catches (finetune_faults.py), each made real and each run to its end: the
message, the exit code, what is left on disk, and the next run.

  Diverging:  --learning_rate 1e5 on the tiny model: step 3's gradient norm is NaN. Guard on: exit 3 at that
              step, one line naming it, the value, the causes and the batch's sources; checkpoint-2 (finite)
              stays the newest, no final model. The rerun with a sane learning rate resumes from it (the new
              rate applied), but lr 1e5 broke those weights already: it stops at its first step and the line
              says to start over, which recovers.
              Guard off (--stop_on_nonfinite False): the old behaviour, but the loss is logged as nan, never 0.
              fp16: overflowing steps the loss scaler skips are not divergence, unless they never end.
              2 processes (finetune.sh, ZeRO-2): every rank stops at the same step, exit 3, the line once;
              the per-step agreement itself: a NaN loss on rank 1 alone stops both ranks (gloo).
  Full disk:  --output_dir on a tmpfs that holds one checkpoint but not two (as root; else the same
              fault faked at the file-write layer: ENOSPC from torch.save/save_file): exit 74, one line
              (folder, "no space left", the fixes), checkpoint-2 complete, the half-written checkpoint-4
              gone; the disk grown, the same command resumes from checkpoint-2. Less space than one
              checkpoint: a WARNING before training. No room for the final model: no half-written weights
              left. A dataset cache on a full disk: one line, exit 2.
              2 processes, rank 1's writes cut short (ulimit -f): both ranks end with exit 74, no traceback.
  Cache:      a truncated .arrow, bytes changed in place, a missing manifest: rebuilt with one note; an entry
              that cannot be removed: refused with its path and the rm command, exit 2. A run SIGKILLed
              while preprocessing: nothing of it is used, its leftover is removed, the next run builds.
"""

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import finetune
from conftest import ENV, ROOT, read_log_history, run_finetune, write_jsonl
from finetune_cache import MANIFEST, check_cache_entry
from finetune_checkpoints import checkpoint_is_complete
from finetune_exit_codes import ExitCode
from finetune_faults import checkpoint_bytes
from test_distributed import ZERO2, ZERO3, free_port, torchrun_cmd

DEMO = ROOT / "examples" / "demo_data.jsonl"  # 18 conversations, sources "dialogues" and "facts"


def args(model, out, cache, *extra):
    return ["--model_name_or_path", model, "--data_path", DEMO, "--output_dir", out, "--dataset_cache_dir", cache,
            "--per_device_train_batch_size", 4, "--logging_steps", 1, "--max_steps", 6, "--save_steps", 2,
            "--seed", 7, "--disable_tqdm", True, *extra]


def error_line(log):
    lines = [line for line in log.splitlines() if line.startswith("[finetune] error:")]
    assert len(lines) == 1, log[-4000:]
    return lines[0]


def no_traceback(log):
    assert "Traceback" not in log and "Error:" not in log.replace("[finetune] error:", ""), log[-4000:]


def no_worker_traceback(log):
    """Under torchrun: nothing from the workers but their own lines (torchrun reports the exit codes with a
    ChildFailedError traceback of its own; a worker's traceback lines start with [rankN]:)."""
    assert not re.search(r"^\[rank\d+\]:", log, re.M), log[-4000:]


def complete_steps(out):
    return sorted(int(p.name.split("-")[1]) for p in Path(out).glob("checkpoint-*")
                  if checkpoint_is_complete(p))


def all_finite(path):
    return all(torch.isfinite(t).all() for t in load_file(path).values())


# ---------------------------------------------------------------------------------------------
# Diverging runs
# ---------------------------------------------------------------------------------------------


def test_diverging_run_stops_at_the_first_nonfinite_step_and_the_rerun_recovers(tiny_model, tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = run_finetune(args(tiny_model, out, cache, "--learning_rate", 1e5), check=False)
    assert proc.returncode == ExitCode.DIVERGED == 3, proc.stdout[-4000:]
    line = error_line(proc.stdout)
    assert line.startswith("[finetune] error: training diverged at step 3: the gradient norm is nan (loss 6.7"), line
    assert f"The newest checkpoint is {out}/checkpoint-2: the same command resumes from it" in line, line
    assert "--learning_rate 100000: try it 10x lower" in line and "--stop_on_nonfinite False" in line, line
    assert re.search(r"a bad batch: this step's samples come from dialogues \(\d\), facts \(\d\)", line), line
    no_traceback(proc.stdout)
    # the step is logged as it was (not hidden), and nothing of it or after it was saved
    assert "'grad_norm': 'nan'" in proc.stdout and "'loss': '0'" not in proc.stdout
    assert complete_steps(out) == [2] and not list(out.glob("checkpoint-3*"))
    assert all_finite(out / "checkpoint-2" / "model.safetensors")
    assert not (out / "model.safetensors").exists() and not (out / "trainer_state.json").exists()

    # the rerun with a sane learning rate resumes from checkpoint-2 and takes the new rate (the restored
    # scheduler alone would keep 1e5's); but lr 1e5 has broken the weights before they overflowed (finite,
    # loss stuck at ln(vocab)): the very first step diverges again, and the line says what to do
    again = run_finetune(args(tiny_model, out, cache, "--learning_rate", 1e-3), check=False)
    assert again.returncode == 3 and f"resuming from {out}/checkpoint-2" in again.stdout, again.stdout[-4000:]
    assert "resumed with --learning_rate 0.001; the checkpoint was trained with 100000" in again.stdout
    assert "'learning_rate': '0.0006667'" in again.stdout  # the linear decay at step 3 of 6, scaled to 1e-3
    assert (f"This run resumed from {out}/checkpoint-2 and diverged at its first step: that checkpoint is already "
            "broken (finite, but not trainable): start over with --resume_from_checkpoint False") in \
        error_line(again.stdout)
    assert complete_steps(out) == [2]

    # ... which recovers: a finite model, every step logged
    run_finetune(args(tiny_model, out, cache, "--learning_rate", 1e-3, "--resume_from_checkpoint", False))
    assert all_finite(out / "model.safetensors")
    assert [h["step"] for h in read_log_history(out) if "loss" in h] == [1, 2, 3, 4, 5, 6]


def test_diverging_run_without_the_guard_trains_on_and_logs_nan_not_zero(tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = run_finetune(args(tiny_model, out, tmp_path / "cache", "--learning_rate", 1e5,
                             "--stop_on_nonfinite", False, "--save_strategy", "no"))
    assert "[finetune] error:" not in proc.stdout and "'loss': 'nan'" in proc.stdout
    losses = [h["loss"] for h in read_log_history(out) if "loss" in h]
    assert len(losses) == 6 and 0.0 not in losses and math.isnan(losses[-1]), losses  # the old log said 0
    assert not all_finite(out / "model.safetensors")  # what the user asked for: the old behaviour


# What each of the 2 processes of the agreement tests starts with
TWO_RANKS = textwrap.dedent("""
    import json, os, signal, sys, types
    import torch, transformers
    sys.path.insert(0, os.environ["ROOT"])
    from finetune_agreement import StepAgreement
    from finetune_faults import Diverged, NonFiniteGuard
    from finetune_preemption import PreemptionCallback
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    args = types.SimpleNamespace(device=torch.device("cpu"), fp16=False, world_size=2, learning_rate=1e-3,
                                 max_grad_norm=1.0, stop_on_nonfinite=True, output_dir=os.environ["OUT"])
""")
AGREE = TWO_RANKS + textwrap.dedent("""
    agreement = StepAgreement()
    guard, result = NonFiniteGuard(args, ["a", "b"], agreement), {}
    batch = {"token_source": torch.tensor([[rank, rank, -1]]), "position_ids": torch.tensor([[0, 1, 2]])}
    for step, bad in ((1, False), (2, rank == 1)):  # step 2: the loss is NaN on rank 1 only, the norm finite
        control = transformers.TrainerControl()
        guard.note_loss(torch.tensor(float("nan") if bad else 2.5), batch)
        guard.note_grad_norm(torch.tensor(1.0))
        agreement.on_step_end(args, types.SimpleNamespace(global_step=step), control)
        result[step] = {"stop": control.should_training_stop, "save": control.should_save}
    try:
        guard.on_epoch_end(args, None, control)
    except Diverged as e:
        result["message"], result["here"] = str(e), e.here
    # in a run, preemption votes in the same agreement (one collective per step for both)
    agreement, control = StepAgreement(), transformers.TrainerControl()
    shared = NonFiniteGuard(args, ["a", "b"], agreement)
    preemption = PreemptionCallback(agreement)
    shared.note_loss(torch.tensor(float("inf") if rank == 1 else 2.5), batch)
    shared.note_grad_norm(torch.tensor(1.0))
    agreement.on_step_end(args, types.SimpleNamespace(global_step=3, max_steps=9), control)
    result["shared"] = {"stop": control.should_training_stop, "message": shared.failure}
    print(json.dumps(result))
""")


def test_a_nonfinite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """The per-step agreement (one all-reduce) without which the other ranks would train on, or wait forever
    in the next collective: 2 real gloo processes, rank 1's loss NaN at step 2, the gradient norm finite; the
    same with preemption voting in the same agreement, as in a run."""
    for rank, r in enumerate(two_ranks(AGREE, tmp_path)):
        assert r["1"] == {"stop": False, "save": False}, r
        assert r["2"]["stop"] is True, (rank, r)
        assert "training diverged at step 2: the loss is nan" in r["message"], r
        assert "non-finite on rank 1 of 2" in r["message"] and "from a (1), b (1)" in r["message"], r
        assert r["here"] == (rank == 0)  # printed once
        assert r["shared"]["stop"] is True and "at step 3: the loss is inf" in r["shared"]["message"], r


def two_ranks(script, tmp_path):
    """`script` in 2 real gloo processes (RANK 0 and 1) -> what each printed last, as JSON."""
    port, procs = free_port(), []
    for rank in (0, 1):
        env = {**ENV, "ROOT": str(ROOT), "OUT": str(tmp_path), "RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True))
    return [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in procs]


BOTH = TWO_RANKS + textwrap.dedent("""
    reduces, all_reduce = [], torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: reduces.append(1) or all_reduce(*a, **k)
    result = {}
    for order in ("preemption first", "guard first"):  # the order the features register in (and are listed)
        for case, signalled, nan in (("both", rank == 0, rank == 1), ("signal", rank == 1, False),
                                     ("nan", False, rank == 0), ("neither", False, False)):
            agreement, control, state = StepAgreement(), transformers.TrainerControl(), types.SimpleNamespace(
                global_step=3, max_steps=9)
            if order == "preemption first":
                preemption = PreemptionCallback(agreement)
                guard = NonFiniteGuard(args, ["a", "b"], agreement)
            else:
                guard = NonFiniteGuard(args, ["a", "b"], agreement)
                preemption = PreemptionCallback(agreement)
            preemption.on_train_begin(args, state, control)  # installs the signal handlers
            if signalled:
                os.kill(os.getpid(), signal.SIGUSR1)
            guard.note_loss(torch.tensor(float("nan") if nan else 2.5), {})
            guard.note_grad_norm(torch.tensor(1.0))
            control.should_save = control.should_evaluate = True  # a --save_steps/--eval_steps step
            del reduces[:]
            agreement.on_step_end(args, state, control)
            try:
                guard.on_epoch_end(args, state, control)
                diverged = False
            except Diverged:
                diverged = True
            result[f"{order}, {case}"] = {
                "reduces": len(reduces), "signal": preemption.signal, "stopped_at": preemption.stopped_at,
                "diverged": diverged, "save": control.should_save, "evaluate": control.should_evaluate,
                "stop": control.should_training_stop}
    print(json.dumps(result))
""")


def test_preemption_and_a_nonfinite_step_at_the_same_step_on_different_ranks(tmp_path):
    """Both step-end features of a run in one StepAgreement, 2 real gloo processes: SIGUSR1 on rank 0 and a NaN
    loss on rank 1 at the same step. Each rank learns both (one all-reduce), whatever order the features
    registered in: the run stops there, the preemption is recorded, and the diverged step is neither saved nor
    evaluated. Alone, each does what it does in a run."""
    usr1 = int(signal.SIGUSR1)
    expected = {
        "both": {"signal": usr1, "stopped_at": 3, "diverged": True, "save": False, "evaluate": False, "stop": True},
        "signal": {"signal": usr1, "stopped_at": 3, "diverged": False, "save": True, "evaluate": False, "stop": True},
        "nan": {"signal": 0, "stopped_at": None, "diverged": True, "save": False, "evaluate": False, "stop": True},
        "neither": {"signal": 0, "stopped_at": None, "diverged": False, "save": True, "evaluate": True,
                    "stop": False},
    }
    for rank, r in enumerate(two_ranks(BOTH, tmp_path)):
        for order in ("preemption first", "guard first"):
            for case, want in expected.items():
                assert r[f"{order}, {case}"] == {"reduces": 1, **want}, (rank, order, case, r[f"{order}, {case}"])


def test_fp16_overflow_steps_are_not_divergence_unless_they_never_end(tmp_path):
    """fp16 with dynamic loss scaling (GPU only, so the guard alone here): a step whose gradient overflows is
    skipped by the scaler, weights untouched; FP16_SKIP_LIMIT of them in a row stop the run, and so does a
    non-finite loss at once, with the bf16 advice."""
    import types

    import transformers

    from finetune_agreement import StepAgreement
    from finetune_faults import FP16_SKIP_LIMIT, NonFiniteGuard

    args = types.SimpleNamespace(device=torch.device("cpu"), fp16=True, world_size=1, learning_rate=1e-5,
                                 max_grad_norm=1.0, stop_on_nonfinite=True, output_dir=str(tmp_path))
    skipped = types.SimpleNamespace(step_was_skipped=True)  # what accelerate's optimizer wrapper says then

    def step(guard, n, loss=2.0, norm=float("inf")):
        control = transformers.TrainerControl()
        guard.note_loss(torch.tensor(loss), {})
        guard.note_grad_norm(torch.tensor(norm))
        guard.agreement.on_step_end(args, types.SimpleNamespace(global_step=n), control, optimizer=skipped)
        return control.should_training_stop

    def new_guard():
        agreement = StepAgreement()
        guard = NonFiniteGuard(args, ["data"], agreement)
        guard.agreement = agreement
        return guard

    guard = new_guard()
    assert not any(step(guard, n) for n in range(1, FP16_SKIP_LIMIT))  # the scaler finds its scale
    assert not step(guard, FP16_SKIP_LIMIT, norm=1.0)  # a good step: the count starts again
    assert not any(step(guard, n) for n in range(FP16_SKIP_LIMIT + 1, 2 * FP16_SKIP_LIMIT))
    assert step(guard, 2 * FP16_SKIP_LIMIT)
    assert f"the fp16 loss scaler skipped {FP16_SKIP_LIMIT} steps in a row" in guard.failure
    guard = new_guard()
    assert step(guard, 1, loss=float("nan"), norm=1.0)
    assert "the loss is nan" in guard.failure and "train with --bf16 True instead" in guard.failure


def test_diverging_run_on_two_processes_stops_every_rank(tiny_model, tmp_path):
    """finetune.sh, 2 processes, ZeRO-2 (DeepSpeed skips the overflowing steps itself, which would leave the
    run training nothing): every rank stops at the same step, finetune.sh exits 3, the line is printed once."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**ENV, "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"}
    cmd = ["bash", ROOT / "finetune.sh", "-m", tiny_model, "-d", DEMO, "-o", out, "--deepspeed", ZERO2,
           *args(tiny_model, out, cache, "--learning_rate", 1e5, "--per_device_train_batch_size", 2,
                 "--gradient_accumulation_steps", 1, "--warmup_steps", 0)[6:]]
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=600)
    assert proc.returncode == 3, proc.stdout[-4000:]
    line = error_line(proc.stdout)
    step = int(re.search(r"training diverged at step (\d+): the gradient norm is (nan|inf)", line).group(1))
    no_worker_traceback(proc.stdout)
    assert complete_steps(out) == list(range(2, step, 2)) and not (out / "model.safetensors").exists()
    assert not list(out.glob(f"checkpoint-{step}"))
    # the checkpoint size estimate of the free-space warning, against what DeepSpeed wrote
    assert_estimate(tiny_model, out / "checkpoint-2", deepspeed=str(ZERO2), stage=2)


# ---------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------

FAKE_DISK = textwrap.dedent('''
    """Test helper (tests/test_faults.py): FAKE_DISK_DIR behaves like a disk of FAKE_DISK_BYTES: torch.save and
    safetensors' save_file there raise ENOSPC once it is full (leaving the part that fit), disk_usage agrees."""
    import errno, os, shutil
    DIR, LIMIT = os.path.abspath(os.environ["FAKE_DISK_DIR"]), int(os.environ["FAKE_DISK_BYTES"])

    def used():
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(DIR) for f in fs)

    real_usage = shutil.disk_usage

    def disk_usage(path):
        if os.path.abspath(path).startswith(DIR):
            return shutil._ntuple_diskusage(LIMIT, used(), max(0, LIMIT - used()))
        return real_usage(path)

    shutil.disk_usage = disk_usage
    import safetensors.torch, torch

    def limited(save):
        def wrapped(obj, f, *args, **kwargs):
            save(obj, f, *args, **kwargs)
            if isinstance(f, (str, os.PathLike)) and os.path.abspath(f).startswith(DIR) and used() > LIMIT:
                with open(f, "r+b") as h:
                    h.truncate(max(0, os.path.getsize(f) - (used() - LIMIT)))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return wrapped

    torch.save, safetensors.torch.save_file = limited(torch.save), limited(safetensors.torch.save_file)
''')


class SmallDisk:
    """A file system of `size` bytes at `path`: a real tmpfs where this process may mount one (root), else the
    file-write layer faked (FAKE_DISK above, through sitecustomize) with the same effect on the saves."""

    def __init__(self, path, size):
        self.path, self.env = Path(path), {}
        self.path.mkdir(parents=True)
        self.tmpfs = not os.environ.get("FAKE_DISK") and subprocess.run(  # FAKE_DISK=1: try the fallback here
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
        if not self.tmpfs:
            site = self.path.parent / f"{self.path.name}-site"
            site.mkdir()
            (site / "sitecustomize.py").write_text(FAKE_DISK)
            self.env = {"PYTHONPATH": f"{site}:{ENV.get('PYTHONPATH', '')}", "FAKE_DISK_DIR": str(path),
                        "FAKE_DISK_BYTES": str(size)}

    def grow(self, size):
        if self.tmpfs:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)
        else:
            self.env["FAKE_DISK_BYTES"] = str(size)

    def close(self):
        if self.tmpfs:
            subprocess.run(["umount", str(self.path)], check=True)


@contextlib.contextmanager
def small_disk(path, size):
    disk = SmallDisk(path, size)
    try:
        yield disk
    finally:
        disk.close()


def checkpoint_size(tiny_model):
    """About one full fine-tuning checkpoint of the tiny model: weights, Adam's 2 moments, tokenizer."""
    return 3 * os.path.getsize(Path(tiny_model) / "model.safetensors") + 150_000


def assert_estimate(tiny_model, checkpoint, deepspeed=None, stage=0):
    """checkpoint_bytes (the free-space warning's estimate) against a checkpoint written by a real run."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    estimate = checkpoint_bytes(model, SimpleNamespace(deepspeed=deepspeed, optim="adamw_torch"), stage, False)[0]
    actual = sum(f.stat().st_size for f in Path(checkpoint).rglob("*") if f.is_file())
    assert 0.85 < estimate / actual < 1.2, (estimate, actual)


def test_full_disk_at_the_second_save_stops_clearly_and_the_rerun_resumes(tiny_model, tmp_path):
    one = checkpoint_size(tiny_model)
    with small_disk(tmp_path / "disk", int(1.5 * one)) as disk:
        out = disk.path / "out"
        command = args(tiny_model, out, tmp_path / "cache", "--learning_rate", 1e-3)
        proc = run_finetune(command, check=False, env=disk.env)
        assert proc.returncode == ExitCode.SAVE_FAILED == 74, proc.stdout[-4000:]
        line = error_line(proc.stdout)
        assert line.startswith(f"[finetune] error: saving checkpoint-4 to {out}/checkpoint-4 failed: no space "
                               "left on device ("), line
        for part in (f"The half-written checkpoint-4 was removed. {out}/checkpoint-2 is the newest complete "
                     "checkpoint: the same command resumes from it.", "free space there", "--save_total_limit",
                     "--output_dir"):
            assert part in line, (part, line)
        no_traceback(proc.stdout)
        assert "WARNING: --output_dir" not in proc.stdout  # one checkpoint fits: nothing to warn about
        assert complete_steps(out) == [2] and not (out / "checkpoint-4").exists()
        assert not (out / "model.safetensors").exists()
        assert_estimate(tiny_model, out / "checkpoint-2")

        disk.grow(20 * one)  # space freed: the same command resumes and finishes
        again = run_finetune(command, env=disk.env)
        assert f"resuming from {out}/checkpoint-2" in again.stdout
        assert (out / "model.safetensors").is_file() and complete_steps(out) == [2, 4, 6]


def test_less_space_than_one_checkpoint_is_said_before_training(tiny_model, tmp_path):
    with small_disk(tmp_path / "disk", int(0.6 * checkpoint_size(tiny_model))) as disk:
        out = disk.path / "out"
        proc = run_finetune(args(tiny_model, out, tmp_path / "cache", "--max_steps", 2), check=False, env=disk.env)
        warning = re.search(r"\[finetune\] WARNING: --output_dir \S+ has [\d.]+ [KM]B free, and one checkpoint of "
                            r"this run needs about ([\d.]+) MB: the first save will fail", proc.stdout)
        assert warning and proc.stdout.index(warning.group(0)) < proc.stdout.index("'loss'"), proc.stdout[-4000:]
        assert proc.returncode == 74 and "There is no complete checkpoint: the same command starts over" in \
            error_line(proc.stdout)
        assert not list(out.glob("checkpoint-*"))  # the half-written one removed


def test_full_disk_at_the_final_save_leaves_no_half_written_model(tiny_model, tmp_path):
    """No checkpoints (--save_strategy no), and the disk cannot hold the final model: said before training,
    then one line, exit 74, and no weight file that would look like a finished model."""
    with small_disk(tmp_path / "disk", int(0.6 * os.path.getsize(Path(tiny_model) / "model.safetensors"))) as disk:
        out = disk.path / "out"
        proc = run_finetune(args(tiny_model, out, tmp_path / "cache", "--max_steps", 2, "--save_strategy", "no"),
                            check=False, env=disk.env)
        assert "WARNING: --output_dir" in proc.stdout and "the final model of this run needs about" in proc.stdout
        assert proc.returncode == 74, proc.stdout[-4000:]
        line = error_line(proc.stdout)
        assert line.startswith(f"[finetune] error: saving the final model to {out} failed: no space left on device")
        assert "There is no complete checkpoint: the same command starts over" in line and "--output_dir" in line
        no_traceback(proc.stdout)
        assert not list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


def test_full_disk_while_caching_the_dataset(tiny_model, tmp_path):
    """The dataset cache cannot be written (a full tmpfs as root; else a file-size limit that the raw Arrow
    file exceeds): one line naming the cache folder and the command that clears it, exit 2, nothing left."""
    cache, limit = tmp_path / "disk" / "cache", None
    with small_disk(tmp_path / "disk", 12_000) as disk:
        if not disk.tmpfs:
            import resource

            limit = lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN),  # noqa: E731
                             resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)))
        proc = subprocess.run([sys.executable, ROOT / "finetune.py", *map(str, args(tiny_model, tmp_path / "out", cache,
                               "--dry_run", True))], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300, preexec_fn=limit)
        assert proc.returncode == 2, proc.stdout[-4000:]
        line = error_line(proc.stdout)
        assert f"writing the dataset cache in {cache} failed: " in line and f"rm -rf {cache}/*" in line, line
        assert "no space left on device" in line if disk.tmpfs else "file too large" in line, line
        no_traceback(proc.stdout)
        assert not list(cache.iterdir())  # the temporary folder of the failed build is gone


ULIMIT_RANK1 = 'if [ "$LOCAL_RANK" = 1 ]; then trap "" XFSZ; ulimit -f 400; fi; exec "$0" "$@"'


def test_a_save_failing_on_one_rank_ends_every_rank(tiny_model, tmp_path):
    """2 processes, ZeRO-3: rank 1's writes are cut short at 400 KB (its optimizer shard is larger), rank 0's
    succeed and it then loses rank 1 in the save's collectives. Both end with exit 74 and a line, no
    traceback; the half-written checkpoint-2 is removed; the next run (no limit) trains from the start."""
    from deepspeed.accelerator import get_accelerator

    # DeepSpeed compiles its CPU communication op on first use (again when another venv rebuilt the shared
    # ~/.cache/torch_extensions): built here, not by rank 1 under its file-size limit
    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = args(tiny_model, out, cache, "--learning_rate", 1e-3, "--per_device_train_batch_size", 2,
                   "--max_steps", 2, "--deepspeed", ZERO3, "--ddp_backend", "gloo")
    cmd = [*torchrun_cmd(2, free_port(), [])[:-1], "--no-python", "bash", "-c", ULIMIT_RANK1, sys.executable,
           str(ROOT / "finetune.py"), *map(str, command)]  # each worker: bash, which limits rank 1, then python
    codes = tmp_path / "exit-codes"  # what finetune.sh reads: torchrun itself exits 1 (and may SIGTERM a rank
    proc = subprocess.run(cmd, cwd=ROOT, env={**ENV, "FINETUNE_EXIT_CODE_FILE": str(codes)},  # that is exiting)
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode != 0 and codes.read_text().split() == ["74", "74"], proc.stdout[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[finetune] error:")]
    assert any("another process failed while writing it" in line for line in lines), lines
    assert any("a write was cut short" in line and "ulimit -f" in line for line in lines), lines
    assert all(f"saving checkpoint-2 to {out}/checkpoint-2 failed" in line for line in lines), lines
    no_worker_traceback(proc.stdout)
    assert not (out / "checkpoint-2").exists()

    again = subprocess.run(torchrun_cmd(2, free_port(), command), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=600)
    assert again.returncode == 0 and "resuming from" not in again.stdout, again.stdout[-4000:]
    assert complete_steps(out) == [2] and (out / "model.safetensors").is_file()
    assert_estimate(tiny_model, out / "checkpoint-2", deepspeed=str(ZERO3), stage=3)


# ---------------------------------------------------------------------------------------------
# Dataset cache
# ---------------------------------------------------------------------------------------------


def dry_run(tiny_model, tmp_path, data=DEMO, check=True, timeout=300):
    return run_finetune(["--model_name_or_path", tiny_model, "--data_path", data, "--output_dir", tmp_path / "out",
                         "--dataset_cache_dir", tmp_path / "cache", "--dry_run", True], check=check, timeout=timeout)


def the_entry(tmp_path):
    entries = [p for p in (tmp_path / "cache").iterdir() if ".tmp-" not in p.name]
    assert len(entries) == 1, entries
    return entries[0]


@contextlib.contextmanager
def read_only(folder):
    """`folder` cannot be changed: a read-only bind mount as root (root ignores permissions), else chmod."""
    if subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0:
        subprocess.run(["mount", "-o", "remount,ro,bind", folder, folder], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", folder], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [Path(folder), *Path(folder).rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


def test_damaged_cache_is_rebuilt_or_refused_with_the_command_that_clears_it(tiny_model, tmp_path, capsys):
    first = dry_run(tiny_model, tmp_path)
    entry = the_entry(tmp_path)
    arrow = next((entry / "data").glob("*.arrow"))
    size, report = arrow.stat().st_size, json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert check_cache_entry(entry) is None and "note: dataset cache" not in first.stdout

    def note(log):
        notes = re.findall(r"\[finetune\] note: dataset cache (\S+) was damaged \((.*)\); rebuilding it", log)
        assert len(notes) == 1 and notes[0][0] == str(entry), log[-3000:]
        assert check_cache_entry(entry) is None and arrow.stat().st_size == size  # rebuilt, complete again
        return notes[0][1]

    # an interrupted copy or a full disk cut the file (before: every later run crashed in pyarrow)
    os.truncate(arrow, size // 2)
    proc = dry_run(tiny_model, tmp_path)
    assert note(proc.stdout) == f"data/{arrow.name} has {size // 2:,} bytes, {size:,} when it was written"
    assert json.loads((tmp_path / "out" / "data_report.json").read_text()) == report
    no_traceback(proc.stdout)

    # a byte changed in place (same size), a manifest missing: the same, seen by build_dataset itself
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    data_args = finetune.DataArguments(data_path=str(DEMO), dataset_cache_dir=str(tmp_path / "cache"))
    training_args = finetune.TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")

    def build():
        capsys.readouterr()
        assert finetune.build_dataset(str(DEMO), tok, data_args, training_args, str(tmp_path / "cache")) == str(entry)
        return capsys.readouterr().out

    with open(arrow, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert note(build()) == f"data/{arrow.name} differs from what was written (checksum)"
    (entry / MANIFEST).unlink()
    assert note(build()) == f"no {MANIFEST}: it was not written to the end"
    assert "note:" not in build()  # and a sound entry is used as it is

    # damaged and it cannot be removed: refused, with the path and the command that clears it
    os.truncate(arrow, 100)
    with read_only(entry):
        proc = dry_run(tiny_model, tmp_path, check=False)
    assert proc.returncode == 2, proc.stdout[-3000:]
    line = error_line(proc.stdout)
    assert line.startswith(f"[finetune] error: dataset cache {entry} is damaged (data/{arrow.name} has 100 bytes")
    assert "cannot be rebuilt: removing it failed" in line and line.endswith(
        f"Clear it with: rm -rf {entry}  (or set --dataset_cache_dir to another folder)"), line
    no_traceback(proc.stdout)
    subprocess.run(["rm", "-rf", str(entry)], check=True)  # the command it gives
    dry_run(tiny_model, tmp_path)
    assert check_cache_entry(the_entry(tmp_path)) is None


def test_cache_of_a_run_killed_while_preprocessing_is_never_used(tiny_model, tmp_path):
    """SIGKILL while 12,000 conversations are tokenized (the entry is being written under a temporary name):
    no entry is left that looks complete, and the next run builds it anew (the same data as an undisturbed
    build), removing the killed run's leftover."""
    records = [json.loads(line) for line in DEMO.read_text().splitlines() if line.strip()]
    data = write_jsonl(tmp_path / "big.jsonl", [
        {"messages": records[i % 18]["messages"][:-1] + [
            {"role": "assistant", "content": f"{records[i % 18]['messages'][-1]['content']} ({i})"}]}
        for i in range(12_000)])
    cmd = [sys.executable, ROOT / "finetune.py", "--model_name_or_path", tiny_model, "--data_path", data,
           "--output_dir", tmp_path / "out", "--dataset_cache_dir", tmp_path / "cache", "--dry_run", True]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while not list((tmp_path / "cache").glob("*.tmp-*/raw/**/*.arrow")):  # preprocessing has begun
            assert proc.poll() is None and time.time() < deadline, "preprocessing ended before the kill"
            time.sleep(0.01)
        time.sleep(0.5)  # into it
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = list((tmp_path / "cache").iterdir())
    assert left and all(".tmp-" in p.name for p in left), left  # only a temporary folder: never trusted

    done = dry_run(tiny_model, tmp_path, data=data, timeout=600)
    assert "note: dataset cache" not in done.stdout  # nothing was there to be damaged: just built
    entry = the_entry(tmp_path)
    assert list((tmp_path / "cache").iterdir()) == [entry]  # the killed run's leftover is gone
    assert check_cache_entry(entry) is None
    report = json.loads((entry / "report.json").read_text())
    assert report["samples"] == 12_000 and report["invalid"] == {}
