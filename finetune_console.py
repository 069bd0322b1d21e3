"""What a run says on the console, for every finetune*.py module: log0 (a line printed once, by global rank 0),
suggest (the did-you-mean of a one-line error), and silence_progress_bars (the libraries' own bars off: the log
lines say what happens). Which library notices are dropped, and why, is finetune_distributed.quiet_known_notices.
"""

import difflib
import os


def log0(*args):
    """Print once, on global rank 0 (torchrun sets RANK; a single process has none)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print("[finetune]", *args, flush=True)


def suggest(name, known):
    """' (did you mean 'x'?)' for a near-miss of one of `known`, else ''."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def silence_progress_bars():
    """transformers' bars ("Loading weights", "Writing model shards") and datasets' ("Generating train split",
    "Saving the dataset") repeat what the log says, at every run and save. The Trainer's training bar is separate
    (--disable_tqdm)."""
    import datasets
    import transformers

    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
