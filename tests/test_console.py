"""The README demo's console carries no warning the user cannot act on."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import ENV, ROOT
from test_distributed import free_port

# Lines that warn: Python warnings, library loggers ("[WARNING]", "W1123 ..."), and the notices finetune.py
# drops on purpose (they carry no "warning" word), should a library rename its logger.
WARNING_LINE = re.compile(r"warning\b|\bwarn\b|^W\d{4} |Failed to load CPU gemm_4bit_forward|Setting accelerator to CPU|"
                          r"parallel_mode != ParallelMode|Gradient accumulation steps mismatch|mtime may not be "
                          r"reliable|Traceback", re.IGNORECASE)


def warning_lines(log):
    return [line for line in log.splitlines() if WARNING_LINE.search(line)]


def test_demo_console_is_clean(tiny_model, tmp_path):
    """examples/demo.sh's fine-tuning command (finetune.sh: torchrun with one process), fewer epochs, and
    a chat.py answer: the whole console is checked, line by line."""
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}", "MASTER_PORT": str(free_port())}
    env.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)  # as a user runs it
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(ROOT / "finetune.sh"), "-m", tiny_model, "-d", str(ROOT / "examples" / "demo_data.jsonl"),
         "-o", str(out), "--num_train_epochs", "2", "--per_device_train_batch_size", "4",
         "--gradient_accumulation_steps", "1", "--learning_rate", "3e-3", "--save_strategy", "no",
         "--logging_steps", "20", "--disable_tqdm", "True", "--dataset_cache_dir", str(tmp_path / "cache")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    chat = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(out), "--prompt", "Hi",
                           "--max_new_tokens", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert chat.returncode == 0, chat.stdout[-3000:]
    log = proc.stdout + chat.stdout
    assert "[finetune] done:" in log
    assert warning_lines(log) == [], "\n".join(warning_lines(log))
