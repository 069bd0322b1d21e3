"""Faults that no input check catches, for finetune.py: a diverging run, a failed save (a damaged dataset cache is
finetune_cache.py's; what a complete checkpoint is, finetune_checkpoints.py's). Each ends with one `[finetune]
error:` line (no traceback), an exit code of its own (finetune_exit_codes.py), and nothing on disk that the next
run would trust wrongly; the next run then recovers. docs/distributed.md: "When a run fails".

What finetune.py uses (everything else here is internal):

  NonFiniteGuard      registers with the run's finetune_agreement.StepAgreement ("nonfinite"). FinetuneTrainer
                      feeds it each micro-batch's loss (note_loss, from training_step) and the step's gradient
                      norm (note_grad_norm, from Trainer._get_grad_norm); at every optimizer-step end all ranks
                      agree on its flag, and the first step whose loss or gradient norm is NaN/inf stops the run
                      before anything is saved from it -> Diverged (ExitCode.DIVERGED). Off with
                      --stop_on_nonfinite False.
  saving(...)         a context around a checkpoint or the final save: an I/O failure in it (no space, quota,
                      permissions, read-only or network file system, and the forms torch and safetensors wrap
                      them in) -> SaveFailed (ExitCode.SAVE_FAILED), after the half-written folder is removed.
  write_errors(...)   the same for any other write during training (loss plot, logs): only errors that are
                      surely the disk's (no space, quota, read-only) are translated.
  apply_learning_rate a resumed run takes a changed --learning_rate (the rerun after a divergence must be able to).
  warn_if_low_space   before training: WARNING when --output_dir has less free space than one checkpoint needs
                      (checkpoint_bytes: estimated from the parameters and the optimizer).
  write_error(e), failed_file(e), with_free_space(...), DISK_ERRNOS: what a failed write was, for the dataset
                      cache's message too (finetune_cache.cache_write_error).
  Fault               base of Diverged and SaveFailed: main() prints it once and exits with its exit_code.
"""

import errno
import glob
import math
import os
import re
import shutil
from contextlib import contextmanager

import torch
import transformers

from finetune_agreement import STOP_DISCARDING_STEP
from finetune_checkpoints import newest_checkpoint, remove_partial_checkpoint
from finetune_console import log0
from finetune_exit_codes import ExitCode

FP16_SKIP_LIMIT = 50  # fp16 loss scaling: this many overflowing (skipped) steps in a row is divergence too


class Fault(Exception):
    """A run-ending fault with its exit code. `here`: this process prints the message (one rank does)."""

    exit_code = 1

    def __init__(self, message, here=True):
        super().__init__(message)
        self.here = here


class Diverged(Fault):
    exit_code = ExitCode.DIVERGED


class SaveFailed(Fault):
    exit_code = ExitCode.SAVE_FAILED


def _rank():
    return int(os.environ.get("RANK", "0"))


def _size(n):
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


def _existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def free_bytes(path):
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# Non-finite loss or gradient norm
# ---------------------------------------------------------------------------------------------
# Cost: nothing is read or computed that the step does not have already; per micro-batch one reference kept
# to its (device) loss, per step one NaN test of loss + norm on the device (4 tensor ops). The flag travels in
# the run's one per-step all-reduce (finetune_agreement.StepAgreement), so the guard adds no collective and no
# sync of its own (measured: bench/bench_faults.py). The weights of the failing step are never saved: the run
# stops at that step's end, discarding it (STOP_DISCARDING_STEP: no save or evaluation, whoever asks for one).


