"""Shared fixtures: a tiny random Qwen2 model + BPE tokenizer built locally (no hub), and helpers to
run finetune.py as a user would (a real subprocess, real files)."""

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

# Two cores on CI: keep every process single-threaded so parallel ranks do not oversubscribe.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a saved tiny model + tokenizer (ChatML template, pad token set)."""
    from make_tiny_model import make_tiny_model

    return make_tiny_model(str(tmp_path_factory.mktemp("tiny-model")))


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
