"""What finetune.py's checkpoints are: the weight file names, what makes a checkpoint-N folder complete, the newest
complete one and the one a run resumes from, and removing what a failed save half-wrote. Every module asks here
(finetune.py, finetune_faults.py; tests too). docs/distributed.md: "Resume", "What is saved, by whom".
"""

import glob
import os
import shutil

from finetune_console import log0

# The files that hold a saved model's weights (Trainer/save_pretrained, peft): one file, or an index and its shards
# (a name with * is a shard: a checkpoint is complete with its single file or index, never with a shard alone).
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                "adapter_model.safetensors", "pytorch_model.bin", "pytorch_model-*-of-*.bin",
                "pytorch_model.bin.index.json", "adapter_model.bin")
PREFIX = "checkpoint-"


def _rank():
    return int(os.environ.get("RANK", "0"))


def checkpoint_is_complete(path):
    """trainer_state.json is written last by Trainer; weights must be there, and a DeepSpeed
    checkpoint must have its `latest` tag (written after every rank saved its shards)."""
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return False
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES if "*" not in w):
        return False
    if glob.glob(os.path.join(path, "global_step*")) and not os.path.isfile(os.path.join(path, "latest")):
        return False
    return True


def checkpoints(output_dir):
    """Every checkpoint-N folder in output_dir, complete or not, as [(N, path)] in step order."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(str(output_dir)), f"{PREFIX}*")):
        step = p.rsplit("-", 1)[-1]
        if step.isdigit():
            found.append((int(step), p))
    return sorted(found)


def newest_checkpoint(output_dir, before=None):
    """The newest complete checkpoint-N in output_dir (N < before), or None."""
    found = [p for step, p in checkpoints(output_dir)
             if (before is None or step < before) and checkpoint_is_complete(p)]
    return found[-1] if found else None


def find_resume_checkpoint(training_args):
    """--resume_from_checkpoint PATH, else the newest complete checkpoint-N in output_dir (if any).
    Half-written checkpoints (a crash during save) are removed so that save_total_limit rotation
    can never prefer them over the last complete one."""
    requested = training_args.resume_from_checkpoint
    if requested and str(requested).lower() in ("false", "no", "none"):
        return None
    if requested and str(requested).lower() not in ("true", "yes"):
        if not checkpoint_is_complete(requested):
            raise FileNotFoundError(f"--resume_from_checkpoint {requested} is not a complete checkpoint.")
        return requested
    found = [p for _, p in checkpoints(training_args.output_dir)]
    complete = [p for p in found if checkpoint_is_complete(p)]
    if training_args.process_index == 0:
        for p in found:
            if p not in complete:
                log0(f"WARNING: {p} is incomplete (interrupted while saving); removing it.")
                shutil.rmtree(p, ignore_errors=True)
    return complete[-1] if complete else None


def remove_partial_checkpoint(folder):
    """After a failed checkpoint save: the folder goes if it is not complete (rank 0 removes it). Returns what was
    removed, for the message."""
    if _rank() == 0 and os.path.isdir(folder) and not checkpoint_is_complete(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return os.path.basename(os.path.normpath(folder))
    return None


def remove_new_files(folder, since, patterns=WEIGHT_FILES):
    """After a failed save of the final model: the weight files written after `since` (a half-written save,
    which would look finished: a final model is not resumed, it is used). Returns what was removed."""
    removed = []
    for pattern in patterns:
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), pattern))):
            if _rank() == 0 and os.path.isfile(path) and os.path.getmtime(path) >= since:
                os.remove(path)
                removed.append(os.path.basename(path))
    return " and ".join(removed) or None
