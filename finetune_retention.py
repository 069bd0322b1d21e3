"""Retention: how much of the base model's behaviour the model under training keeps (docs/after-training.md:
"Retention").

Before the first step the base model (for an adapter: the same model with its adapters disabled, no second copy)
answers every prompt of a reference set (by default the first 8 of retention_prompts.jsonl, written for this
project, or --retention_data) greedily and at most MAX_NEW_TOKENS tokens, once; a record that ends with an answer
keeps it as its reference answer (the others: the base's own answer is their reference). One teacher-forced forward
pass over prompt + answer gives, at every answer position, the base's top-1 token, the answer token's negative
log-likelihood (NLL) and the base's TOP_K likeliest next tokens with their log-probabilities. At every evaluation and
at the end the same forward pass on the model under training gives (LOGGED):

    eval_retention             the reference answers' likelihood kept: exp(-extra NLL), the geometric mean over
                               their tokens of p_model / p_base, capped at 1 (1 = unchanged; 0.5 = half as likely)
    eval_retention_extra_nll   mean NLL of the reference answer tokens minus the base's (nats per token; 0: unchanged)
    eval_retention_top1        share of reference answer positions where the model still ranks first what the base
                               ranked first (the headline before: on someone else's wording it follows phrasing)
    eval_retention_answers     share of reference answers kept at every position (for the base's own answers: the
                               share it would still give word for word, greedily)
    eval_retention_kl          KL from the base's next-token distribution on the base's own answers (nats per token)

Why the extra NLL: bench/retention_figures.py trains a grid of runs (LoRA and full, several learning rates and
epochs) and ranks them by each candidate figure on several reference sets (the built-in prompts, a quiz with short
answers, the same with sentences, the questions alone) against how many held-out general questions each run still
answers right; the extra NLL on the reference answers ranks them best on every set (bench/README.md). Its resolution:
the answer tokens and prompts it rests on, in the log lines; how many prompts separate two runs: docs.

Every process computes the same batches on the whole set (no rank measures alone: under ZeRO-3 every forward is a
collective), so the figure does not depend on the number of processes. The base figures are a finetune_cache entry
beside the dataset cache (cache_entry names it) and copied into OUTPUT_DIR (a resumed run finds them there).

What finetune.py uses:
  BUILTIN_REFERENCE, check_flags, read_reference  the reference set (read by finetune_data's reader and validator)
  Retention(items, cache_entry, output_dir, ...)  base figures (record_base), measurements (measure), log lines
  RetentionEvaluation                             a Trainer mixin: retention joins every evaluation's metrics; with
                                                  no evaluation set, evaluate() measures retention alone
  RetentionCallback                               base figures at train begin, the --eval_strategy schedule of a
                                                  run without an evaluation set, the --retention_min guard
  eval_schedule, load                             the schedule taken from TrainingArguments; the reference set
"""

import functools
import glob
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from finetune_cache import atomic_write_json, build_entry, check_cache_entry, entry_path
from finetune_console import log0
from finetune_data import DataError, normalized_rows
from finetune_exit_codes import ExitCode
from finetune_faults import Fault
from finetune_report import plot_loss
from finetune_sources import resolve_data_spec

BUILTIN_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "retention_prompts.jsonl")
BUILTIN_PROMPTS = 8  # measured by default: its first 8 (one of each kind, then more), ~500 tokens a measurement
MAX_NEW_TOKENS = 24  # the base's answers: a sentence or so, generated once
BATCH = 8  # sequences per forward pass (the logits of the answer positions only are computed)
TOP_K = 16  # the base's next-token distribution kept at each answer position: its likeliest tokens (+ the rest)


class RetentionFell(Fault):
    exit_code = int(ExitCode.RETENTION)


def check_flags(data_args, training_args):
    """--retention_min / --retention_action, before anything is loaded."""
    low = training_args.retention_min
    if low is not None and not 0 <= low <= 1:
        raise ValueError(f"--retention_min {low}: retention lies between 0 and 1; give e.g. 0.9.")
    if low is not None and not training_args.retention:
        raise ValueError("--retention_min needs the retention measurement: drop --retention false.")
    if data_args.retention_prompts is not None and data_args.retention_prompts < 0:
        raise ValueError(f"--retention_prompts {data_args.retention_prompts}: give a number of prompts, or 0 for all.")
    if data_args.retention_data and not training_args.retention:
        raise ValueError("--retention_data needs the retention measurement: drop --retention false.")


