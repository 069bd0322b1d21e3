"""Multi-process correctness under DeepSpeed ZeRO-2/3, proven with real torchrun processes on CPU (gloo).

Every test launches `python -m torch.distributed.run` (or finetune.sh) exactly as a user would and checks
the files it leaves behind, tensor by tensor. CPU time is scarce, so each run serves several checks:

  ZeRO-3 full:  1 process x batch 4 (reference) | 2 processes x batch 2, kill -9 after checkpoint-2,
                a half-written checkpoint-4 left behind, re-run the same command -> resumes from
                checkpoint-2 and ends equal to the reference (layout + resume); the consolidated
                model.safetensors equals DeepSpeed's own fp32 partitions; save_total_limit keeps it.
  LoRA:         ZeRO-2 1 x 4 (reference) | ZeRO-2 2 x 2 (layout) | ZeRO-3 2 x 2 killed and resumed;
                adapters complete, equal to the optimizer's weights, and reproduce the trained logits.
  Q-LoRA:       ZeRO-2 trains; ZeRO-3 stops before loading anything, naming ds_config_zero2.json.
  Multi-node:   finetune.sh, NNODES=2 on 127.0.0.1, ZeRO-3, lr 0 -> saved weights == initial, bit for bit.
  Faults:       bad data / missing file / unknown flag / Q-LoRA+ZeRO-3: every rank exits 2, promptly.
"""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ENV, ROOT, write_jsonl

DEMO = ROOT / "examples" / "demo_data.jsonl"  # 18 conversations, 2 sources
ZERO2, ZERO3 = ROOT / "ds_config_zero2.json", ROOT / "ds_config_zero3.json"
# Same result, any layout (fp32 on CPU): 2 ranks x batch 2 and 1 rank x batch 4 differ only in summation
# order. Stated tolerance: every logged loss and grad_norm within 1e-5 relative (these carry the
# step-wide token normalisation, which Adam's scale invariance would hide in the weights), and every
# weight within 2.5% of one Adam step (0.025 * lr): Adam divides by sqrt(v), so an element whose gradient
# is ~0 turns rounding noise into a visible step. Measured: losses/grad norms ~1e-7 relative; weights
# 4e-7 (full, lr 1e-3) and 4e-5 in 1 of 8192 LoRA elements, the rest < 2e-6 (lr 1e-2).
REL_TOL, STEP_TOL = 1e-5, 0.025


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc, port, args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port), str(ROOT / "finetune.py"), *map(str, args)]


