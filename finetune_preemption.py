"""Preemption-safe training for finetune.py: save on SIGTERM/SIGUSR1 at a step all ranks agree on, exit 75, and
resume a checkpoint on another number of processes (DeepSpeed universal checkpoints). docs/distributed.md:
"Preemption and requeue". finetune.py adds PreemptionCallback to its Trainer (it registers with the run's
finetune_agreement.StepAgreement) and calls adapt_to_world_size before training."""

import glob
import json
import os
import shutil
import signal

import transformers

from finetune_agreement import STOP_AND_SAVE
from finetune_console import log0
from finetune_distributed import convert_to_universal, load_universal_on_resume, unshare_adam_step
from finetune_exit_codes import ExitCode

# transformers' --enable_jit_checkpoint is not enough here: it handles SIGTERM only, and each rank acts
# on its own signal (3 s later, from a timer thread), so ranks that see it a step apart enter ZeRO-3's
# collective save at different points of the step (without our all-reduce, SIGUSR1 to one rank hung the
# run); it can also save before the optimizer step.

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")


class Preempted(Exception):
    pass


class PreemptionCallback(transformers.TrainerCallback):
    """The handler only records the signal. At every optimizer-step end all ranks agree on it (StepAgreement,
    "preemption": the largest signal number), so they stop after the same step; the checkpoint of that step is
    then written exactly like a --save_steps one (Trainer._save_checkpoint: weights, optimizer, scheduler, RNG,
    trainer_state.json last). Further signals only set the flag again, so they cannot interrupt the save. A signal
    after the last step changes nothing: the run finishes its final save and exits 0."""

    def __init__(self, agreement):
        self.signal, self.stopped_at = 0, None
        agreement.register("preemption", self.vote, self.decide)

    def _record(self, signum, frame):
        self.signal = signum  # nothing else: a signal handler may run in the middle of anything

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        for name in PREEMPT_SIGNALS:
            signal.signal(getattr(signal, name), self._record)
        unshare_adam_step(optimizer)  # after a universal resume (a DeepSpeed workaround)

    def vote(self, device):
        return self.signal

    def decide(self, agreed, args, state, **kwargs):
        if agreed and state.global_step < state.max_steps:
            self.signal, self.stopped_at = int(agreed), state.global_step
            return STOP_AND_SAVE
        return None

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:  # after trainer_state.json: a checkpoint without it is still complete
            layout = {k: getattr(args, k) for k in ("world_size", "per_device_train_batch_size",
                                                    "gradient_accumulation_steps")}
            with open(os.path.join(args.output_dir, f"checkpoint-{state.global_step}", LAYOUT_FILE), "w") as f:
                json.dump(layout, f)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # saved at the step end already
            control.should_save = control.should_evaluate = False

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            name = signal.Signals(self.signal).name
            raise Preempted(f"preempted ({name}), checkpoint-{self.stopped_at} written to "
                            f"{os.path.join(args.output_dir, f'checkpoint-{self.stopped_at}')}; "
                            f"run the same command to resume (exit code {ExitCode.PREEMPTED:d})")


# A ZeRO checkpoint holds one shard per rank. Resumed by another number of processes, rank 0 converts it
# once into DeepSpeed's universal format (per-parameter fp32 weights and Adam moments, beside the shards)
# and every rank loads its new partition from that. The global batch is kept by scaling
# gradient_accumulation_steps, so the step count, scheduler and data position carry over exactly.
LAYOUT_FILE = "finetune_layout.json"  # in every checkpoint: the batch layout that wrote it


def checkpoint_layout(path, training_args):
    """World size, per-device batch and accumulation of the run that wrote a DeepSpeed checkpoint."""
    shards = glob.glob(os.path.join(path, "global_step*", "*_optim_states.pt"))
    if not shards:
        return None
    layout = {"world_size": len(shards), "per_device_train_batch_size": training_args.per_device_train_batch_size,
              "gradient_accumulation_steps": training_args.gradient_accumulation_steps}
    if os.path.isfile(os.path.join(path, LAYOUT_FILE)):
        with open(os.path.join(path, LAYOUT_FILE)) as f:
            layout.update(json.load(f))
    return layout


def _to_universal(checkpoint):
    """global_stepK/ -> global_stepK_universal/ (built in a temporary directory and renamed), then
    `latest_universal`, written last: a conversion cut short is simply redone."""
    if os.path.isfile(os.path.join(checkpoint, "latest_universal")):
        return
    with open(os.path.join(checkpoint, "latest")) as f:
        tag = f.read().strip()
    target = os.path.join(checkpoint, f"{tag}_universal")
    shutil.rmtree(target + ".tmp", ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    log0(f"{checkpoint} was written by another number of processes: converting it to a universal checkpoint")
    convert_to_universal(os.path.join(checkpoint, tag), target + ".tmp")
    os.rename(target + ".tmp", target)
    with open(os.path.join(checkpoint, "latest_universal.tmp"), "w") as f:
        f.write(os.path.basename(target))
    os.replace(os.path.join(checkpoint, "latest_universal.tmp"), os.path.join(checkpoint, "latest_universal"))


def adapt_to_world_size(checkpoint, training_args):
    """Resume a DeepSpeed checkpoint written by another number of processes (see above)."""
    layout = checkpoint and training_args.deepspeed and checkpoint_layout(checkpoint, training_args)
    if not layout or layout["world_size"] == training_args.world_size:
        return
    with training_args.main_process_first(desc="universal checkpoint"):
        if training_args.process_index == 0:
            _to_universal(checkpoint)
    old = layout["world_size"] * layout["per_device_train_batch_size"] * layout["gradient_accumulation_steps"]
    unit = training_args.world_size * training_args.per_device_train_batch_size
    if old % unit == 0:
        training_args.gradient_accumulation_steps = old // unit
        log0(f"resuming on {training_args.world_size} processes instead of {layout['world_size']}: global batch "
             f"{old} kept with gradient_accumulation_steps {old // unit}")
    else:
        log0(f"WARNING: resuming on {training_args.world_size} processes instead of {layout['world_size']}: the "
             f"global batch {old} is not a multiple of {unit} (per device x processes), so it becomes "
             f"{unit * training_args.gradient_accumulation_steps}; the remaining steps see the data in another order.")
    load_universal_on_resume(training_args)