def read_reference(entries, flag):
    """[(messages, tools)] of the reference files, through the training data's reader and validator (the same
    `file:line: field: problem` errors); a conversation may end without an answer (the base will answer it)."""
    stats = {"files": {}, "invalid": {}, "rows": 0}
    try:
        rows = list(normalized_rows(entries, "auto", False, stats, need_answer=False))
    except DataError as e:
        raise DataError(f"{flag}: invalid data, nothing was trained:\n{e}") from None
    out = []
    for row in rows:
        c = json.loads(row["conversation"])
        out.append(([{"role": "user", "content": c["text"]}], None) if "text" in c else (c["messages"], c["tools"]))
    return out


def encode(conversations, tokenizer, tokenize, max_length, template_kwargs=None):
    """-> one {"prompt": ids} per conversation (what the base answers), with "given": {"ids", "positions"} where the
    conversation ends with an answer of its own. positions: the token positions whose next token is an answer
    token (tokenize: finetune.py's conversation -> (ids, labels, status), labels -100 where untrained)."""
    answered = [i for i, (m, _) in enumerate(conversations) if m[-1]["role"] == "assistant"]
    items = [{} for _ in conversations]
    encoded = tokenize([conversations[i] for i in answered]) if answered else []
    for i, (ids, labels, status, *_) in zip(answered, encoded):
        positions = np.flatnonzero(np.asarray(labels[1:]) != -100)
        if not status.startswith(("error:", "dropped:")) and len(positions):
            items[i]["given"] = {"ids": [int(x) for x in ids], "positions": positions.tolist()}
    for i, (messages, tools) in enumerate(conversations):
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False,
                                             **(template_kwargs or {}))
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(prompt) + MAX_NEW_TOKENS <= max_length:
            items[i]["prompt"] = prompt
    return [item for item in items if item]


def _base_model(model):
    """A context in which `model` is its base: adapters disabled (peft), else the model itself."""
    import contextlib

    return model.disable_adapter() if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") \
        else contextlib.nullcontext()