class NonFiniteGuard(transformers.TrainerCallback):
    def __init__(self, args, source_names, agreement):
        self.enabled = bool(getattr(args, "stop_on_nonfinite", True))
        self.source_names = list(source_names)
        self.skipped_in_row, self.failure, self.started_at = 0, None, 0
        self._new_step()
        if self.enabled:
            agreement.register("nonfinite", self.vote, self.decide)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started_at = state.global_step  # > 0: resumed from that step

    def _new_step(self):
        self.losses, self.batches, self.grad_norm, self.step_loss = [], [], None, None

    def note_loss(self, loss, inputs):
        """One micro-batch: its loss (a device tensor; kept, not read) and its batch (for the sources)."""
        if self.enabled:
            self.losses.append(loss.detach())
            self.batches.append({k: inputs[k] for k in ("token_source", "position_ids") if k in inputs})

    def note_grad_norm(self, grad_norm):
        if self.enabled:
            self.grad_norm = grad_norm

    def vote(self, device):
        """1 if this rank's step has a non-finite loss or gradient norm, else 0, as a device tensor (a few tensor
        ops, no sync)."""
        total = torch.stack(self.losses).sum() if self.losses else torch.zeros((), device=device)
        self.step_loss = total
        if self.grad_norm is not None:
            total = total + self.grad_norm  # NaN or inf in either stays non-finite in the sum
        return torch.isfinite(total).logical_not()

    def decide(self, agreed, args, state, optimizer=None, **kwargs):
        """agreed: 1 if the step is non-finite on some rank -> STOP_DISCARDING_STEP (or None: go on)."""
        if not agreed:
            self.skipped_in_row = 0
            self._new_step()
            return None
        # Some rank's step is not finite (rare: from here on, the time does not matter). What, where, from which
        # samples: every rank's details.
        mine = self._details(self.step_loss, self.grad_norm)
        ranks = [mine]
        if args.world_size > 1 and torch.distributed.is_initialized():
            ranks = [None] * args.world_size
            torch.distributed.all_gather_object(ranks, mine)
        bad_loss = any(r["loss"] is not None and not math.isfinite(r["loss"]) for r in ranks)
        bad_norm = any(r["grad_norm"] is not None and not math.isfinite(r["grad_norm"]) for r in ranks)
        # fp16 with dynamic loss scaling: an overflowing gradient makes the scaler skip the step and lower the
        # scale (the weights are untouched): normal, unless it never stops. bf16/fp32 have no such excuse:
        # DeepSpeed skips those steps too, and the run would go on training nothing.
        skipped = bool(getattr(optimizer, "step_was_skipped", False))
        if args.fp16 and skipped and not bad_loss:
            self.skipped_in_row += 1
            if self.skipped_in_row < FP16_SKIP_LIMIT:
                self._new_step()
                return None
        self.failure = self._message(args, state, bad_loss, bad_norm, ranks)
        # nothing of this step is saved or evaluated; it is logged (loss/grad_norm as they are: every on_log
        # callback sees it), the epoch loop stops, and the epoch end raises (before the epoch's save/evaluate)
        return STOP_DISCARDING_STEP

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.failure:
            raise Diverged(self.failure, here=_rank() == 0)

    on_train_end = on_epoch_end

    def _details(self, loss, norm):
        """This rank's step: loss, gradient norm, samples per source (for the message; failure path only)."""
        samples = {}
        for b in self.batches:
            src = b.get("token_source")
            if src is None:
                continue
            pos = b.get("position_ids")
            starts = src[pos == 0] if pos is not None and pos.shape == src.shape else src[:, 0]
            for i in starts[starts >= 0].tolist():
                name = self.source_names[i] if i < len(self.source_names) else str(i)
                samples[name] = samples.get(name, 0) + 1
        return {"loss": None if loss is None else float(loss),
                "grad_norm": None if norm is None else float(norm), "samples": samples}

    def _message(self, args, state, bad_loss, bad_norm, ranks):
        world = len(ranks)

        def value(x):
            return "none" if x is None else f"{x:.4g}"

        losses = [r["loss"] for r in ranks if r["loss"] is not None]
        bad = [i for i, r in enumerate(ranks) if r["loss"] is not None and not math.isfinite(r["loss"])]
        step_loss = sum(losses) / len(losses) if losses else None  # as logged: the mean over ranks
        if bad_loss and bad_norm:
            what = f"the loss is {value(step_loss)} and the gradient norm is {value(ranks[0]['grad_norm'])}"
        elif bad_loss:
            what = f"the loss is {value(step_loss)} (gradient norm {value(ranks[0]['grad_norm'])})"
        else:
            what = f"the gradient norm is {value(ranks[0]['grad_norm'])} (loss {value(step_loss)})"
        if bad_loss and world > 1:
            what += f", non-finite on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of {world}"
        if self.skipped_in_row >= FP16_SKIP_LIMIT:
            what += f"; the fp16 loss scaler skipped {self.skipped_in_row} steps in a row for overflowing gradients"
        samples = {}
        for r in ranks:
            for name, n in r["samples"].items():
                samples[name] = samples.get(name, 0) + n
        causes = [f"a learning rate too high (--learning_rate {args.learning_rate:g}: try it 10x lower, or more "
                  "--warmup_steps)"]
        if args.fp16:
            causes.append("fp16 overflow (values beyond 65504): train with --bf16 True instead where the GPU has it")
        if not args.max_grad_norm:
            causes.append("no gradient clipping (--max_grad_norm 0)")
        if samples:
            causes.append("a bad batch: this step's samples come from "
                          + ", ".join(f"{name} ({n})" for name, n in sorted(samples.items())))
        last = newest_checkpoint(args.output_dir, before=state.global_step)
        if last is None:
            then = "No checkpoint was written before it: a rerun starts over."
        elif self.started_at and state.global_step == self.started_at + 1:  # the first step after resuming
            then = (f"This run resumed from {last} and diverged at its first step: that checkpoint is already "
                    "broken (finite, but not trainable): start over with --resume_from_checkpoint False, or "
                    "resume an earlier one with --resume_from_checkpoint PATH.")
        else:
            then = (f"The newest checkpoint is {last}: the same command resumes from it and meets this step again "
                    "unless a cause is changed (a new --learning_rate applies to the resumed run); if it diverges "
                    "again at once, start over with --resume_from_checkpoint False.")
        return (f"training diverged at step {state.global_step}: {what}. Nothing of this step was saved. {then} "
                f"Likely causes: {'; '.join(causes)}. --stop_on_nonfinite False trains on regardless (exit code "
                f"{ExitCode.DIVERGED:d})")


