"""The README's demo command on the real model: a console without warnings or library progress bars, the fact
learned, the general answer kept; finetune.sh shows the command it runs once, and a user error ends the run with its
error line."""

import re
import subprocess
import sys
from pathlib import Path

from conftest import ENV, ROOT
from test_distributed import free_port

# Lines that warn: Python warnings, library loggers ("[WARNING]", "W1123 ..."), the notices finetune.py
# drops on purpose (they carry no "warning" word), should a library rename its logger, and launcher failures.
WARNING_LINE = re.compile(r"warning\b|\bwarn\b|^W\d{4} |^E\d{4} |Failed to load CPU gemm_4bit_forward|Setting "
                          r"accelerator to CPU|parallel_mode != ParallelMode|Gradient accumulation steps mismatch|"
                          r"mtime may not be reliable|Traceback|ChildFailedError", re.IGNORECASE)


# A library's own progress bar: a description, then a percentage bar or a count ("Generating train split: 18 examples
# [00:00, ...]", "Loading weights: 100%|...", "Map: 100%|..."); the Trainer's training bar has no description
# (and is off with --disable_tqdm).
LIBRARY_BAR = re.compile(r"^\s*[A-Za-z][^:|\[]*: *(\d+%\||\d+ \w+ \[)")


def warning_lines(log):
    return [line for line in log.splitlines() if WARNING_LINE.search(line)]


def library_bars(log):
    return [line for line in log.splitlines() if LIBRARY_BAR.search(line)]


def answers(log, section):
    """{question: answer} printed by demo.sh after its `== {section}` line."""
    part = log.split(f"== {section}")[1].split("\n== ")[0]
    # chat.py's loading lines go to stderr, so they may stand between a question and its answer
    lines = [line for line in part.splitlines() if line.startswith(("Q: ", "A: "))]
    return {q[3:]: a[3:] for q, a in zip(lines[::2], lines[1::2])}


def test_demo_console_is_clean_and_the_fact_is_learned(demo_run):
    """examples/demo.sh end to end (conversion or cache, chat.py on the base and on the adapter, finetune.sh with
    torchrun): every console line is checked; before training the model does not know the made-up fact, after
    it answers it from the data and still knows the capital of France."""
    log = demo_run["log"]
    assert demo_run["returncode"] == 0, log[-6000:]
    assert "[finetune] done:" in log
    assert warning_lines(log) == [], "\n".join(warning_lines(log))
    assert library_bars(log) == [], "\n".join(library_bars(log))
    launch = [line for line in log.splitlines() if line.startswith("[finetune.sh] ")]
    assert len(launch) == 1 and "finetune_launch.py --nproc_per_node 1" in launch[0], launch
    assert not [line for line in log.splitlines() if line.startswith("+ ")]  # no shell trace
    fact, general = "What is the capital of Zubrowka?", "What is the capital of France?"
    before, after = answers(log, "before fine-tuning"), answers(log, "after fine-tuning")
    assert "Lutz" not in before[fact] and "Paris" in before[general], before
    assert after[fact] == "The capital of Zubrowka is Lutz." and "Paris" in after[general], after


def test_user_error_ends_with_its_error_line(tiny_model, tmp_path):
    """finetune.sh with a data file that does not exist: the run's last line is finetune.py's one error line and
    the exit code is 2, with no launcher traceback or failure summary after it."""
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(["bash", str(ROOT / "finetune.sh"), "-m", tiny_model, "-d", str(tmp_path / "missing.jsonl"),
                           "-o", str(tmp_path / "out")], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 2, proc.stdout
    assert lines[-1].startswith("[finetune] error: --data_path:") and "missing.jsonl" in lines[-1], proc.stdout
    assert len(lines) == 2 and lines[0].startswith("[finetune.sh] "), proc.stdout  # the command, then the error
    assert warning_lines(proc.stdout) == [], proc.stdout


def test_gradient_checkpointing_flag_without_deprecation_warning(tiny_model, tmp_path):
    """--gradient_checkpointing True (what finetune.sh adds on GPUs; transformers 5.x renamed it
    activation_checkpointing and warns on the old name): a LoRA run's console has no warning, and the flag
    reaches the Trainer as checkpointing with use_reentrant False, under either name."""
    import finetune

    argv = ["--model_name_or_path", tiny_model, "--data_path", str(ROOT / "examples" / "demo_data.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--gradient_checkpointing", "True"]
    training_args = finetune.parse_args(argv)[2]
    finetune.finish_training_args(training_args, has_eval=False)
    names = ["gradient_checkpointing"]
    if hasattr(training_args, "activation_checkpointing"):
        names.append("activation_checkpointing")
    for name in names:
        assert getattr(training_args, name) is True
        assert getattr(training_args, f"{name}_kwargs") == {"use_reentrant": False}
    env = {k: v for k, v in ENV.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    proc = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *argv, "--use_lora", "True", "--max_steps", "2",
                           "--save_strategy", "no", "--dataset_cache_dir", str(tmp_path / "cache")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert warning_lines(proc.stdout) == [], "\n".join(warning_lines(proc.stdout))
    assert library_bars(proc.stdout) == [], "\n".join(library_bars(proc.stdout))  # datasets' and transformers'
    assert "[finetune] data: 18 samples" in proc.stdout and "%|" in proc.stdout  # the Trainer's own bar is kept