def _synced():
    """ZeRO-3 under several processes: generate() must go on until every rank is done (each step is a
    collective gathering the weights)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return is_deepspeed_zero3_enabled() and distributed


def _device(model):
    return next(p for p in model.parameters()).device


@torch.no_grad()
def generate(model, prompts, eos_token_id, pad_token_id):
    """The model's greedy answers (token lists, through its first end token) to the prompts, BATCH at a time,
    left-padded."""
    config = transformers.GenerationConfig(max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos_token_id,
                                           pad_token_id=pad_token_id, use_cache=True)
    device, answers = _device(model), []
    for k in range(0, len(prompts), BATCH):
        batch = prompts[k:k + BATCH]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=_synced())
        ends = set(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
        for row in out[:, width:].tolist():
            stop = next((j + 1 for j, t in enumerate(row) if t in ends), len(row))
            answers.append(row[:stop])
    return answers


@torch.no_grad()
def score(model, items, pad_token_id, top_ids=None):
    """One teacher-forced forward pass -> at every item's positions, in item order: the model's top-1 token, the NLL
    of the next token and, at `top_ids` (the base's TOP_K likeliest tokens there), the model's log-probabilities;
    without top_ids, the model's own TOP_K (ids, log-probabilities). The output head sees only those positions (a
    pre-hook selects them): the logits of a large vocabulary exist for the answer tokens alone."""
    head = model.get_output_embeddings()
    device, top1, nll, at, ids_out, offset = _device(model), [], [], [], [], 0
    for k in range(0, len(items), BATCH):
        batch = items[k:k + BATCH]
        width = max(len(it["ids"]) for it in batch)
        ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        select = torch.zeros((len(batch), width), dtype=torch.bool)
        for b, it in enumerate(batch):
            ids[b, :len(it["ids"])], mask[b, :len(it["ids"])] = torch.tensor(it["ids"]), 1
            select[b, it["positions"]] = True
        target = F.pad(ids[:, 1:], (0, 1))[select]
        sel = select.to(device)
        # the head sees only the answer positions (bound now: the hook is removed before the next batch)
        hook = head.register_forward_pre_hook(lambda module, args, sel=sel: (args[0][sel][None], *args[1:]))
        try:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits[0]
        finally:
            hook.remove()
        logp = torch.log_softmax(logits.float(), -1)
        top1.append(logp.argmax(-1).cpu())
        nll.append((-logp.gather(1, target.to(device)[:, None])[:, 0]).double().cpu())
        if top_ids is None:
            values, indices = logp.topk(TOP_K, -1)
            at.append(values.double().cpu())
            ids_out.append(indices.cpu())
        else:
            at.append(logp.gather(1, top_ids[offset:offset + len(logp)].to(device)).double().cpu())
        offset += len(logp)
    out = torch.cat(top1), torch.cat(nll), torch.cat(at)
    return (*out, torch.cat(ids_out)) if top_ids is None else out


def kl_from_base(base_logp, logp):
    """KL(base || model) at each position, on the base's TOP_K likeliest tokens and the rest taken as one outcome
    (a lower bound of the full KL; exactly 0 when the model's log-probabilities equal the base's)."""
    p, rest_p = base_logp.exp(), (1 - base_logp.exp().sum(-1)).clamp(min=0)
    rest_q = (1 - logp.exp().sum(-1)).clamp(min=1e-12)
    rest = torch.where(rest_p > 0, rest_p * (rest_p.clamp(min=1e-12).log() - rest_q.log()), 0)
    return ((p * (base_logp - logp)).sum(-1) + rest).clamp(min=0)


class _Eval:
    """model.eval() inside, the previous mode restored after (dropout off while measuring). bitsandbytes' 4-bit layers
    stay in training mode: on CPU, one forward in eval mode repacks their weights for inference for good, and Q-LoRA's
    next training step then fails (bitsandbytes 0.50, Linear4bit.forward); they have no dropout to turn off."""

    def __init__(self, model):
        self.model, self.training = model, model.training

    def __enter__(self):
        self.model.eval()
        for module in self.model.modules():
            if type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
                module.train()

    def __exit__(self, *exc):
        self.model.train(self.training)


class Retention:
    """The reference items, their base figures (record_base, once) and the measurement (measure, figures)."""

    BASE_FILE = "base.json"  # in the cache entry

    def __init__(self, items, cache_entry, output_dir, source, tokenizer):
        self.items, self.cache_entry, self.source = items, cache_entry, source
        self.output_copy = os.path.join(output_dir, "retention_base.json")
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.key = os.path.basename(cache_entry)
        self.base, self.last, self.scored = None, (None, None), None

    def _load(self):
        """The base figures: the cache entry if complete and unchanged (its manifest), else OUTPUT_DIR's copy of
        them if it is this reference set's (a resumed run), else None."""
        if os.path.isdir(self.cache_entry) and check_cache_entry(self.cache_entry) is None:
            paths = (os.path.join(self.cache_entry, self.BASE_FILE), self.output_copy)
        else:
            paths = (self.output_copy,)
        for path in paths:
            try:
                with open(path) as f:
                    cached = json.load(f)
            except (OSError, ValueError):
                continue
            if cached.get("key") == self.key:
                return cached
        return None

    def _save(self, base, cache=True):
        def write(tmp):
            os.makedirs(tmp)
            atomic_write_json(os.path.join(tmp, self.BASE_FILE), base)

        if cache:
            build_entry(self.cache_entry, write)
        os.makedirs(os.path.dirname(self.output_copy), exist_ok=True)
        atomic_write_json(self.output_copy, base)

    def record_base(self, model, is_main, resumed=False):
        """The base's own answers to every prompt and its figures on them and on the reference answers: from the
        cache, else computed now by every process (written by the main one). A resumed full fine-tune cannot be its
        own base: then the figures must come from the cache."""
        start, cached = time.time(), self._load()
        if cached is None and resumed and not hasattr(model, "peft_config"):
            log0("note: retention: the base figures are in neither the cache nor OUTPUT_DIR/retention_base.json, so "
                 "this resumed run measures from the resumed model (retention 1.0 = unchanged since the resume)")
        if cached is not None:
            self.base, how = cached, "from the cache"
            if is_main and not os.path.isfile(self.output_copy):  # a resumed run finds them there
                self._save(cached, cache=False)
        else:
            with _Eval(model), _base_model(model):
                todo = [i for i, it in enumerate(self.items) if "prompt" in it]
                answers = generate(model, [self.items[i]["prompt"] for i in todo], self.eos, self.pad)
                items = [{"record": i, "kind": "own", "ids": self.items[i]["prompt"] + answer,
                          "positions": list(range(len(self.items[i]["prompt"]) - 1,
                                                  len(self.items[i]["prompt"]) + len(answer) - 1))}
                         for i, answer in zip(todo, answers) if answer]
                items += [{"record": i, "kind": "given", **it["given"]} for i, it in enumerate(self.items)
                          if "given" in it]
                items.sort(key=lambda it: len(it["ids"]))  # similar lengths batched together: little padding
                top1, nll, top_logp, top_ids = score(model, items, self.pad)
            self.base = {"key": self.key, "items": items, "top1": top1.tolist(), "nll": nll.tolist(),
                         "top_ids": top_ids.tolist(), "top_logp": top_logp.tolist(), "generated": len(todo)}
            how = f"{len(todo)} answers generated"
            if is_main:
                self._save(self.base)
        self._index()
        self.base_seconds = time.time() - start  # bench/real_model.py reports it
        log0(f"retention: the base model's figures on {self.records} reference prompts ({self.source}; "
             f"{how}, {self.base_seconds:.1f} s); retention before training: 1.000 (1 = the base's behaviour "
             f"unchanged), measured {self.resolution()}")

    def _index(self):
        base, items = self.base, self.base["items"]
        self.base_top1, self.base_nll = torch.tensor(base["top1"]), torch.tensor(base["nll"], dtype=torch.float64)
        self.base_top_ids = torch.tensor(base["top_ids"], dtype=torch.long).reshape(-1, TOP_K)
        self.base_top_logp = torch.tensor(base["top_logp"], dtype=torch.float64).reshape(-1, TOP_K)
        self.owner = torch.repeat_interleave(torch.arange(len(items)), torch.tensor([len(it["positions"])
                                                                                     for it in items]))
        self.record = torch.tensor([it["record"] for it in items])
        self.records = len({it["record"] for it in items})
        answered = {it["record"] for it in items if it["kind"] == "given"}
        # own: the base's own answers; ref: the reference answers where the records have them, else the base's own
        self.subsets = {"own": torch.tensor([it["kind"] == "own" for it in items]),
                        "ref": torch.tensor([it["kind"] == "given" or it["record"] not in answered for it in items])}

    def resolution(self):
        """What eval_retention rests on, for the log: its answer tokens and prompts."""
        ref = self.subsets["ref"]
        given = int((ref & ~self.subsets["own"])[self.owner].sum())
        tokens = int(ref[self.owner].sum())
        parts = [f"{given:,} of the reference answers"] if given else []
        parts += [f"{tokens - given:,} of the base's own answers"] if tokens > given else []
        return f"on {tokens:,} answer tokens of {self.records} prompts ({', '.join(parts)})"

    def summary(self, metrics, prefix="eval"):
        """The closing log line."""
        get = lambda k: metrics[f"{prefix}_{k}"]  # noqa: E731
        return (f"retention after training: {get('retention'):.3f} of the reference answers' likelihood kept (extra "
                f"NLL {get('retention_extra_nll'):+.4f} nats/token {self.resolution()}; top-1 tokens kept "
                f"{get('retention_top1'):.3f}, answers kept whole {get('retention_answers'):.3f}, KL from the base "
                f"on its own answers {get('retention_kl'):.4f})")

    def measure(self, model, step=None, prefix="eval"):
        """{prefix}_ + every name of LOGGED, of `model` now; the same figures again for a second call at the same
        step (the model has not changed)."""
        if step is not None and self.last[0] == step:
            return {f"{prefix}_{k}": v for k, v in self.last[1].items()}
        with _Eval(model):
            self.scored = score(model, self.base["items"], self.pad, self.base_top_ids)
        figures = self.figures(self.scored)
        figures = {name: figures[source] for name, source in LOGGED.items()}
        self.last = (step, figures)
        return {f"{prefix}_{k}": v for k, v in figures.items()}

    def figures(self, scored, records=None):
        """Every figure of a measurement (score()'s output on the base's items), the candidates of
        bench/retention_figures.py: {own|ref}_{top1|extra_nll|kl|answers} on the base's own answers (own) or on the
        reference answers (ref: the record's own answer where it has one, else the base's), and the headline
        (retention). records: the reference records to count (a list, repeats counted: the bench resamples them),
        default all once."""
        top1, nll, logp = scored
        n_items = len(self.base["items"])
        weight = torch.ones(n_items, dtype=torch.float64) if records is None else \
            torch.bincount(torch.as_tensor(records), minlength=len(self.items))[self.record].double()
        same = (top1 == self.base_top1).double()
        changed = torch.zeros(n_items, dtype=torch.float64).index_add_(0, self.owner, 1 - same)
        per_position = {"top1": same, "extra_nll": nll - self.base_nll, "kl": kl_from_base(self.base_top_logp, logp)}
        out = {}
        for subset, member in self.subsets.items():
            w_item = weight * member
            w = w_item[self.owner]
            for name, values in per_position.items():
                out[f"{subset}_{name}"] = float((values * w).sum() / w.sum())
            out[f"{subset}_answers"] = float(((changed == 0).double() * w_item).sum() / w_item.sum())
        # the headline: the reference answers' likelihood kept, exp(-extra NLL) = the geometric mean over their tokens
        # of p_model / p_base, capped at 1 (exactly 1 when unchanged; a model that finds them likelier lost nothing)
        out["retention"] = min(1.0, math.exp(-out["ref_extra_nll"]))
        return out