def apply_learning_rate(scheduler, optimizer, learning_rate):
    """After a resume: the command line's --learning_rate, if it differs from the checkpoint's. The restored
    scheduler keeps the learning rate the checkpoint was trained with (its base_lrs) and would ignore a lowered
    --learning_rate, so the rerun after a divergence would diverge again at the same step; the schedule (warmup,
    decay, position) is kept and scaled to the new peak. The optimizer's current rates are scaled with it."""
    base = list(getattr(scheduler, "base_lrs", None) or [])
    if not base or base[0] <= 0 or math.isclose(base[0], learning_rate, rel_tol=1e-9):
        return
    factor = learning_rate / base[0]
    scheduler.base_lrs = [b * factor for b in base]
    if getattr(scheduler, "_last_lr", None):
        scheduler._last_lr = [x * factor for x in scheduler._last_lr]
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
        if "initial_lr" in group:
            group["initial_lr"] = group["initial_lr"] * factor
    log0(f"resumed with --learning_rate {learning_rate:g}; the checkpoint was trained with {base[0]:g}: the "
         "learning rate schedule continues, scaled to the new one")


# ---------------------------------------------------------------------------------------------
# Failed saves
# ---------------------------------------------------------------------------------------------

SPACE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
WRITE_ERRNOS = {**SPACE_ERRNOS, errno.EROFS: "the file system is read-only",
                errno.EFBIG: "file too large (a file-size limit: ulimit -f, or the file system's own)",
                errno.EACCES: "permission denied (the folder's permissions changed during the run?)",
                errno.EPERM: "operation not permitted (the folder's permissions changed during the run?)",
                errno.EIO: "input/output error (a failing disk or network file system)",
                errno.ESTALE: "stale file handle (the network file system lost the folder)",
                errno.ENOENT: "a file or folder vanished while it was written (deleted by someone else?)"}
