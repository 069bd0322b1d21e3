"""The exit codes of finetune.py, in one table: every Python file reads them from here; finetune.sh,
docs/troubleshooting.md and the README's table state the same numbers, and tests/test_exit_codes.py checks that they
agree.

A deliberate stop is explained in one line (`[finetune] error:` or the preemption line) and ends every rank with its
code; anything else is a crash (1), or a signal's code. Every rank ends through one function,
finetune_distributed.exit_when_done, which records the code (record_exit_code) for finetune.sh. A rank that stops
because another rank reports the reason raises StopQuietly. Adding a code: one line in ExitCode, the same number in
finetune.sh's list, docs/troubleshooting.md and the README's table (the test says where they differ).
"""

import enum
import os


class ExitCode(enum.IntEnum):
    BAD_INPUT = 2  # a user error (flag, file, data, a damaged dataset cache that cannot be removed)
    DIVERGED = 3  # the loss or gradient norm became NaN/inf: rerunning as is meets the same step again
    RETENTION = 4  # --retention_min: the model forgot more than allowed (finetune_retention.py)
    SAVE_FAILED = 74  # sysexits' EX_IOERR: a save failed (disk full, quota, ...); rerun once fixed
    PREEMPTED = 75  # sysexits' EX_TEMPFAIL, "try again": a checkpoint was written on SIGTERM/SIGUSR1


DELIBERATE_EXIT_CODES = tuple(int(code) for code in ExitCode)


class StopQuietly(Exception):
    """This rank ends with `code` and no line of its own: rank 0 reports why (a data error it found and broadcast),
    once for the run instead of once per rank."""

    def __init__(self, code):
        super().__init__(int(code))
        self.code = int(code)


def record_exit_code(code):
    """finetune.sh reads this: torchrun itself exits 1 whenever a worker exits non-zero or it got a signal. Called by
    finetune_distributed.exit_when_done only, the one way a rank ends."""
    path = os.environ.get("FINETUNE_EXIT_CODE_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{int(code)}\n")