# the figures logged at every evaluation (eval_ + the name): name -> the figure of Retention.figures
LOGGED = {"retention": "retention", "retention_extra_nll": "ref_extra_nll", "retention_top1": "ref_top1",
          "retention_answers": "ref_answers", "retention_kl": "own_kl"}


class RetentionEvaluation:
    """Trainer mixin (before Trainer in the bases). `self.retention`: a Retention or None."""

    retention = None

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        if self.retention is not None:
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            output.metrics.update(self.retention.measure(self.model, self.state.global_step, prefix))
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        if eval_dataset is not None or self.eval_dataset is not None or self.retention is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        start, again = time.time(), self.retention.last[0] == self.state.global_step
        metrics = self.retention.measure(self.model, self.state.global_step, metric_key_prefix)
        if again:  # the final evaluation right after a scheduled one: already logged and checked
            return metrics
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 4)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def eval_schedule(training_args, has_eval):
    """A run without an evaluation set measures retention at the end, and also on --eval_strategy steps|epoch if
    given (the Trainer itself then must not evaluate: it has nothing to evaluate) -> (strategy, steps) or None."""
    strategy = transformers.IntervalStrategy(training_args.eval_strategy)
    if has_eval or not training_args.retention or strategy == transformers.IntervalStrategy.NO:
        return None
    training_args.eval_strategy = transformers.IntervalStrategy.NO
    return strategy, training_args.eval_steps or training_args.logging_steps


