"""torchrun as finetune.sh starts it: `python finetune_launch.py [torchrun arguments] finetune.py [flags]`.

This is torch.distributed.run itself, with one difference at the end of a run whose workers all stopped on
purpose with the same exit code: 2 (a user error, which every worker has explained in its one
`[finetune] error:` line), 3 (training diverged), 74 (a save failed) or 75 (preempted, the checkpoint written
and named). torchrun would follow that line
with its own "failed (exitcode: 2)" log line and a ChildFailedError traceback and failure summary, which say
nothing more; here the launcher exits with the workers' code instead. Every other failure (a crash, a worker
killed by a signal, workers ending with different codes) is reported by torchrun exactly as usual.
"""

import logging
import sys

from torch.distributed import run
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

# finetune.py's deliberate stops, each explained in its own line: user error, training diverged, retention fell
# (--retention_min), a save failed (finetune_faults), preempted (finetune_preemption)
DELIBERATE_EXIT_CODES = (2, 3, 4, 74, 75)


def _not_a_deliberate_exit(record):
    """torchrun's agent logs the first failed worker before it raises; a deliberate exit is not a failure."""
    return not (record.msg.startswith("failed (exitcode: ") and record.args
                and record.args[0] in DELIBERATE_EXIT_CODES)


def main():
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_not_a_deliberate_exit)
    try:
        run.main()
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        if len(codes) == 1 and codes <= set(DELIBERATE_EXIT_CODES):
            sys.exit(codes.pop())
        raise


if __name__ == "__main__":
    main()
