"""The per-step agreement among ranks: at every optimizer-step end each rank votes, every vote travels in ONE
all-reduce (MAX), and every rank then acts on the same values, so all ranks stop, save or go on after the same
step (a rank acting alone would leave the others waiting in the next collective: ZeRO-3's save, the next step).

    agreement = StepAgreement()                 # one per run, in the Trainer's callbacks (anywhere in the list)
    agreement.register(name, vote, decide)      # by each feature, once

    vote(device) -> this rank's value: an int >= 0, or a 1-element device tensor (no sync of its own)
    decide(value, args, state, **kwargs) -> STOP_AND_SAVE | STOP_DISCARDING_STEP | None, given the value all
        ranks agree on (the largest vote)

The features' outcomes are combined the same way whatever order they registered in: a step that one feature
discards (its weights must not be kept) is neither saved nor evaluated, even when another asks to save it; one to
save stops the run after a checkpoint of that step (written like a --save_steps one). Registered here:
finetune_preemption.PreemptionCallback ("preemption": the signal number) and finetune_faults.NonFiniteGuard
("nonfinite": 1 when this rank's loss or gradient norm is NaN/inf). Cost per step: one all-reduce of one number
per feature, and one read of its result (measured: bench/bench_faults.py).
"""

import torch
import transformers

STOP_AND_SAVE = "stop and save"
STOP_DISCARDING_STEP = "stop, discarding the step"


class StepAgreement(transformers.TrainerCallback):
    def __init__(self):
        self.features = {}  # name -> (vote, decide), in registration order (the same on every rank)
        self.agreed = {}  # name -> the value of the last step end

    def register(self, name, vote, decide):
        if name in self.features:
            raise ValueError(f"StepAgreement: {name!r} is registered already")
        self.features[name] = (vote, decide)

    def agree(self, device):
        """Every feature's vote, reduced over all ranks (MAX) in one all-reduce -> {name: agreed value}."""
        votes = [vote(device) for vote, _ in self.features.values()]
        if not votes:
            return {}
        if any(torch.is_tensor(v) for v in votes):
            votes = torch.stack([v.reshape(()).to(torch.int64) if torch.is_tensor(v) else
                                 torch.tensor(v, dtype=torch.int64, device=device) for v in votes])
        else:
            votes = torch.tensor(votes, dtype=torch.int64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(votes, op=torch.distributed.ReduceOp.MAX)
        self.agreed = dict(zip(self.features, votes.tolist()))
        return self.agreed

    def on_step_end(self, args, state, control, **kwargs):
        agreed = self.agree(args.device)
        outcomes = {decide(agreed[name], args, state, **kwargs) for name, (_, decide) in self.features.items()}
        if STOP_DISCARDING_STEP in outcomes:  # nothing of this step is saved or evaluated; it is logged
            control.should_save = control.should_evaluate = False
            control.should_log = control.should_training_stop = True
        elif STOP_AND_SAVE in outcomes:  # the checkpoint of this step, then stop (the grace period is for saving)
            control.should_save = control.should_training_stop = True
            control.should_evaluate = False