class RetentionCallback(transformers.TrainerCallback):
    """The base figures at train begin; a run without an evaluation set's schedule; the --retention_min guard."""

    def __init__(self, retention, schedule=None, minimum=None, action="stop"):
        self.retention, self.schedule, self.minimum, self.action = retention, schedule, minimum, action
        self.every = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.retention.record_base(model, state.is_world_process_zero, resumed=state.global_step > 0)
        if self.schedule and self.schedule[0] == transformers.IntervalStrategy.STEPS:
            steps = self.schedule[1]
            self.every = max(1, math.ceil(state.max_steps * steps) if steps < 1 else int(steps))

    def on_train_end(self, args, state, control, **kwargs):
        if args.load_best_model_at_end:  # other weights now: the final evaluation measures again
            self.retention.last = (None, None)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0:
            control.should_evaluate = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.schedule and self.schedule[0] == transformers.IntervalStrategy.EPOCH:
            control.should_evaluate = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_retention")
        if self.minimum is None or value is None or value >= self.minimum:
            return
        line = (f"retention fell below --retention_min at step {state.global_step}: eval_retention {value:.3f} < "
                f"{self.minimum:g} (extra NLL {metrics.get('eval_retention_extra_nll', float('nan')):+.4f} nats/token "
                f"{self.retention.resolution()})")
        if self.action == "warn":
            log0(f"WARNING: {line}")
            return
        if state.is_world_process_zero:
            plot_loss(state.log_history, args.output_dir)
            state.save_to_json(os.path.join(args.output_dir, "trainer_state.json"))
        raise RetentionFell(f"{line}; training stopped, nothing of this step saved (the last checkpoint, if any, is "
                            f"kept; exit code {int(ExitCode.RETENTION)}). Lower the learning rate or the epochs, or "
                            "--retention_action warn", here=state.is_world_process_zero)


