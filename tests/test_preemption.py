"""Preemption and elastic resume, with real torchrun processes on CPU (gloo, DeepSpeed ZeRO-2/3).

  Signal:   SIGUSR1 to ONE worker (rank 1) or SIGTERM to finetune.sh at an arbitrary step of a 2-process
            ZeRO-3 run -> every rank stops after the same step, checkpoint-N is complete, exit code 75 and
            "preempted ... checkpoint-N written" once; the same command again resumes and ends with exactly
            the weights of a run that was never interrupted (full and LoRA). A signal that arrives after
            the last step changes nothing: exit 0, no second checkpoint.
  Elastic:  a checkpoint written by 2 processes resumes on 1 and one written by 1 resumes on 2 (ZeRO-3 and
            ZeRO-2, optimizer state kept through DeepSpeed's universal format, gradient accumulation scaled
            to keep the global batch) and trains like the run that never changed size (ZeRO-3 measured bit
            for bit, ZeRO-2 to 1e-8; asserted: losses 1e-5 relative, weights 2.5% of one Adam step).
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ENV, ROOT, write_jsonl
from finetune_checkpoints import checkpoint_is_complete
from finetune_exit_codes import ExitCode
from test_distributed import (
    DEMO,
    REL_TOL,
    STEP_TOL,
    ZERO2,
    ZERO3,
    assert_same_training,
    free_port,
    max_diff,
    train_args,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dataset-cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """72 conversations (the demo data 4 times): 18 optimizer steps of 4 in the first epoch, so every
    run below stays inside one epoch, where the data position is layout-free."""
    records = [json.loads(line) for line in DEMO.read_text().splitlines() if line.strip()] * 4
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", records)


def finetune_sh(model, data, out, cache, *extra, nproc=2):
    """The user's command: finetune.sh with nproc processes x 2 sequences, 8 steps, no scheduled save before
    the end (save_steps 8), lr 1e-3 with warmup and cosine decay."""
    env = {**ENV, "GPUS_PER_NODE": str(nproc), "MASTER_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"}
    args = ["-m", model, "-d", data, "-o", out, "--deepspeed", ZERO3, "--dataset_cache_dir", cache,
            "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 1, "--max_steps", 8,
            "--save_steps", 8, "--logging_steps", 1, "--seed", 0, "--train_sampling_strategy", "random",
            "--learning_rate", 1e-3, "--warmup_steps", 1, "--disable_tqdm", True, *extra]
    return ["bash", str(ROOT / "finetune.sh"), *map(str, args)], env


def run(cmd_env, timeout=300):
    proc = subprocess.run(cmd_env[0], cwd=ROOT, env=cmd_env[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout


def signal_during_run(cmd_env, log_path, sig, target, after_steps=None, after_file=None, timeout=300):
    """Start the command, wait until `after_steps` steps are logged (or `after_file` exists), then send `sig`
    to `target`: "launcher" (finetune.sh itself, as SLURM or Kubernetes do) or "rank1" (one worker only).
    Returns (exit code, log, seconds from signal to exit, mtime of `after_file` at the signal or None if the
    run had already ended by then)."""
    import psutil

    log = open(log_path, "w")
    proc = subprocess.Popen(cmd_env[0], cwd=ROOT, env=cmd_env[1], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not (Path(after_file).exists() if after_file else
                   Path(log_path).read_text().count("{'loss'") >= after_steps):
            assert proc.poll() is None, f"ended before the signal:\n{Path(log_path).read_text()[-4000:]}"
            assert time.time() < deadline, "no progress in time"
            time.sleep(0.02)
        launchers = ("torch.distributed.run", "finetune_launch.py")  # finetune.sh starts torchrun as the latter
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "finetune.py" in " ".join(p.cmdline()) and not any(x in " ".join(p.cmdline()) for x in launchers)]
        victim = psutil.Process(proc.pid) if target == "launcher" else max(workers, key=lambda p: p.pid)
        if target == "rank1":
            assert "LOCAL_RANK" in victim.environ() and victim.environ()["LOCAL_RANK"] == "1", victim.environ()
        alive = after_file and proc.poll() is None and Path(after_file).stat().st_mtime_ns
        sent = time.time()
        victim.send_signal(sig)
        code = proc.wait(timeout=timeout)
        return code, Path(log_path).read_text(), time.time() - sent, alive
    finally:
        if proc.poll() is None:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                p.kill()
        log.close()


def assert_preempted(code, log, out, sig_name):
    """Exit 75, one "preempted" line from rank 0, and the checkpoint it names is complete and at a step
    between the first logged one and the end."""
    assert code == ExitCode.PREEMPTED, (code, log[-4000:])
    lines = re.findall(rf"\[finetune\] preempted \({sig_name}\), checkpoint-(\d+) written", log)
    assert len(lines) == 1, log[-4000:]
    step = int(lines[0])
    assert 2 <= step < 8, step
    checkpoint = Path(out) / f"checkpoint-{step}"
    assert checkpoint_is_complete(str(checkpoint))
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert sorted(p.name for p in Path(out).glob("checkpoint-*")) == [checkpoint.name]
    assert len(list((checkpoint / f"global_step{step}").glob("*_optim_states.pt"))) == 2  # both ranks' shards
    assert not (Path(out) / "model.safetensors").exists(), "a preempted run must not look finished"
    return step


def test_sigusr1_to_one_rank_zero3_saves_and_resumes_exactly(tiny_model, data, tmp_path, cache):
    """SIGUSR1 reaches rank 1 only (as when a node is told first): both ranks still stop after the same
    step (the flag is all-reduced), or rank 0 would wait in a ZeRO-3 gather forever."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    code, log = run(finetune_sh(tiny_model, data, ref, cache))
    assert code == 0, log[-4000:]
    code, log, seconds, _ = signal_during_run(finetune_sh(tiny_model, data, out, cache), f"{out}.log",
                                              signal.SIGUSR1, "rank1", after_steps=2)
    step = assert_preempted(code, log, out, "SIGUSR1")
    print(f"SIGUSR1 to rank 1: checkpoint-{step} written, exit {code} {seconds:.1f} s after the signal")
    shutil.copytree(out, tmp_path / "on1")
    code, log = run(finetune_sh(tiny_model, data, out, cache))  # the same command again
    assert code == 0 and re.search(rf"resuming from \S*checkpoint-{step}\b", log), log[-4000:]
    reference = load_file(ref / "model.safetensors")
    assert max_diff(load_file(out / "model.safetensors"), reference) == 0.0, "resumed != uninterrupted"
    assert history(out) == history(ref) and len(history(ref)) == 8

    # requeued on fewer GPUs: the same command with 1 process resumes the 2-process checkpoint (universal
    # conversion, accumulation 2 keeps the global batch 4) and trains like the uninterrupted run
    code, log = run(finetune_sh(tiny_model, data, tmp_path / "on1", cache, nproc=1))
    assert code == 0 and "global batch 4 kept with gradient_accumulation_steps 2" in log, log[-4000:]
    assert_same_history(tmp_path / "on1", ref, load_file(tmp_path / "on1" / "model.safetensors"), reference,
                        1e-3, f"preempted at step {step} on 2 processes, resumed on 1")