DISK_ERRNOS = (*SPACE_ERRNOS, errno.EROFS, errno.EFBIG)  # a failed write that is surely the disk's
# How torch's zip writer and safetensors report a failed write: torch says only "unexpected pos" (a short
# write; seen for ENOSPC and EFBIG with torch 2.13), safetensors wraps the OS error ("... (os error 28)").
_TORCH_SHORT_WRITE = re.compile(r"inline_container|PytorchStreamWriter|unexpected pos|file write failed")
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
# A collective that fails because another process of the run has died (gloo says so; NCCL aborts).
_PEER_GONE = re.compile(r"Connection closed by peer|Connection reset by peer|remote worker crash|Broken pipe|"
                        r"NCCL communicator was aborted|NCCL error", re.I)


def _chain(e):
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return seen


def _first_line(e):
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def write_error(e):
    """(errno or None, what failed) if `e` (or what caused it) is a failed write, else None."""
    for ex in _chain(e):
        if isinstance(ex, OSError) and ex.errno:
            return ex.errno, WRITE_ERRNOS.get(ex.errno, ex.strerror or _first_line(ex))
        text = str(ex)
        m = _OS_ERROR_IN_TEXT.search(text)
        if m and int(m.group(1) or m.group(2)) in WRITE_ERRNOS:
            code = int(m.group(1) or m.group(2))
            return code, WRITE_ERRNOS[code]
        for code in (errno.ENOSPC, errno.EDQUOT):
            if os.strerror(code) in text:
                return code, WRITE_ERRNOS[code]
        if isinstance(ex, RuntimeError) and _TORCH_SHORT_WRITE.search(text):
            return None, f"a write was cut short (torch: {_first_line(ex)})"
    return None


def _peer_gone(e):
    return any(isinstance(ex, RuntimeError) and _PEER_GONE.search(str(ex)) for ex in _chain(e))


def failed_file(e):
    """The file a failed write names (the first OSError with a filename in e's chain), or None."""
    return next((ex.filename for ex in _chain(e) if isinstance(ex, OSError) and ex.filename), None)


def with_free_space(code, text, folder, needed):
    """(errno, text) with the free space in `folder` added where space may be the reason; a short write (no
    errno) is taken for a full disk when the free space is below what the save needs."""
    free = free_bytes(folder)
    if free is None or code not in (*SPACE_ERRNOS, None):
        return code, text
    if code is None and needed is not None and free < needed:
        code, text = errno.ENOSPC, "no space left on device"
    need = f"; this save needs about {_size(needed)}" if needed else ""
    return code, f"{text} ({_size(free)} free in {_existing(folder)}{need})"


def _advice(args, code, checkpoints=True):
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {args.output_dir} writable again, or set --output_dir to a writable folder"
    if code not in SPACE_ERRNOS:  # an I/O error, or a short write with room left: the file system's own limits
        return (f"check the file system of {args.output_dir} (quota: quota -s; file-size limit: ulimit -f; a "
                "network file system's health), or set --output_dir to another disk")
    limit = getattr(args, "save_total_limit", None)
    if not checkpoints:
        return "free space there, or set --output_dir to a disk with room"
    if limit == 1:  # nothing fewer to keep: the old checkpoint goes only once the new one is complete
        return ("free space there (with --save_total_limit 1 the disk must hold 2 checkpoints while the new one is "
                "written), or set --output_dir to a disk with room")
    keep = f"--save_total_limit (now {limit})" if limit else "--save_total_limit (now all are kept)"
    return f"free space there, keep fewer checkpoints with {keep}, or set --output_dir to a disk with room"


