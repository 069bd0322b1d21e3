"""The exit codes of finetune.py, in one table: every Python file reads them from here; finetune.sh and README
("Preemption and requeue") state the same numbers, and tests/test_exit_codes.py checks that they agree.

A deliberate stop is explained in one line (`[finetune] error:` or the preemption line) and ends every rank with its
code; anything else is a crash (1), or a signal's code. Adding a code: one line in ExitCode, the same number in
finetune.sh's list and the README's sentence (the test says where they differ).
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


def record_exit_code(code):
    """finetune.sh reads this: torchrun itself exits 1 whenever a worker exits non-zero or it got a signal."""
    path = os.environ.get("FINETUNE_EXIT_CODE_FILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{int(code)}\n")
