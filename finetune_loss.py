"""The training loss over trained positions only, with at most one chunk of logits alive at a time.

    TrainedTokenLoss()(model, head, inputs, target, mask) -> (outputs, per-token CE at mask)

finetune.py's Trainer calls it once per micro-batch (docs/training.md: "Throughput"); chunked_cross_entropy and
fused_cross_entropy are the two ways the CE is computed from the head's input."""

import math

import torch
import torch.nn.functional as F

from finetune_console import log0
from finetune_report import loss_chunk_tokens

# With a large vocabulary the logits are training's largest tensor (151,936 x 8 x 2,048 tokens: 10 GB
# in fp32), and most positions (prompt, padding) take no loss. So the model runs with its output head
# applied to the last position only (a forward pre-hook slices the head's input, and keeps the hidden
# states it was given); the positions whose next token is trained are gathered, and the head and the
# fp32 cross-entropy run on them chunk by chunk under activation checkpointing: one chunk's logits
# exist at a time, in the forward and when the backward recomputes them (all but the last chunk). The head is
# called as a module, so a LoRA on lm_head, Q-LoRA and DeepSpeed ZeRO-3 (which gathers the weight in the module's
# hooks; tied embeddings included) see an ordinary call. A model that changes its head's output
# (logit softcapping, scaled logits) is noticed on the first batch and keeps the full logits.


def _chunk_ce(head, hidden, target):
    return F.cross_entropy(head(hidden).float(), target, reduction="none")


def chunked_cross_entropy(head, hidden, target, chunk_tokens):
    """fp32 cross-entropy of head(hidden[i]) against target[i], for hidden [n, h] and target [n] (any
    selection of positions, e.g. one sequence shard), computed `chunk_tokens` rows at a time.
    Every rank makes as many head calls as the rank with the most chunks (empty chunks if need be):
    under ZeRO-3 each call gathers the head's weight with a collective that all ranks must join."""
    from torch.utils.checkpoint import checkpoint

    n_chunks = torch.tensor([max(1, math.ceil(len(target) / chunk_tokens))], device=hidden.device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(n_chunks, op=torch.distributed.ReduceOp.MAX)
    starts = [i * chunk_tokens for i in range(int(n_chunks))]
    # determinism_check off: ZeRO-3 releases a frozen head weight (LoRA) right after the recomputing call,
    # so its saved shape reads [0] by the time torch compares; its backward hook gathers it again.
    pieces = [checkpoint(_chunk_ce, head, hidden[i:i + chunk_tokens], target[i:i + chunk_tokens],
                         use_reentrant=False, determinism_check="none") for i in starts[:-1]]
    # The backward starts with the last chunk, so its logits can be kept rather than recomputed: one
    # chunk is still all that exists at a time, and a small vocabulary (one chunk) costs no recompute.
    last = starts[-1]
    return torch.cat(pieces + [_chunk_ce(head, hidden[last:last + chunk_tokens], target[last:last + chunk_tokens])])


def fused_cross_entropy(head, hidden, target):
    """The same per-token CE from Cut Cross-Entropy's GPU kernel (logits stay in on-chip memory);
    filter_eps=None keeps every gradient term, so gradients are exact."""
    from cut_cross_entropy import linear_cross_entropy

    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise ValueError(f"--fused_loss cce needs lm_head to be a plain Linear without bias, not {type(head).__name__}")
    return linear_cross_entropy(hidden, head.weight, target, reduction="none", filter_eps=None).float()


class TrainedTokenLoss:
    """model(**inputs) -> (outputs, per-token CE at the positions where `mask` is set), mask and target
    being [batch, seq] with target[t] what position t predicts (shifted_labels). outputs.logits holds the last
    position only (all of them on the full-logits fallback)."""

    def __init__(self, chunk_tokens=0, fused=False):
        self.chunk_tokens, self.fused, self.chunked = chunk_tokens, fused, None  # chunked: decided on 1st batch

    def __call__(self, model, head, inputs, target, mask):
        if self.chunked is False:
            outputs = model(**inputs, use_cache=False)
            logits = outputs.logits[mask]
            return outputs, F.cross_entropy(logits.float(), target[mask], reduction="none")
        if head is None:  # the model names no output head
            return self._fall_back(model, head, inputs, target, mask)
        seen = {}

        def last_position_only(module, args):
            seen["hidden"] = args[0]
            return (args[0][:, -1:], *args[1:])

        hooks = [head.register_forward_pre_hook(last_position_only),
                 head.register_forward_hook(lambda module, args, out: seen.update(logits=out))]
        try:
            outputs = model(**inputs, use_cache=False)
        finally:
            for hook in hooks:
                hook.remove()
        if self.chunked is None:
            hidden, logits = seen.get("hidden"), seen.get("logits")
            self.chunked = (hidden is not None and hidden.shape[:2] == mask.shape
                            and torch.equal(logits.to(outputs.logits.dtype), outputs.logits))
            if not self.chunked:
                return self._fall_back(model, head, inputs, target, mask)
        hidden = seen["hidden"][mask]
        if self.fused:
            return outputs, fused_cross_entropy(head, hidden, target[mask])
        chunk = loss_chunk_tokens(outputs.logits.shape[-1], self.chunk_tokens)
        return outputs, chunked_cross_entropy(head, hidden, target[mask], chunk)

    def _fall_back(self, *args):
        self.chunked = False
        log0("loss: this model's logits are not its output head's (e.g. softcapping or scaled logits), so the "
             "loss is computed from the full logits (more memory)")
        return self(*args)


def check_fused_loss_flag(fused_loss, zero3, lora_targets):
    """--fused_loss cce: refused before anything loads where Cut Cross-Entropy cannot run."""
    if fused_loss == "none":
        return
    import importlib.util

    if not torch.cuda.is_available():
        raise ValueError("--fused_loss cce needs a GPU; drop it (the chunked loss is the default everywhere).")
    if importlib.util.find_spec("cut_cross_entropy") is None:
        raise ValueError("--fused_loss cce needs the cut-cross-entropy package: pip install cut-cross-entropy, "
                         "or drop the flag.")
    if zero3 or "lm_head" in lora_targets:
        raise ValueError("--fused_loss cce reads lm_head's weight directly: not with ZeRO-3 (partitioned) nor a "
                         "LoRA on lm_head; drop the flag or use ds_config_zero2.json / other LoRA targets.")