@contextmanager
def _translated(translate):
    """Around a write: a Fault passes; any other exception goes to translate(e), which raises the fault it is, or
    returns (the exception then passes unchanged)."""
    try:
        yield
    except Fault:
        raise
    except Exception as e:
        translate(e)
        raise


@contextmanager
def saving(folder, what, args, needed=None, remove=None):
    """Around one save (`what`, into `folder`) on every rank. A failed write -> SaveFailed: the folder, what
    failed, what to do; `remove` (a callable, acting on rank 0) takes away what was half-written. A collective
    broken by another process that failed mid-save ends this one the same way, quietly but on rank 0 (rank 0
    says it once; another rank speaks only for a failure that is its own: not a full disk, which all share).
    Other errors pass unchanged."""

    def translate(e):
        failed = write_error(e)
        peer = failed is None and args.world_size > 1 and _peer_gone(e)
        if failed is None and not peer:
            return
        try:
            need = needed() if callable(needed) else needed
        except Exception:  # an estimate for the message must not hide the failure
            need = None
        code, text = with_free_space(*(failed or (None, "")), args.output_dir, need)  # the free space at the failure
        if peer:
            text = f"another process failed while writing it{text}"
        removed = ""
        if remove is not None:
            try:
                gone = remove()
                if gone:
                    removed = f" The half-written {gone} {'were' if ' and ' in gone else 'was'} removed."
            except OSError:
                pass
        last = newest_checkpoint(args.output_dir)
        resume = (f" {last} is the newest complete checkpoint: the same command resumes from it." if last else
                  " There is no complete checkpoint: the same command starts over.")
        here = _rank() == 0 or not (peer or code in SPACE_ERRNOS)
        advice = _advice(args, code, checkpoints=what.startswith("checkpoint-") or last is not None)
        raise SaveFailed(f"saving {what} to {folder} failed: {text}.{removed}{resume} Fix: {advice} "
                         f"(exit code {ExitCode.SAVE_FAILED:d})", here=here) from None

    with _translated(translate):
        yield


def disk_error(e, folder):
    """(errno, what failed with the free space in `folder`, the file) if `e` is surely the disk's (no space, quota,
    read-only, file too large), else None."""
    failed = write_error(e)
    if failed is None or failed[0] not in DISK_ERRNOS:
        return None
    return (*with_free_space(*failed, folder, None), failed_file(e))


@contextmanager
def write_errors(args):
    """Any other write of a training run (the loss plot, logs, layout files): a full disk or quota or a
    read-only file system -> SaveFailed; everything else passes unchanged."""

    def translate(e):
        failed = disk_error(e, args.output_dir)
        if failed is None:
            return
        code, text, name = failed
        raise SaveFailed(f"writing {name or f'in {args.output_dir}'} failed: {text}. Fix: {_advice(args, code)}, "
                         "then run the same command again: it resumes from the newest complete checkpoint "
                         f"(exit code {ExitCode.SAVE_FAILED:d})",
                         here=_rank() == 0 or code not in SPACE_ERRNOS) from None

    with _translated(translate):
        yield


# ---------------------------------------------------------------------------------------------
# Free space before training
# ---------------------------------------------------------------------------------------------


def checkpoint_bytes(model, args, zero_stage, lora):
    """(one checkpoint, the final model) in bytes, from the parameters: the saved weights (full: all; LoRA: the
    trainable ones), the optimizer state (torch Adam: 2 moments in the weights' dtype; DeepSpeed: fp32 weights
    and 2 fp32 moments, 12 bytes per trainable parameter; ZeRO-1/2 also keep the module's weights in its
    model_states file), and the tokenizer files. Measured against real checkpoints in tests/test_faults.py."""
    all_bytes = trainable_bytes = trainable = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        size = getattr(p, "ds_tensor", p).element_size()
        all_bytes += n * size
        if p.requires_grad:
            trainable += n
            trainable_bytes += n * size
    weights = trainable_bytes if lora else all_bytes
    optim = str(getattr(args, "optim", "adamw_torch"))
    if args.deepspeed:
        state = 12 * trainable + (weights if zero_stage < 3 else 0)
    elif "8bit" in optim:
        state = 2 * trainable
    elif "adafactor" in optim:
        state = trainable_bytes // 100
    elif optim.startswith(("sgd", "lion", "rmsprop")):
        state = trainable_bytes
    else:  # Adam and its variants
        state = 2 * trainable_bytes
    other = _other_files(model) + (50_000 if args.deepspeed else 0)  # DeepSpeed adds zero_to_fp32.py
    return weights + state + other, weights + other


TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges*", "*.model", "*.tiktoken", "special_tokens_map.json",
                   "added_tokens.json", "chat_template*", "config.json", "generation_config.json")


def _other_files(model):
    """Bytes of what a checkpoint holds besides weights and optimizer: the tokenizer and configs (their size in
    the model's folder; 20 MB for a hub model) and ~100 KB of trainer state, RNG and scheduler state."""
    folder = getattr(model, "name_or_path", None)
    if not (isinstance(folder, str) and os.path.isdir(folder)):
        return 20_000_000
    files = {f for pattern in TOKENIZER_FILES for f in glob.glob(os.path.join(glob.escape(folder), pattern))}
    return sum(os.path.getsize(f) for f in files if os.path.isfile(f)) + 100_000


def warn_if_low_space(model, args, zero_stage, lora):
    """WARNING before training when --output_dir cannot hold one checkpoint (or the final model)."""
    if _rank() != 0:
        return
    free = free_bytes(args.output_dir)
    checkpoint, final = checkpoint_bytes(model, args, zero_stage, lora)
    saves = str(getattr(args.save_strategy, "value", args.save_strategy)) != "no"
    need, what = (checkpoint, "one checkpoint") if saves else (final, "the final model")
    if free is not None and free < need:
        log0(f"WARNING: --output_dir {args.output_dir} has {_size(free)} free, and {what} of this run needs about "
             f"{_size(need)}: the first save will fail. Free space, or set --output_dir to a disk with room.")


class FaultHandling:
    """Mixed into finetune.FinetuneTrainer (before transformers.Trainer): feeds NonFiniteGuard each micro-batch's loss
    and each step's gradient norm, turns a failed checkpoint write into one line (the half-written checkpoint
    removed), applies a --learning_rate changed for a resume, and names a full disk met anywhere while training.
    The Trainer methods wrapped are private (transformers 5.24): see finetune_distributed.LIBRARY_INTERNALS."""

    @property
    def nonfinite(self):  # the guard train() added to the callbacks, if any
        return next((c for c in self.callback_handler.callbacks if isinstance(c, NonFiniteGuard)), None)

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.nonfinite:
            self.nonfinite.note_loss(loss, inputs)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # the one place that has each step's gradient norm, clipped or not, on every backend (DeepSpeed's: its
        # global norm), before the optimizer step
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.nonfinite:
            self.nonfinite.note_grad_norm(grad_norm)
        return grad_norm

    def _save_checkpoint(self, model, trial):
        # every checkpoint (--save_steps, epoch, preemption) is written here
        from finetune_distributed import zero_stage

        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")

        def needed():
            return checkpoint_bytes(self.model, self.args, zero_stage(self.args), self.args.use_lora)[0]

        with saving(folder, os.path.basename(folder), self.args, needed,
                    remove=lambda: remove_partial_checkpoint(folder)):
            return super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # where a resume restores the scheduler (also under DeepSpeed, after its own load)
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            apply_learning_rate(self.lr_scheduler, self.optimizer, self.args.learning_rate)

    def train(self, *args, **kwargs):
        with write_errors(self.args):  # a full disk elsewhere (loss plot, logs, layout file): one line too
            return super().train(*args, **kwargs)