# ---------------------------------------------------------------------------------------------
# Loading the reference set for a run (finetune.train)
# ---------------------------------------------------------------------------------------------


RETENTION_CACHE_VERSION = "2"  # bump when the cached base figures change meaning (2: own answers, top-K)


def cache_entry(entries, tokenizer, model_args, data_args, training_args, lora_args):
    """The cache entry of the base model's retention figures (finetune_cache.build_entry): beside the tokenized
    datasets, keyed by the reference files and tokenization (the dataset cache key) and by the model's weights and
    how they are computed."""
    weights = sorted(glob.glob(os.path.join(model_args.model_name_or_path, "*.safetensors")) +
                     glob.glob(os.path.join(model_args.model_name_or_path, "*.bin")))
    h = hashlib.sha256(json.dumps({
        "model": model_args.model_name_or_path,
        "weights": [[os.path.abspath(w), os.stat(w).st_size, os.stat(w).st_mtime_ns] for w in weights],
        "dtype": [training_args.bf16, training_args.fp16], "q_lora": lora_args.q_lora,
        "attn": model_args.attn_implementation, "prompts": data_args.retention_prompts,
        "version": RETENTION_CACHE_VERSION,
    }, sort_keys=True).encode())
    return f"{entry_path(entries, tokenizer, data_args, training_args)}-retention-{h.hexdigest()[:20]}"


def load(tokenizer, model_args, data_args, training_args, lora_args, tokenize_arrays):
    """The retention reference set, read (every process: it is small) and tokenized by finetune.py's preprocess
    (tokenize_arrays: its _tokenize_arrays) -> Retention, or None when off.
    A bad --retention_data stops every process with the `file:line` errors of --data_path (said once, by rank 0)."""
    if not training_args.retention:
        return None
    if training_args.sequence_parallel_size > 1:  # its attention expects every sequence split across the group
        log0("note: retention is not measured under sequence parallelism (--sequence_parallel_size > 1)")
        return None
    spec = data_args.retention_data or BUILTIN_REFERENCE
    entries = resolve_data_spec(spec)[0]
    try:
        conversations = read_reference(entries, "--retention_data" if data_args.retention_data else "built-in set")
        n = data_args.retention_prompts
        n = BUILTIN_PROMPTS if n is None and not data_args.retention_data else n
        conversations = conversations[:n or None]
    except DataError:
        if training_args.process_index != 0:
            sys.exit(ExitCode.BAD_INPUT)
        raise
    tokenize = functools.partial(tokenize_arrays, tokenizer, max_length=training_args.model_max_length,
                                 template_kwargs=data_args.template_kwargs)
    items = encode(conversations, tokenizer, tokenize, training_args.model_max_length,
                             data_args.template_kwargs)
    if not items:
        raise DataError(f"{spec}: no reference prompt fits --model_max_length {training_args.model_max_length}.")
    source = data_args.retention_data or "built-in set"
    return Retention(items, cache_entry(entries, tokenizer, model_args, data_args, training_args, lora_args),
                     training_args.output_dir, source, tokenizer)
