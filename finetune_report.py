"""What finetune.py reports and plans with: the per-device memory estimate (and the loss chunk
size its budget allows), the padding share of a batching, token statistics, the data report (--dry_run,
data_report.json) and its log lines, and the loss plot (LossPlotCallback redraws it while training). Functions
of their arguments; finetune.py imports them
(docs/training.md: "Memory estimate"; docs/after-training.md: "Loss plot and TensorBoard")."""

import functools
import os
import time

import numpy as np
import torch
from transformers import TrainerCallback

from finetune_console import log0, suggest
from finetune_moe import active_parameters, expert_parameter_count

LOSS_CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk


def loss_chunk_tokens(vocab_size, requested=0):
    return requested or max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))


def smooth(values):
    """TensorBoard's debiased exponential moving average. The weight grows with the number of points
    (0 up to 10 points, 0.5 at 20, 0.9 from 100) so a short run is not flattened towards its first value."""
    weight = min(0.9, max(0.0, 1 - 10 / len(values)))
    out, ema = [], 0.0
    for i, value in enumerate(values, 1):
        ema = weight * ema + (1 - weight) * value
        out.append(ema / (1 - weight ** i))
    return out


def plot_loss(log_history, output_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    retention = [(h["step"], h["eval_retention"]) for h in log_history if "eval_retention" in h]
    balance = [(h["step"], h["expert_maxvio"]) for h in log_history if "expert_maxvio" in h]
    if not train and not evals:
        return
    # panels below, on the same steps: what of the base model is kept (finetune_retention), how evenly an MoE
    # model's tokens are routed (finetune_moe: expert_maxvio, 0 = even)
    panels = [p for p in ((retention, "tab:green", "retention", "retention (1 = base unchanged)"),
                          (balance, "tab:red", "expert_maxvio", "expert imbalance (MaxVio, 0 = even)")) if p[0]]
    if panels:
        fig, axes = plt.subplots(1 + len(panels), 1, figsize=(7, 4 + 2 * len(panels)), sharex=True,
                                 height_ratios=(2,) + (1,) * len(panels))
        ax = axes[0]
        for below, (points, color, ylabel, label) in zip(axes[1:], panels):
            below.plot(*zip(*points), "o-" if points is retention else "-", color=color, label=label)
            below.set_ylabel(ylabel)
            below.grid(alpha=0.3)
            below.legend()
        axes[-1].set_xlabel("step")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, label="train loss")
        ax.plot(steps, smooth(losses), color="tab:blue", label="train loss (smoothed)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="eval loss")
    ax.set_title(f"{os.path.basename(os.path.normpath(output_dir))}: loss per step")
    ax.set_xlabel("" if panels else "step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    os.makedirs(output_dir, exist_ok=True)
    fig.savefig(os.path.join(output_dir, "training_loss.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


class LossPlotCallback(TrainerCallback):
    """OUTPUT_DIR/training_loss.png, refreshed at most every 30 s while training and at the end."""

    def __init__(self):
        self.last = 0.0

    def on_log(self, args, state, control, **kwargs):
        if state.is_world_process_zero and time.time() - self.last > 30:
            self.last = time.time()
            plot_loss(state.log_history, args.output_dir)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(state.log_history, args.output_dir)


def padding_share(lengths, batch_size, packing, grouped, seed, group_size=None):
    """Fraction of computed positions that are padding under the chosen batching. Grouping mimics
    Trainer's LengthGroupedSampler, which sorts mega-batches of group_size (= micro batch x accumulation)."""
    lengths = np.asarray(lengths)
    if packing or len(lengths) == 0:
        return 0.0
    if grouped:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = np.asarray(get_length_grouped_indices(lengths.tolist(), group_size or batch_size,
                                                      generator=torch.Generator().manual_seed(seed)))
    else:
        order = np.random.default_rng(seed).permutation(len(lengths))
    batches = [lengths[order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
    padded = sum(int(b.max()) * len(b) for b in batches)
    return round(1 - lengths.sum() / padded, 4)


_PARAM_COUNTS = {}


def _param_counts(config):
    """(all parameters, parameters in Linear layers except lm_head, sum of in+out features of those layers, the
    parameters one token uses (MoE: the experts it is not routed to left out; finetune_moe)), counted on a
    meta-device model: no memory, no weights read."""
    import transformers
    from transformers import AutoModelForCausalLM

    key = config.to_json_string()
    if key not in _PARAM_COUNTS:
        # set_zero3_state: no deepspeed.zero.Init (it would partition, and check batch sizes) under ZeRO-3
        with torch.device("meta"), transformers.modeling_utils.set_zero3_state():
            model = AutoModelForCausalLM.from_config(config)
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        total = sum(p.numel() for p in model.parameters())
        _PARAM_COUNTS[key] = (total, sum(m.weight.numel() for m in linears),
                              sum(m.in_features + m.out_features for m in linears),
                              active_parameters(config, total, expert_parameter_count(model)))
    return _PARAM_COUNTS[key]


def estimate_memory_gb(config, method, stage, world, micro_tokens, dtype_bytes, lora_r, grad_ckpt, sp=1,
                       loss_chunk=0):
    """Peak memory per device in GiB for method full | lora | q-lora under ZeRO `stage` (0 = none) on
    `world` devices, for a micro-batch of `micro_tokens` tokens split over `sp` sequence-parallel ranks.
    Formula (docs/training.md, "Memory estimate"): 1.1 x (weights + gradients + optimizer states + activations + logits
    of one loss chunk), ZeRO dividing what it partitions (over all `world` ranks), sequence parallelism the
    activations; `loss_chunk` is --loss_chunk_tokens (0: automatic)."""
    params, linear, lora_dims, active = _param_counts(config)
    if method == "full":
        weights, trainable = params * dtype_bytes, params
        grads, optim = params * dtype_bytes, params * (12 if dtype_bytes == 2 else 8)  # fp32 master + Adam m, v
    else:  # adapters on every Linear but lm_head, kept in fp32 by PEFT: fp32 grads + Adam m, v
        trainable = lora_r * lora_dims
        # q-lora: 4-bit NF4 linear weights + double-quant constants (~3%), the rest in the compute dtype
        weights = params * dtype_bytes if method == "lora" else linear * 0.5 * 1.03 + (params - linear) * dtype_bytes
        weights += trainable * 4
        grads, optim = trainable * 4, trainable * 8
    if stage >= 1:
        optim /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    h, layers = config.hidden_size, config.num_hidden_layers
    # Activations, bytes per token (Korthikanti et al. 2022, flash/sdpa attention): 34h per layer in 16-bit;
    # with gradient checkpointing each layer keeps only its 2h-byte input and one layer is recomputed at a time.
    per_token = h * (2 * layers + 34 if grad_ckpt else 34 * layers) * dtype_bytes / 2
    acts = micro_tokens / sp * per_token
    # The loss holds one chunk's logits at a time: their values, fp32 copy and gradient
    chunk = min(micro_tokens / sp, loss_chunk_tokens(config.vocab_size, loss_chunk))
    logits = chunk * config.vocab_size * (dtype_bytes + 8)
    gib = 1024 ** 3
    parts = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts, "logits": logits}
    return {"params": params, "active_params": active, "trainable_params": trainable,
            **{k: round(v / gib, 3) for k, v in parts.items()},
            "total_gb": round(sum(parts.values()) * 1.1 / gib, 3)}  # +10% allocator/fragmentation


def token_stats(dataset):
    lengths = np.asarray(dataset["length"][:])  # [:] reads the column at once, not row by row
    trained = np.asarray(dataset["n_trained"][:])
    if len(lengths) == 0:
        return {}
    pct = lambda q: int(np.percentile(lengths, q))  # noqa: E731
    return {"samples": int(len(lengths)), "tokens": int(lengths.sum()), "trained_tokens": int(trained.sum()),
            "mean": round(float(lengths.mean()), 1), "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "max": int(lengths.max())}




def data_report(train, evaluation, reports, first_sample_marked, config, data_args, training_args, lora_args,
                packing):
    """The data report (OUTPUT_DIR/data_report.json, --dry_run): per-file counts, token statistics, the batch plan,
    padding share, the first sample with its trained parts marked, and the memory estimate."""
    from finetune_distributed import batch_plan, zero_stage

    plan = batch_plan(training_args, len(train), data_args.dry_run_world_size)
    world, sp, micro = plan["world_size"], plan["sequence_parallel_size"], plan["per_device_batch_size"]
    stats = token_stats(train)
    lengths = np.asarray(train["length"][:])
    grouped = training_args.train_sampling_strategy == "group_by_length"
    report = {
        "train": {**reports[0], "tokens": stats,
                  "padding_share": padding_share(lengths, micro, packing, grouped, training_args.seed,
                                                 micro * training_args.gradient_accumulation_steps)},
        "batching": "packing" if packing else ("length-grouped padding" if grouped else "padding"),
        **plan,
    }
    report["first_sample_marked"] = first_sample_marked
    report["chat_template_kwargs"] = data_args.template_kwargs  # chat.py renders prompts with them too
    if evaluation is not None:
        report["eval"] = {**reports[1], "tokens": token_stats(evaluation)}
    method = "q-lora" if lora_args.q_lora else "lora" if training_args.use_lora else "full"
    # The peak is set by the largest micro-batch: micro x longest sample when padding, the micro longest
    # samples end to end when packing.
    longest = np.sort(lengths)[-micro:]
    micro_tokens = int(longest.sum()) if packing else micro * int(longest[-1])
    stage = zero_stage(training_args)
    dtype_bytes = 2 if (training_args.bf16 or training_args.fp16 or lora_args.q_lora) else 4
    estimate = functools.partial(estimate_memory_gb, config, world=world, micro_tokens=micro_tokens,
                                 dtype_bytes=dtype_bytes, lora_r=lora_args.lora_r,
                                 grad_ckpt=training_args.gradient_checkpointing, sp=sp,
                                 loss_chunk=training_args.loss_chunk_tokens)
    report["memory_estimate"] = {
        "method": method, "zero_stage": stage, "world_size": world, "sequence_parallel_size": sp,
        "per_device_micro_batch_tokens": micro_tokens // sp,
        **estimate(method=method, stage=stage),
        "total_gb_by_method_and_zero_stage": {  # Q-LoRA cannot run under ZeRO-3
            m: {f"zero{z}": None if (m, z) == ("q-lora", 3) else estimate(method=m, stage=z)["total_gb"]
                for z in (0, 2, 3)} for m in ("full", "lora", "q-lora")},
    }
    return report


def log_data_summary(report):
    estimate = report["memory_estimate"]
    if estimate["active_params"] != estimate["params"]:  # MoE: memory holds them all, a token uses the active ones
        log0(f"parameters: {estimate['params']:,} total (the memory estimate's), {estimate['active_params']:,} active "
             "per token (the compute per token)")
    t = report["train"]
    log0(f"data: {t['samples']} samples from {t['records_valid']} valid records "
         f"({sum(f['records'] for f in t['files'].values())} read in {len(t['files'])} files); "
         f"truncated {t['truncated']}, dropped {t['dropped'] or 0}, invalid {t['invalid'] or 0}")
    if "held_out" in t:
        h = t["held_out"]
        log0(f"eval: {h['samples']} samples held out from the training data (--val_size {h['val_size']:g}), per "
             f"source {h['samples_per_source']}")
    if t.get("token_accounting"):
        log0(token_accounting_line(t["token_accounting"]))
    for line in placeholder_lines(t.get("placeholders")) + key_lines(t.get("keys")):
        log0(line)
    s = t["tokens"]
    log0(f"tokens: {s['tokens']:,} total, {s['trained_tokens']:,} trained; length mean {s['mean']} "
         f"p50 {s['p50']} p90 {s['p90']} p99 {s['p99']} max {s['max']}; padding share {t['padding_share']:.1%} "
         f"with {report['batching']}")


def token_accounting_line(a):
    """One log line: the tokens read, in samples and trained, and what truncation cost (finetune.token_accounting)."""
    line = (f"tokens read {a['read']:,}: {a['in_samples']:,} in samples ({a['trained']:,} trained), "
            f"{a['lost_to_truncation']:,} lost to truncation ({a['samples_truncated']} samples cut to "
            f"--model_max_length), {a['in_dropped_records']:,} in dropped records")
    if a["long_texts_split"]:
        line += f"; {a['long_texts_split']} long texts split into {a['blocks']} blocks, every token kept"
    lossy = [f"{fmt} {b['lost_to_truncation']:,}" for fmt, b in a["by_format"].items() if b["lost_to_truncation"]]
    return line + (f" (lost per format: {', '.join(lossy)})" if len(a["by_format"]) > 1 and lossy else "")


def key_lines(keys):
    """The log lines of the key ledger (finetune_data.read_keys): the keys read under another name, and those no
    format reads, each once with the number of records that have it (data_report.json: keys)."""
    def listed(found, first=False):
        names, shown, at = sorted(found, key=lambda k: -found[k]["records"]), [], None
        for k in names[:8]:  # where the first record with it is, when that is not where the one before was
            where = f", first at {found[k]['first']}" if first and found[k]["first"] != at else ""
            shown.append(f"{k} ({found[k]['records']} records{where})")
            at = found[k]["first"]
        return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

    lines = []
    if (keys or {}).get("read_as"):
        lines.append(f"data: read as known keys: {listed(keys['read_as'])}")
    if (keys or {}).get("not_read"):
        lines.append(f"data: keys no format reads, not trained (data_report.json keys.not_read; to read one as a "
                     f"known key: --columns NAME=KEY): {listed(keys['not_read'], first=True)}")
    return lines


def placeholder_lines(found):
    """The log lines about {{NAME}} placeholders (finetune_data.fill_placeholders): one warning when trained text
    holds unfilled ones, one when a --placeholders name is in no record; nothing when all is well."""
    if not found:
        return []
    lines = []
    if found["records"]:
        names = sorted(found["by_name"], key=lambda n: -found["by_name"][n])
        shown = ", ".join("{{%s}} %d times" % (n, found["by_name"][n]) for n in names[:5])
        shown += ", ..." if len(names) > 5 else ""
        lines.append(f"warning: {found['records']} records train unfilled placeholders ({shown}), the first at "
                     f"{found['first']}: fill them with --placeholders {','.join(n + '=...' for n in names[:5])}, "
                     "or edit the data")
    unused = [n for n in found.get("asked", ()) if n not in found["filled"]]
    if unused:
        lines.append(f"warning: --placeholders {', '.join(unused)}: no {{{{{unused[0]}}}}} in the data"
                     f"{suggest(unused[0], list(found['by_name']))} (placeholders are written {{{{NAME}}}})")
    return lines


def token_accounting(tokenized, status, files):
    """Where the data's tokens went, before --val_size and the ratios, in all and per format: read (every valid
    record rendered and tokenized whole), in_samples, trained, lost_to_truncation (cut off a sample to fit
    --model_max_length: a conversation's last turns, a text's tail with --long_text cut), in_dropped_records
    (records dropped whole); and the long texts split into blocks (every token kept)."""
    columns = {k: np.asarray(tokenized[k][:]) for k in ("n_read", "length", "n_trained")}
    origins = np.asarray(tokenized["origin"][:], dtype=object)
    formats = np.asarray([files[o.rsplit(":", 1)[0]].get("format", "?") for o in origins], dtype=object)
    ok = np.asarray([not s.startswith("error:") for s in status], dtype=bool)
    kept = np.asarray([s in ("", "truncated", "split") for s in status], dtype=bool)
    split = np.asarray([s == "split" for s in status], dtype=bool)

    def count(rows):
        n_read, length, n_trained = (columns[k][rows] for k in ("n_read", "length", "n_trained"))
        k = kept[rows]
        return {"read": int(n_read.sum()), "in_samples": int(length[k].sum()), "trained": int(n_trained[k].sum()),
                "lost_to_truncation": int((n_read - length)[k].sum()),
                "samples_truncated": int((k & (n_read > length)).sum()),
                "in_dropped_records": int(n_read[~k].sum()),
                "long_texts_split": len(set(origins[rows & split])), "blocks": int((rows & split).sum())}

    report = count(ok)
    report["by_format"] = {f: count(ok & (formats == f)) for f in sorted(set(formats[ok]))}
    return report