def assert_same_history(out, ref, weights, ref_weights, lr, what):
    """As test_distributed.assert_same_training, for any number of steps."""
    ours, theirs = history(out), history(ref)
    assert [h[0] for h in ours] == [h[0] for h in theirs], (ours, theirs)
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(ours, theirs):
        assert abs(loss - ref_loss) <= REL_TOL * abs(ref_loss), (what, step, loss, ref_loss)
        assert abs(norm - ref_norm) <= REL_TOL * abs(ref_norm), (what, step, norm, ref_norm)
    diff = max_diff(weights, ref_weights)
    print(f"{what}: max |weight diff| {diff:.2e} (tolerance {STEP_TOL * lr:.1e})")
    assert diff <= STEP_TOL * lr, what


def history(out):
    return [(h["step"], h["loss"], h["grad_norm"]) for h in
            json.loads((Path(out) / "trainer_state.json").read_text())["log_history"] if "loss" in h]


@pytest.mark.slow
def test_sigterm_to_launcher_lora_zero3_and_after_the_last_step(tiny_model, data, tmp_path, cache):
    """SIGTERM to finetune.sh (what SLURM and Kubernetes send): torchrun forwards it to every rank. LoRA
    adapter after resume == uninterrupted. Then, in the resumed run, SIGTERM after the last step's
    checkpoint: the run just finishes (exit 0), nothing is saved twice."""
    lora = ["--use_lora", "--lora_r", 4, "--lora_dropout", 0, "--learning_rate", 1e-2]
    ref, out = tmp_path / "ref", tmp_path / "run"
    code, log = run(finetune_sh(tiny_model, data, ref, cache, *lora))
    assert code == 0, log[-4000:]
    code, log, seconds, _ = signal_during_run(finetune_sh(tiny_model, data, out, cache, *lora), f"{out}.log",
                                              signal.SIGTERM, "launcher", after_steps=3)
    step = assert_preempted(code, log, out, "SIGTERM")
    print(f"SIGTERM to finetune.sh: checkpoint-{step} written, exit {code} {seconds:.1f} s after the signal")

    last = out / "checkpoint-8" / "trainer_state.json"
    code, log, _, mtime = signal_during_run(finetune_sh(tiny_model, data, out, cache, *lora), f"{out}.2.log",
                                            signal.SIGTERM, "launcher", after_file=last)
    assert mtime and code == 0, (mtime, code, log[-4000:])
    assert "preempted" not in log and "[finetune] done:" in log, log[-4000:]
    assert json.loads(last.read_text())["global_step"] == 8 and last.stat().st_mtime_ns == mtime  # not resaved
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted({f"checkpoint-{step}", "checkpoint-8"})
    adapter = load_file(out / "adapter_model.safetensors")
    assert max_diff(adapter, load_file(ref / "adapter_model.safetensors")) == 0.0, "resumed LoRA != uninterrupted"


