"""What a run says on the console, for every finetune*.py module and chat.py and merge_lora.py: log0 (a line
printed once, by global rank 0), suggest (the did-you-mean of a one-line error), quiet_known_notices (library
notices the user cannot act on, KNOWN_NOTICES, dropped where they arise) and silence_progress_bars (the libraries'
own bars off: the log lines say what happens). tests/test_console.py reads whole runs' consoles.
"""

import difflib
import os

# Library notices that tell the user nothing to act on: logger name -> test of the record. Each is narrow.
KNOWN_NOTICES = {
    # On CPUs with AVX512-BF16, bitsandbytes tries a faster 4-bit CPU matmul from the Hub through the `kernels`
    # package (a transformers >= 5.25 dependency) and falls back to its own, with the same results: whether
    # `kernels` is missing, offline, or refuses the unversioned, unverified repository, nothing is for the user
    # to do.
    "bitsandbytes.backends.cpu.ops": lambda r: "gemm_4bit_forward" in r.msg,
    # ... and `kernels` itself (0.19), offline, says so about that same repository on the way.
    "kernels._internals.hf_hub": lambda r: "kernels-community/quantization-bitsandbytes" in r.getMessage(),
    # No GPU: DeepSpeed says it runs on CPU, which is the plan (finetune.sh chose gloo for it).
    "DeepSpeed": lambda r: "Setting accelerator to CPU" in r.getMessage() and not _cuda(),
    # torchrun with ONE process: accelerate starts a process group of size 1, which transformers takes
    # for a mis-launched DDP run. With 2+ processes it never fires; with 1 there is nothing to fix.
    "transformers.training_args": lambda r: "parallel_mode != ParallelMode.DISTRIBUTED" in r.msg
    and os.environ.get("WORLD_SIZE", "1") == "1",
    # DeepSpeed + accumulation: Trainer accumulates itself and gives accelerate 1 on purpose, and
    # DeepSpeed gets the real value from the config; the "mismatch" is by design.
    "accelerate.accelerator": lambda r: "Gradient accumulation steps mismatch" in r.getMessage(),
    # Checkpoints written within a second of each other (short runs): step order is used, as wanted.
    "transformers.trainer_utils": lambda r: "mtime may not be reliable" in r.msg,
}


def quiet_known_notices():
    """Drop KNOWN_NOTICES where they arise (loggers are filtered before the libraries are imported:
    bitsandbytes speaks on import)."""
    import logging

    for name, is_notice in KNOWN_NOTICES.items():
        logging.getLogger(name).addFilter(lambda record, is_notice=is_notice: not is_notice(record))


def _cuda():
    import torch

    return torch.cuda.is_available()


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