def torchrun(nproc, args, timeout=300, check=True):
    proc = subprocess.run(torchrun_cmd(nproc, free_port(), args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc.stdout


def train_args(model, out, cache, *extra, per_device=2, deepspeed=ZERO3):
    """4 optimizer steps over the demo data in a fixed random order, a checkpoint every 2 steps."""
    return ["--model_name_or_path", model, "--data_path", DEMO, "--output_dir", out,
            "--dataset_cache_dir", cache, "--deepspeed", deepspeed, "--ddp_backend", "gloo",
            "--per_device_train_batch_size", per_device, "--max_steps", 4, "--save_steps", 2,
            "--save_total_limit", 1, "--logging_steps", 1, "--seed", 0,
            # group_by_length groups by per-device batch size by design; random order is layout-free
            "--train_sampling_strategy", "random", *extra]


def kill_after_checkpoint(cmd, out, step=2, timeout=300):
    """Start a run, SIGKILL all its processes as soon as checkpoint-`step` is complete: torchrun and its
    workers (which torchrun starts in sessions of their own), like a machine that dies."""
    import psutil

    log = open(f"{out}.killed.log", "w")  # a file, not a pipe nobody reads while it runs
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    marker = Path(out) / f"checkpoint-{step}" / "trainer_state.json"  # Trainer writes it last
    deadline = time.time() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None, f"run ended before checkpoint-{step}:\n{open(log.name).read()[-4000:]}"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:
        everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in everyone:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(everyone, timeout=30)
        proc.wait()
        log.close()
    assert len(everyone) >= 3, everyone  # torchrun, 2 workers (and whatever they started)
    assert not (Path(out) / f"checkpoint-{step + 2}" / "trainer_state.json").exists(), "killed too late"


def fake_crash_during_save(out, complete=2, crashed=4):
    """What a crash while saving checkpoint-`crashed` leaves: weights and shards, no trainer_state.json."""
    half = Path(out) / f"checkpoint-{crashed}"
    shutil.rmtree(half, ignore_errors=True)
    shutil.copytree(Path(out) / f"checkpoint-{complete}", half)
    (half / "trainer_state.json").unlink()
    return half


def zero_fp32(checkpoint):
    """The trained weights as DeepSpeed's optimizer holds them (fp32 partitions of every rank)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))


def max_diff(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, (k, a[k].shape, b[k].shape)
    return max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a)


def assert_same_training(out, ref, weights, ref_weights, lr, what):
    """`out` trained like `ref`: the same per-step losses and gradient norms, and the same weights."""
    def history(d):
        return [(h["step"], h["loss"], h["grad_norm"]) for h in
                json.loads((Path(d) / "trainer_state.json").read_text())["log_history"] if "loss" in h]

    ours, theirs = history(out), history(ref)
    assert [h[0] for h in ours] == [h[0] for h in theirs] == [1, 2, 3, 4], (ours, theirs)
    for (step, loss, norm), (_, ref_loss, ref_norm) in zip(ours, theirs):
        assert abs(loss - ref_loss) <= REL_TOL * abs(ref_loss), (what, step, loss, ref_loss)
        assert abs(norm - ref_norm) <= REL_TOL * abs(ref_norm), (what, step, norm, ref_norm)
    diff = max_diff(weights, ref_weights)
    print(f"{what}: max |weight diff| {diff:.2e} (tolerance {STEP_TOL * lr:.1e}), max loss diff "
          f"{max(abs(a[1] - b[1]) for a, b in zip(ours, theirs)):.1e}")
    assert diff <= STEP_TOL * lr, what


def assert_resumed_and_rotated(log, out):
    assert re.search(r"resuming from \S*checkpoint-2\b", log), log[-3000:]
    assert sorted(p.name for p in Path(out).glob("checkpoint-*")) == ["checkpoint-4"]  # limit 1
    assert (Path(out) / "checkpoint-4" / "trainer_state.json").is_file()
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def assert_logged_once(log, bar=True):
    """Rank 0 alone logs: our lines, the Trainer's metrics and its progress bar (rendered from 0/4 once)."""
    for line in ("[finetune] data:", "[finetune] method:", "[finetune] done:", "'train_runtime'"):
        assert log.count(line) == 1, (line, log.count(line))
    assert not bar or (log.count("| 0/4 [") == 1 and "| 4/4 [" in log), log[-3000:]


def load_logits(model_path, adapter=None, state=None, ids=None):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    elif state is not None:  # a fresh LoRA model with the optimizer's weights: the trained model
        model = get_peft_model(model, LoraConfig.from_pretrained(state[0]))
        result = model.load_state_dict(state[1], strict=False)
        assert not result.unexpected_keys, result.unexpected_keys[:3]
        assert not [k for k in result.missing_keys if "lora_" in k], "LoRA weights missing"
    with torch.no_grad():
        return model.eval()(ids).logits


def check_adapter(out, checkpoint, model_path):
    """adapter_model.safetensors: every LoRA matrix of every target module, right shapes, equal to what
    DeepSpeed trained, and PeftModel.from_pretrained reproduces the trained model's logits."""
    from transformers import AutoConfig

    config = json.loads((Path(out) / "adapter_config.json").read_text())
    adapter = load_file(Path(out) / "adapter_model.safetensors")
    base = AutoConfig.from_pretrained(model_path)
    r, h, inter = config["r"], base.hidden_size, base.intermediate_size
    kv = base.num_key_value_heads * (h // base.num_attention_heads)
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}  # (in, out)
    assert len(adapter) == 2 * len(dims) * base.num_hidden_layers, sorted(adapter)[:4]
    for key, tensor in adapter.items():
        d_in, d_out = dims[key.split(".lora_")[0].rsplit(".", 1)[1]]
        assert tuple(tensor.shape) == ((r, d_in) if ".lora_A." in key else (d_out, r)), (key, tensor.shape)
    trained = zero_fp32(checkpoint)
    lora = {k.replace(".default.", "."): v for k, v in trained.items() if "lora_" in k}
    assert max_diff(adapter, lora) == 0.0, "saved adapter != trained weights"
    assert float(max(t.abs().max() for k, t in adapter.items() if "lora_B" in k)) > 1e-3, "nothing trained"

    ids = torch.randint(3, base.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    loaded = load_logits(model_path, adapter=out, ids=ids)
    reference = load_logits(model_path, state=(out, trained), ids=ids)
    assert torch.allclose(loaded, reference, atol=1e-6, rtol=0), float((loaded - reference).abs().max())
    assert (loaded - load_logits(model_path, ids=ids)).abs().max() > 1e-3, "adapter changes nothing"
    return adapter


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dataset-cache")


def test_find_resume_checkpoint_skips_half_written(tmp_path):
    """Newest *complete* checkpoint by step number (10 > 9); half-written ones are removed."""
    from types import SimpleNamespace

    from finetune import find_resume_checkpoint

    def make(step, files, ds_latest=True):
        d = tmp_path / f"checkpoint-{step}"
        (d / f"global_step{step}").mkdir(parents=True)
        for f in files + (["latest"] if ds_latest else []):
            (d / f).write_text("x")
        return d

    make(9, ["model.safetensors", "trainer_state.json"])
    make(10, ["adapter_model.safetensors", "trainer_state.json"])
    make(11, ["model.safetensors"])  # crashed before trainer_state.json
    make(12, ["trainer_state.json"])  # no weights
    make(13, ["model.safetensors", "trainer_state.json"], ds_latest=False)  # shards without `latest`
    args = SimpleNamespace(resume_from_checkpoint=None, output_dir=str(tmp_path), process_index=0)
    assert find_resume_checkpoint(args) == str(tmp_path / "checkpoint-10")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-9"]
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-11")
    with pytest.raises(FileNotFoundError):
        find_resume_checkpoint(args)


def assert_cosine_schedule(out, peak):
    """The DeepSpeed configs have no scheduler block, so --lr_scheduler_type is what runs (Qwen's configs
    forced WarmupLR, which holds the rate constant after warmup)."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = get_cosine_schedule_with_warmup(optimizer, 1, 4)
    expected = []
    for _ in range(4):  # Trainer logs the rate each step ran with, i.e. before its scheduler step
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [h["learning_rate"] for h in history if "learning_rate" in h]
    assert logged == pytest.approx(expected[: len(logged)], rel=1e-6) and len(logged) == 4, (logged, expected)


@pytest.mark.slow  # its kinds run by default: ZeRO-3 resume (test_preemption), kill -9 and half-written saves
def test_zero3_full_save_layout_and_resume(tiny_model, tmp_path, cache):
    ref, out = tmp_path / "ref", tmp_path / "run"
    lr = ["--learning_rate", 1e-3, "--lr_scheduler_type", "cosine", "--warmup_steps", 1]
    torchrun(1, train_args(tiny_model, ref, cache, *lr, per_device=4))
    cmd = torchrun_cmd(2, free_port(), train_args(tiny_model, out, cache, *lr))
    kill_after_checkpoint(cmd, out)
    fake_crash_during_save(out)
    log = torchrun(2, train_args(tiny_model, out, cache, *lr))  # the same command again
    assert_resumed_and_rotated(log, out)
    assert_logged_once(log, bar=False)  # a resumed bar does not start at 0/4

    saved = load_file(out / "model.safetensors")
    initial = load_file(Path(tiny_model) / "model.safetensors")
    # consolidated ZeRO-3 save == the gathered fp32 partitions, every tensor complete
    assert max_diff(saved, zero_fp32(out / "checkpoint-4")) == 0.0
    assert max_diff(saved, initial) > 1e-3, "nothing was trained"
    # killed + resumed 2 x 2 == uninterrupted 1 x 4
    assert_same_training(out, ref, saved, load_file(ref / "model.safetensors"), 1e-3,
                         "ZeRO-3 full, 2x2 killed+resumed vs 1x4")
    assert_cosine_schedule(ref, 1e-3)


# slow: LoRA under ZeRO-3 on 2 processes is trained and saved in test_moe's ZeRO-3 run and test_loss_memory's (LoRA
# on lm_head, against 1 process); kill + resume under ZeRO-3 in test_zero3_full_save_layout_and_resume
@pytest.mark.slow
def test_lora_zero2_zero3_adapters_layout_and_resume(tiny_model, tmp_path, cache):
    lora = ["--use_lora", "--lora_r", 4, "--lora_dropout", 0, "--learning_rate", 1e-2]
    ref, z2, z3 = tmp_path / "ref", tmp_path / "z2", tmp_path / "z3"
    torchrun(1, train_args(tiny_model, ref, cache, *lora, per_device=4, deepspeed=ZERO2))
    assert_logged_once(torchrun(2, train_args(tiny_model, z2, cache, *lora, deepspeed=ZERO2)))
    kill_after_checkpoint(torchrun_cmd(2, free_port(), train_args(tiny_model, z3, cache, *lora)), z3)
    fake_crash_during_save(z3)
    log = torchrun(2, train_args(tiny_model, z3, cache, *lora))
    assert_resumed_and_rotated(log, z3)

    reference = load_file(ref / "adapter_model.safetensors")
    for name, out in (("ZeRO-2 2x2", z2), ("ZeRO-3 2x2 killed+resumed", z3)):
        adapter = check_adapter(out, out / "checkpoint-4", tiny_model)
        assert_same_training(out, ref, adapter, reference, 1e-2, f"LoRA {name} vs ZeRO-2 1x4")


def test_qlora_zero2_trains_and_zero3_is_refused(tiny_model, tmp_path, cache):
    out = tmp_path / "qlora"
    args = ["--model_name_or_path", tiny_model, "--data_path", DEMO, "--output_dir", out, "--dataset_cache_dir",
            cache, "--ddp_backend", "gloo", "--q_lora", "--lora_r", 4, "--max_steps", 2,
            "--per_device_train_batch_size", 2, "--save_strategy", "no", "--learning_rate", "1e-2"]
    # ZeRO-3 first: refused by validation, before any data or model is loaded, on every rank
    proc = subprocess.run(torchrun_cmd(2, free_port(), args + ["--deepspeed", ZERO3]), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode != 0 and "ds_config_zero2.json" in proc.stdout, proc.stdout[-3000:]
    assert "[finetune] data:" not in proc.stdout and not out.exists()

    log = torchrun(2, args + ["--deepspeed", ZERO2])
    assert "method: q-lora" in log
    adapter = load_file(out / "adapter_model.safetensors")
    assert len(adapter) == 28 and all(t.numel() > 0 for t in adapter.values())
    assert max(float(t.abs().max()) for k, t in adapter.items() if "lora_B" in k) > 0


def test_two_nodes_zero3_lr0_saves_initial_weights(tiny_model, tmp_path, cache):
    """finetune.sh on two simulated nodes (1 process each) on 127.0.0.1: with learning rate 0 the
    consolidated ZeRO-3 save must equal the initial weights bit for bit. Node 1 is given its own
    --output_dir: it must stay empty, because only global rank 0 writes the model and results."""
    out, port = tmp_path / "out", free_port()
    args = ["-m", tiny_model, "-d", DEMO, "--deepspeed", ZERO3, "--max_steps", 2,
            "--gradient_accumulation_steps", 1, "--learning_rate", 0, "--save_strategy", "no",
            "--dataset_cache_dir", cache, "--logging_steps", 1]
    nodes = [subprocess.Popen(["bash", str(ROOT / "finetune.sh"), "-o", str(tmp_path / f"out{rank or ''}"),
                               *map(str, args)], cwd=tmp_path,
                              env={**ENV, "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": str(port), "GPUS_PER_NODE": "1",
                                   "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    for rank, (p, log) in enumerate(zip(nodes, logs)):
        assert p.returncode == 0, f"node {rank}:\n{log[-4000:]}"
    assert "2 per device x 2 processes" in logs[0] and "[finetune]" not in logs[1]
    assert "--nnodes 2 --node_rank 1 --master_addr 127.0.0.1" in logs[1]
    assert not [p for p in (tmp_path / "out1").rglob("*") if p.is_file()], "rank 1 wrote files"
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    saved, initial = load_file(out / "model.safetensors"), load_file(Path(tiny_model) / "model.safetensors")
    assert saved.keys() == initial.keys()
    for k in initial:
        assert saved[k].dtype == initial[k].dtype and torch.equal(saved[k], initial[k]), k


def test_finetune_sh_topology_from_slurm_and_env(tmp_path):
    def command(**env):
        base = {k: v for k, v in ENV.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_"))}
        proc = subprocess.run(["bash", str(ROOT / "finetune.sh"), "-d", "x.jsonl", "--max_steps", "1"],
                              env={**base, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
                                   "FINETUNE_PRINT_CMD": "1", **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert not shutil.which("scontrol", path=f"{Path(sys.executable).parent}:/usr/bin:/bin")
    cmd = command(SLURM_JOB_NODELIST="gpu[07-10,12],cpu01", SLURM_NNODES="5", SLURM_NODEID="3", GPUS_PER_NODE="4")
    assert "--nproc_per_node 4 --nnodes 5 --node_rank 3 --master_addr gpu07 --master_port 6001" in cmd
    assert cmd.rstrip().endswith("--max_steps 1") and "--ddp_backend gloo" in cmd  # CPU: gloo
    cmd = command(SLURM_JOB_NODELIST="node-a,node-b", SLURM_NNODES="2", SLURM_NODEID="0", MASTER_PORT="7000")
    assert "--nproc_per_node 1 --nnodes 2 --node_rank 0 --master_addr node-a --master_port 7000" in cmd
    # explicit topology wins over SLURM
    cmd = command(SLURM_JOB_NODELIST="n[1-2]", SLURM_NNODES="2", NNODES="3", NODE_RANK="2", MASTER_ADDR="10.0.0.1")
    assert "--nnodes 3 --node_rank 2 --master_addr 10.0.0.1" in cmd


def test_bad_input_stops_every_rank_promptly(tiny_model, tmp_path, cache):
    """Bad data (found by rank 0 alone and broadcast), a missing file, an unknown flag, bad --retention_data, an
    --output_dir that only rank 0 checks: every rank exits with code 2 on its own, within seconds, and records it
    for finetune.sh (FINETUNE_EXIT_CODE_FILE), the rank that stops quietly too. The two ranks are started the way
    torchrun starts them (env RANK/WORLD_SIZE/MASTER_*) but without torchrun, which would kill a hung rank and
    hide the hang."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "{not json",
    ])
    base = ["--model_name_or_path", tiny_model, "--output_dir", tmp_path / "out", "--dataset_cache_dir", cache,
            "--deepspeed", ZERO3, "--ddp_backend", "gloo", "--max_steps", 1]
    cases = {
        "bad data": (["--data_path", bad], "bad.jsonl:2: json: invalid JSON"),
        "missing file": (["--data_path", tmp_path / "missing.jsonl"], "missing.jsonl does not exist"),
        "unknown flag": (["--data_path", DEMO, "--no_such_flag", 1], "--no_such_flag"),
        "bad retention data": (["--data_path", DEMO, "--retention_data", bad], "bad.jsonl:2: json: invalid JSON"),
        # rank 0 alone checks that it can write there: rank 1 hears it from rank 0 (stop_together)
        "output dir is a file": (["--data_path", DEMO, "--output_dir", bad], "is a file, not a folder"),
    }
    start, procs = time.time(), {}
    for name, (extra, _) in cases.items():
        port = free_port()
        for rank in (0, 1):
            env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "FINETUNE_EXIT_CODE_FILE": str(tmp_path / f"codes-{name.replace(' ', '-')}")}
            procs[name, rank] = subprocess.Popen([sys.executable, ROOT / "finetune.py", *map(str, base + extra)],
                                                 cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True)
    logs = {}
    try:
        for (name, rank), proc in procs.items():
            logs[name, rank] = proc.communicate(timeout=max(1, 180 - (time.time() - start)))[0]
            assert proc.returncode == 2, (name, rank, proc.returncode, logs[name, rank][-3000:])
    except subprocess.TimeoutExpired:
        raise AssertionError(f"hung: {[key for key, p in procs.items() if p.poll() is None]}") from None
    finally:
        for proc in procs.values():
            proc.kill()
    print(f"bad input: all {len(procs)} ranks exited with code 2 in {time.time() - start:.0f} s")
    for name, (_, message) in cases.items():
        assert message in logs[name, 0], (name, logs[name, 0][-3000:])
        recorded = (tmp_path / f"codes-{name.replace(' ', '-')}").read_text().split()
        assert recorded == ["2", "2"], (name, recorded)  # every rank's exit went through exit_when_done
    # rank 0 alone found the bad line (the unwritable folder) and reports it; rank 1 stops quietly; nothing trained
    for name in ("bad data", "output dir is a file"):
        assert cases[name][1] not in logs[name, 1], logs[name, 1][-3000:]
    assert "[finetune] data:" not in logs["bad data", 0] and not (tmp_path / "out").exists()