def elastic_resume(model, tmp_path, cache, deepspeed, saved_by, resumed_by):
    """A: `saved_by` processes, 4 steps, checkpoints at 2 and 4. B: A's checkpoint-2 alone, the same command
    on `resumed_by` processes (per-device batch 2, so gradient accumulation goes 1 <-> 2)."""
    a, b = tmp_path / "a", tmp_path / "b"
    extra = ["--learning_rate", 1e-3, "--save_total_limit", 3, "--gradient_accumulation_steps", 2 // saved_by]

    def torchrun(nproc, out):
        from test_distributed import torchrun as launch

        return launch(nproc, train_args(model, out, cache, *extra, deepspeed=deepspeed))

    torchrun(saved_by, a)
    shutil.copytree(a / "checkpoint-2", b / "checkpoint-2")
    log = torchrun(resumed_by, b)
    assert f"resuming on {resumed_by} processes instead of {saved_by}: global batch 4 kept with " \
           f"gradient_accumulation_steps {2 // resumed_by}" in log, log[-4000:]
    assert (b / "checkpoint-2" / "latest_universal").is_file()
    assert f"global batch size 4 = 2 per device x {resumed_by} processes" in log
    assert_same_training(b, a, load_file(b / "model.safetensors"), load_file(a / "model.safetensors"), 1e-3,
                         f"ZeRO-{deepspeed.stem[-1]} {saved_by} -> {resumed_by} processes")
    # the resumed run's own checkpoints are ordinary ones for its new size
    assert len(list((b / "checkpoint-4" / "global_step4").glob("*_optim_states.pt"))) == resumed_by


@pytest.mark.slow  # the preemption test above resumes a 2-process ZeRO-3 checkpoint on 1 process too
def test_zero3_checkpoint_of_2_processes_resumes_on_1(tiny_model, tmp_path, cache):
    elastic_resume(tiny_model, tmp_path, cache, ZERO3, 2, 1)


@pytest.mark.slow
def test_zero3_checkpoint_of_1_process_resumes_on_2(tiny_model, tmp_path, cache):
    elastic_resume(tiny_model, tmp_path, cache, ZERO3, 1, 2)


@pytest.mark.slow
def test_zero2_checkpoint_of_2_processes_resumes_on_1(tiny_model, tmp_path, cache):
    elastic_resume(tiny_model, tmp_path, cache, ZERO2, 2, 1)


@pytest.mark.slow
def test_zero2_checkpoint_of_1_process_resumes_on_2(tiny_model, tmp_path, cache):
    elastic_resume(tiny_model, tmp_path, cache, ZERO2, 1, 2)
