"""Supervised fine-tuning (SFT) of chat LLMs: full, LoRA, Q-LoRA and DoRA, on one device or many.

    python finetune.py --model_name_or_path MODEL --data_path data.jsonl --output_dir out
    torchrun --nproc_per_node 8 finetune.py ... --deepspeed ds_config_zero3.json
    python finetune.py config.yaml [--any_flag value]         # flags from a JSON/YAML file

Data flow: files, dataset folders, Hub ids -> format adapters (every format becomes `messages` + `tools`) -> validation
(`file:line: field: problem`) -> `tokenize_conversation` (input_ids + labels, loss only on what the
assistant says) -> a cached Arrow dataset -> batching (length-grouped padding or padding-free
packing) -> Trainer (step-wide token-normalised loss, per-source metrics) -> save -> merge/chat.

This file is the training script, in the order a run goes. Self-contained machinery sits next to it:
  finetune_cli.py          command line: flags, config files, repeated flags, ranges
  finetune_sources.py      where data comes from: --data_path entries, dataset folders, Hub ids, dataset_info.json
  finetune_data.py         data files and formats: reading, format adapters, record validation
  finetune_coverage.py     the check that a chat template renders everything a conversation holds
  finetune_template.py     chat templates: what of a rendered conversation is trained, end-of-turn tokens
  finetune_tokens.py       the vocabulary a template needs (added turn tokens, resizing, eos in the configs)
  finetune_cache.py        the dataset cache: key, build into a temporary folder, manifest, reuse, clearing
  finetune_checkpoints.py  checkpoints: weight file names, complete, newest, the one to resume
  finetune_distributed.py  DeepSpeed config, batch plan, sequence parallelism, how a rank ends (exit_when_done:
                           every exit code recorded; stop_together: a bad flag stops all ranks), library
                           workarounds (and the table of every library internal relied on: LIBRARY_INTERNALS)
  finetune_agreement.py    the per-step agreement among ranks (one all-reduce) that the step-end features use
  finetune_preemption.py   save on SIGTERM/SIGUSR1, resume on another number of processes
  finetune_faults.py       a diverging run, a failed save: a clear stop
  finetune_loss.py         the loss over trained positions, one chunk of logits at a time
  finetune_moe.py          MoE models: the router loss over real tokens, expert balance, LoRA on fused experts
  finetune_exit_codes.py   the exit codes in one table (ExitCode): bad input, diverged, retention, save, preempted
  finetune_launch.py       torchrun as finetune.sh starts it: a deliberate stop ends with the workers' own code
  finetune_adapter.py      an adapter put back on its base (chat.py, merge_lora.py), peft's wrapping
  finetune_console.py      what the console shows: rank-0 log lines, did-you-mean, no library progress bars
  finetune_report.py       memory estimate, token statistics, data report, loss plot
  finetune_retention.py    how much of the base model's behaviour the model under training keeps (eval_retention)
"""

import contextlib
import functools
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from finetune_console import log0, quiet_known_notices, silence_progress_bars

quiet_known_notices()  # before transformers is imported: bitsandbytes speaks on import
import transformers

silence_progress_bars()  # transformers' and datasets' own bars repeat what the log says
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer

import finetune_moe as moe
from finetune_adapter import peft_wrapping
from finetune_agreement import StepAgreement
from finetune_cache import build_entry, cache_write_error, dataset_cache_root, entry_path
from finetune_checkpoints import find_resume_checkpoint, remove_new_files
from finetune_cli import check_ranges, parse_args as parse_flags
from finetune_coverage import LOST, TemplateDropsData, dropped_piece, template_drops_data
from finetune_data import (
    NAME_MODES,
    DataError,
    RecordError,
    held_out_split,
    invalid_reason,
    is_trained,
    normalized_rows,
    sample_indices,
    tally,
)
from finetune_distributed import (
    SequenceParallelLoader,
    batch_plan,
    exit_when_done,
    gradient_divisor,
    sequence_parallel_loader,
    setup_sequence_parallel,
    skip_first_batches_routed_to,
    start_cpu_deepspeed_state,
    stop_together,
    zero_stage,
)
from finetune_exit_codes import ExitCode, StopQuietly
from finetune_faults import Fault, FaultHandling, NonFiniteGuard, checkpoint_bytes, saving, warn_if_low_space
from finetune_loss import TrainedTokenLoss, check_fused_loss_flag
from finetune_preemption import Preempted, PreemptionCallback, adapt_to_world_size
from finetune_report import LossPlotCallback, data_report, log_data_summary, token_accounting
from finetune_retention import (
    RetentionCallback,
    RetentionEvaluation,
    check_flags as check_retention_flags,
    eval_schedule,
    load as load_retention,
)
from finetune_sources import check_data_flags, file_id, resolve_data_spec
from finetune_template import (
    IGNORE_INDEX,
    chat_template_source,
    check_chat_template_flag,
    encode_regions,
    marked_text,
    reasoning_regions,
    render_conversation,
    show_masking,
)
from finetune_tokens import (
    fit_model_to_tokenizer,
    keep_adapter_small,
    lora_token_indices,
    prepare_tokenizer,
    save_stop_tokens,
)

LORA_DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=None, metadata={"help": "Model directory or hub id, loaded with AutoModelForCausalLM."}
    )
    trust_remote_code: bool = field(default=False,
                                    metadata={"help": "Allow custom modelling code from the model repo."})
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto | sdpa | eager | flash_attention_2. auto: flash_attention_2 on GPU when "
                  "flash-attn is installed, else sdpa, of what the model supports (else eager; e.g. gpt-oss)."},
    )
    chat_template: Optional[str] = field(
        default=None, metadata={"help": "A built-in template (chatml) or a Jinja file, replacing the tokenizer's "
                                "own (default: its own, else chatml). See docs/training.md, Base models."}
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None,
        metadata={"help": "Training data, comma-separated (a comma in a name is written \\,): files "
                  "(.jsonl/.json(.gz), .parquet, .arrow, .csv, .tsv, .txt), folders (Hub dataset and save_to_disk "
                  "folders read as such), "
                  "Hub ids (org/name). [SPLIT] or [SUBSET:SPLIT] after an entry selects a split, :RATIO samples it "
                  "(e.g. a.jsonl:0.5,org/name[test],b/:2). docs/data.md: Sources."},
    )
    eval_data_path: Optional[str] = field(default=None, metadata={"help": "Evaluation data, same syntax."})
    dataset: Optional[str] = field(default=None, metadata={
        "help": "LLaMA-Factory's flag: entries of DATASET_DIR/dataset_info.json, comma-separated (NAME:RATIO samples "
                "one), added to --data_path."})
    dataset_dir: str = field(default="data", metadata={"help": "The folder of LLaMA-Factory's dataset_info.json."})
    eval_dataset: Optional[str] = field(default=None, metadata={"help": "Evaluation entries of dataset_info.json."})
    columns: Optional[str] = field(default=None, metadata={"help": "Rename columns (or JSON keys) to a format's keys: "
                                   "NAME=KEY,... e.g. question=prompt,answer=completion or conversation=messages."})
    val_size: Optional[float] = field(default=None, metadata={"help": "Hold out this share (< 1) or number (>= 1) of "
                                      "the training samples for evaluation, per source, fixed by --seed."})
    chat_template_kwargs: Optional[str] = field(default=None, metadata={"help": "JSON object for the chat template "
                                                "when the data is rendered, e.g. '{\"enable_thinking\": false}'."})
    lazy_preprocess: bool = field(
        default=True,
        metadata={"help": "Kept for compatibility with Qwen's script. Preprocessing always runs once into an "
                  "on-disk Arrow cache, which is memory-bounded and reused by later runs."},
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "auto | messages | sharegpt | alpaca | chat_rounds | prompt_completion | text. auto "
                  "detects it per file.", "choices": ["auto", "messages", "sharegpt", "alpaca", "chat_rounds",
                                                     "prompt_completion", "text"]},
    )
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Drop invalid records (reported with counts) instead of stopping."}
    )
    placeholders: Optional[str] = field(default=None, metadata={
        "help": "Fill {{NAME}} placeholders in the data (LLaMA-Factory's identity.json: {{name}}, {{author}}): "
        "NAME=VALUE,... e.g. name=Aria,author=Acme; repeatable. Unfilled ones in trained text are flagged."})
    long_text: str = field(
        default="split",
        metadata={"help": "split | cut. A text-format record longer than --model_max_length: split (every token "
                  "kept: consecutive blocks of near-equal length, each a sample) or cut (the tail is lost).",
                  "choices": ["split", "cut"]},
    )
    train_on_prompt: bool = field(default=False, metadata={"help": "Train on every token, prompts included."})
    mask_reasoning: bool = field(default=False, metadata={
        "help": "Keep each turn's reasoning (<think>...</think>, as the template writes it) in the context but out "
        "of the loss: the answer is trained, the reasoning not. Default: trained."})
    message_names: str = field(default="render", metadata={
        "help": "render | content | drop. A message's speaker `name`: rendered by the template (refused if it does "
        "not render it), written into the text as 'NAME: ...', or dropped.", "choices": list(NAME_MODES)})
    train_on_last_turn_only: bool = field(default=False, metadata={"help": "Train only the last assistant turn."})
    packing: str = field(
        default="auto",
        metadata={"help": "auto | true | false. true: padding-free packing (samples concatenated, position_ids "
                  "restart per sample, no cross-sample attention). false: pad each batch to its longest sample. "
                  "auto: packing when flash-attention is in use, else padding.",
                  "choices": ["auto", "true", "false"]},
    )
    loss_balance: str = field(
        default="token",
        metadata={"help": "token: mean over the step's trained tokens. sample: every sample weighs the same. "
                  "source: every data source in the step weighs the same.",
                  "choices": ["token", "sample", "source"]},
    )
    retention_data: Optional[str] = field(
        default=None, metadata={"help": "Reference prompts for the retention measurement (same syntax and formats as "
                                "--data_path; a record's answer is its reference answer, the base model's own answer "
                                "where it has none). Default: the built-in set, retention_prompts.jsonl. "
                                "docs/after-training.md: Retention."})
    retention_prompts: Optional[int] = field(
        default=None, metadata={"help": "Measure retention on the first N reference prompts (0: all). Default: 8 of "
                                "the built-in set (a measurement within 5 percent of the demo's training time), all of "
                                "--retention_data. A measurement's cost grows with N (docs/after-training.md: "
                                "Retention)."})
    dataset_cache_dir: Optional[str] = field(
        default=None, metadata={"help": "Where tokenized datasets are cached (default ~/.cache/finetune)."}
    )
    preprocessing_num_workers: Optional[int] = field(
        default=None, metadata={"help": "Processes for tokenization (datasets.map num_proc)."}
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "Load only the tokenizer, process all data, write OUTPUT_DIR/data_report.json, exit."},
    )
    show_masking: int = field(
        default=0,
        metadata={"help": "Print the first N training samples as rendered text with the trained tokens in [[...]], "
                  "then exit (loads the tokenizer only): see at a glance what is trained with this template."},
    )
    dry_run_world_size: Optional[int] = field(
        default=None, metadata={"help": "World size assumed by --dry_run's estimates (default: this launch's)."}
    )
    resolved: dict = field(default_factory=dict, init=False, repr=False)  # data_sources(): not a flag
    column_map: dict = field(default_factory=dict, init=False, repr=False)  # --columns, parsed
    template_kwargs: dict = field(default_factory=dict, init=False, repr=False)  # --chat_template_kwargs, parsed
    placeholder_map: dict = field(default_factory=dict, init=False, repr=False)  # --placeholders, parsed


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloaded models are cached."})
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": "Optimizer (any transformers OptimizerNames). adamw_torch_fused: AdamW in one kernel per "
        "parameter (on CPU 4x faster per step than adamw_torch's loop over parameters)."})
    model_max_length: int = field(
        default=8192, metadata={"help": "Maximum tokens per sample; longer conversations lose whole turns, longer "
                                "texts are split into blocks (--long_text)."}
    )
    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    early_stopping_patience: Optional[int] = field(
        default=None, metadata={"help": "Stop after N evaluations without eval_loss improving."}
    )
    train_sampling_strategy: str = field(
        default="group_by_length",
        metadata={"help": "group_by_length (batches of similar length: little padding) | random."},
    )
    warmup_ratio: Optional[float] = field(
        default=None, metadata={"help": "Alias from transformers 4 / Qwen's script: --warmup_steps as a ratio."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    report_to: Optional[str] = field(default="none", metadata={"help": "none | tensorboard | wandb | all."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep False: the collator needs them."})
    sequence_parallel_size: int = field(
        default=1,
        metadata={"help": "Split every sample across N processes (DeepSpeed Ulysses sequence parallelism; needs "
                  "--deepspeed): for samples whose activations do not fit one device. The data-parallel size "
                  "becomes processes / N. See docs/training.md, Long samples."},
    )
    fused_loss: str = field(
        default="none", metadata={"help": "none | cce. cce: Cut Cross-Entropy's fused kernel (GPU, pip install "
                                  "cut-cross-entropy), exact gradients (no filtering); lm_head must be a plain "
                                  "Linear (no LoRA on it, no ZeRO-3).", "choices": ["none", "cce"]}
    )
    loss_chunk_tokens: int = field(
        default=0, metadata={"help": "Trained tokens per chunk of the loss (logits exist for one chunk at a time). "
                             "0: automatic, 256 MB of fp32 logits (441 tokens for a 151,936-token vocabulary)."}
    )
    stop_on_nonfinite: bool = field(
        default=True, metadata={"help": "Stop at the first step whose loss or gradient norm is NaN/inf (exit code 3; "
                                "nothing of that step is saved). False: train on regardless."}
    )
    retention: bool = field(
        default=True, metadata={"help": "Measure at every evaluation and at the end how much of the base model's "
                                "behaviour is kept (eval_retention, 1 = unchanged; docs/after-training.md: "
                                "Retention). False: off."})
    retention_min: Optional[float] = field(
        default=None, metadata={"help": "Act when eval_retention (the reference answers' likelihood kept, 0..1) falls "
                                "below this: see --retention_action."})
    retention_action: str = field(
        default="stop", metadata={"help": "stop: end the run (exit code 4, the last checkpoint kept) | warn: a "
                                  "WARNING line, training goes on.", "choices": ["stop", "warn"]})
    router_aux_loss_coef: Optional[float] = field(
        default=None, metadata={"help": "MoE models: weight of the router's load-balancing loss added to the loss "
                                "(logged as router_loss). Default: the model's own (config router_aux_loss_coef). "
                                "0: not added (still logged). docs/training.md: MoE models."})
    freeze_router: Optional[bool] = field(
        default=None, metadata={"help": "MoE models: keep the routers' weights as they are. Default: trained in full "
                                "fine-tuning, frozen with LoRA (the adapter holds LoRA weights only); False with LoRA "
                                "trains them whole (saved in the adapter)."})
    logging_nan_inf_filter: bool = field(
        default=False, metadata={"help": "True: log a NaN/inf training loss as the mean of the previous ones "
                                 "(transformers' default, which hides a diverged run). False: log it as it is."}
    )

    @cached_property
    def _setup_devices(self):  # a library internal: see finetune_distributed.LIBRARY_INTERNALS
        start_cpu_deepspeed_state(self)  # DeepSpeed on CPU under torchrun: a gloo process group first
        return super()._setup_devices


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "LoRA dropout. 0 by default: peft drops out a copy of every adapter's input, which costs as much "
        "memory as the activations themselves and a third of the step time (bench/README.md)."})
    lora_target_modules: str = field(
        default=LORA_DEFAULT_TARGETS, metadata={"help": "Comma-separated module names, or all-linear."}
    )
    lora_weight_path: str = field(default="", metadata={"help": "Start from this existing adapter directory."})
    lora_bias: str = field(
        default="none", metadata={"help": "none | all | lora_only.", "choices": ["none", "all", "lora_only"]}
    )
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: 4-bit NF4 base model + LoRA (implies use_lora)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments, LoraArguments)


def parse_args(argv=None):
    """-> (model_args, data_args, training_args, lora_args) from the command line (finetune_cli.py)."""
    return parse_flags(ARGUMENT_CLASSES, argv)


def check_model_path(name, reads="weights"):
    """A local model folder must exist and hold what this run reads of it: config.json (all but --show_masking,
    which reads only the tokenizer) and the weights (all but --dry_run); anything else must look like a hub id."""
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ValueError(f"--model_name_or_path {name} is a file; give the model's folder (with config.json).")
        if reads != "tokenizer" and not os.path.isfile(os.path.join(name, "config.json")):
            raise FileNotFoundError(f"--model_name_or_path {name} has no config.json: not a saved model folder.")
        if reads == "weights" and not any(glob.glob(os.path.join(name, f"*.{ext}")) for ext in ("safetensors", "bin")):
            raise FileNotFoundError(f"--model_name_or_path {name} has no weights (*.safetensors or *.bin); "
                                    "copy them there, or point to the full model folder.")
    elif name.startswith(("/", ".", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise FileNotFoundError(f"--model_name_or_path {name}: no such local folder, and not a hub id "
                                "(owner/name, e.g. Qwen/Qwen2.5-7B-Instruct). Check the path.")


def check_writable_dir(path, flag="--output_dir"):
    """A folder we must create and write is checked now, not after hours of preprocessing or a model load.
    Probed with a temporary file in the nearest existing folder, removed at once: nothing is left behind."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a folder; choose another path.")
    parent = os.path.abspath(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag} {path}: {parent} is {'a broken link' if os.path.islink(parent) else 'a file'}, "
                         "so the folder cannot be created.")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".finetune-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {parent} ({e.strerror}); "
                         "choose a writable folder.") from None


def validate_args(model_args, data_args, training_args, lora_args):
    """Fail fast, before any data is read or any model, process group or output directory is touched."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a model directory or hub id).")
    check_data_flags(data_args)  # --dataset entries join --data_path; --columns, --val_size, --chat_template_kwargs
    check_ranges(training_args, lora_args, data_args)
    check_model_path(model_args.model_name_or_path,
                     "tokenizer" if data_args.show_masking else "config" if data_args.dry_run else "weights")
    if int(os.environ.get("RANK", "0")) == 0:
        check_writable_dir(training_args.output_dir)
        check_writable_dir(dataset_cache_root(data_args), "--dataset_cache_dir")
    # missing entries, bad ratios, folder problems, the same file twice; eval files that are also trained on
    # are said (an overfitting check may want that; a held-out set must not)
    train_files = {file_id(f) for e in data_sources(data_args, data_args.data_path)[0] for f, _ in e.files}
    for e in data_sources(data_args, data_args.eval_data_path)[0] if data_args.eval_data_path else []:
        shared = [file for file, _ in e.files if file_id(file) in train_files]
        if shared:
            log0(f"note: --eval_data_path files also in --data_path (evaluated on training data): {', '.join(shared)}")
    check_chat_template_flag(model_args.chat_template)
    check_retention_flags(data_args, training_args)
    if data_args.retention_data:  # missing files, folders, Hub ids: said now, as for --data_path
        resolve_data_spec(data_args.retention_data)
    if lora_args.q_lora:
        training_args.use_lora = True  # Q-LoRA means LoRA on a 4-bit base; never silently full fine-tuning
        if zero_stage(training_args) == 3:
            raise ValueError(
                "--q_lora with ZeRO-3 is not supported: 4-bit weights cannot be partitioned by ZeRO-3 here. "
                "Use --deepspeed ds_config_zero2.json (or no DeepSpeed)."
            )
        if training_args.fp16 and not torch.cuda.is_available():
            raise ValueError("--fp16 needs a GPU; drop it on CPU.")
    if training_args.warmup_ratio is not None:
        training_args.warmup_steps = training_args.warmup_ratio  # v5 reads a float < 1 as a ratio
    check_fused_loss_flag(training_args.fused_loss, zero_stage(training_args) == 3, lora_args.lora_target_modules)
    if data_args.train_on_prompt and data_args.train_on_last_turn_only:
        raise ValueError("--train_on_prompt and --train_on_last_turn_only exclude each other; pick one.")
    if training_args.early_stopping_patience and not (data_args.eval_data_path or data_args.val_size):
        raise ValueError("--early_stopping_patience needs --eval_data_path or --val_size (it watches eval_loss).")
    world = (data_args.dry_run and data_args.dry_run_world_size) or int(os.environ.get("WORLD_SIZE", "1"))
    attn = resolve_attn_implementation(model_args, training_args, quiet=True)
    setup_sequence_parallel(training_args, world, attn, use_packing(data_args, attn),
                            lambda: load_model_config(model_args, training_args).get_text_config())


def data_sources(data_args, spec):
    """resolve_data_spec(spec), once per run: validate_args resolves (and so checks) what build_dataset reads."""
    if spec not in data_args.resolved:
        data_args.resolved[spec] = resolve_data_spec(spec, data_args.column_map)
    return data_args.resolved[spec]


# ---------------------------------------------------------------------------------------------
# Preprocess: a conversation becomes input_ids + labels (loss only on what the assistant says)
# ---------------------------------------------------------------------------------------------
# The conversation is rendered by the model's own chat template and tokenized once, so input_ids are exactly
# what apply_chat_template gives. render_conversation (finetune_template.py) says which characters are trained,
# by one rule: what render(messages[:i+1]) adds to the generation prompt render(messages[:i], True), i.e. the
# answer, its tool calls and the template's end tokens. Here those characters become token labels: a token is
# trained if it overlaps them (so 'Ġtwo' carrying the separator space is), and over model_max_length whole
# turns are dropped from the end.


def _labels_and_cut(ids, spans, trained, max_length, train_on_prompt, holes=()):
    """Labels from each assistant turn's token span, then truncation that keeps whole turns where possible.
    ids: numpy token ids; spans: [(lo, hi)] token index range of each turn (the tokens starting in its
    character region); holes: token ranges never trained (--mask_reasoning).
    -> (input_ids, labels, status) as numpy arrays, status '' | 'truncated' | 'dropped:<reason>'."""
    mask = np.zeros(len(ids), dtype=bool)
    turn_ends = []
    for (lo, hi), keep in zip(spans, trained):
        if keep:
            mask[lo:hi] = True
            turn_ends.append(hi)
    if train_on_prompt:
        mask[:] = True
    for lo, hi in holes:
        mask[lo:hi] = False
    status = ""
    if len(ids) > max_length:
        fitting = [t for t in turn_ends if t <= max_length]
        first = int(np.argmax(mask[1:])) + 1 if mask[1:].any() else len(ids)
        if fitting and not train_on_prompt:
            cut = max(fitting)
        elif first < max_length:
            cut = max_length  # the first trained turn alone is too long: keep what fits of it
        else:
            return ids[:0], ids[:0], "dropped:prompt_longer_than_model_max_length"
        ids, mask, status = ids[:cut], mask[:cut], "truncated"
    if not mask[1:].any():  # position 0 is never predicted
        return ids[:0], ids[:0], "dropped:no_trained_tokens"
    return ids, np.where(mask, ids, IGNORE_INDEX), status


def _tokenize_arrays(tokenizer, conversations, max_length, train_on_prompt=False, last_turn_only=False,
                     template_kwargs=None, long_text="cut", mask_reasoning=False):
    """[(messages, tools) or plain text] -> [(input_ids, labels, status, tokens read)] with numpy arrays; see
    tokenize_many. Plain text (the text format): no chat template, the tokenizer's own BOS (if any) + text + EOS,
    every token trained; over max_length with long_text 'split', the whole text with status 'split' (split_blocks
    makes the samples)."""
    empty = np.zeros(0, dtype=np.int64)
    results, texts, pending = [None] * len(conversations), [], []
    plain = [i for i, c in enumerate(conversations) if isinstance(c, str)]
    eos = tokenizer.eos_token_id
    for i, ids in zip(plain, tokenizer([conversations[i] for i in plain], verbose=False)["input_ids"] if plain else []):
        ids = np.asarray(ids + ([eos] if eos is not None and ids[-1:] != [eos] else []), dtype=np.int64)
        results[i] = (ids, ids, "split", len(ids)) if long_text == "split" and len(ids) > max_length else \
            (*_labels_and_cut(ids, [(0, len(ids))], [True], max_length, train_on_prompt=True), len(ids))
    for i, (messages, tools) in ((i, c) for i, c in enumerate(conversations) if not isinstance(c, str)):
        try:
            text, regions = render_conversation(tokenizer, messages, tools, template_kwargs)
        except RecordError as e:
            results[i] = (empty, empty, f"error:{e}", 0)
            continue
        lost = dropped_piece(tokenizer, messages, tools, text, regions, template_kwargs)  # finetune_coverage.py
        if lost:
            results[i] = (empty, empty, f"{LOST}{lost[0]}:{lost[1]}", 0)
            continue
        trained = [is_trained(m) for m in messages if m["role"] == "assistant"]
        if last_turn_only:
            trained = [False] * (len(trained) - 1) + [trained[-1]]
        holes = [r for r in reasoning_regions(tokenizer, messages, tools, text, regions, template_kwargs)
                 if r[1] > r[0]] if mask_reasoning else []
        texts.append(text)  # a hole's tokens: from the one holding its first character to the one holding the answer's
        pending.append((i, regions + holes + [(b, b + 1) for _, b in holes], trained))
    if texts:
        encoded = encode_regions(tokenizer, texts, [regions for _, regions, _ in pending])
        for (i, _, trained), (ids, spans) in zip(pending, encoded):
            n, h = len(trained), (len(spans) - len(trained)) // 2
            holes = [(lo, answer) for (lo, _), (answer, _) in zip(spans[n:n + h], spans[n + h:])]
            results[i] = (*_labels_and_cut(ids, spans[:n], trained, max_length, train_on_prompt, holes), len(ids))
    return results


def split_blocks(ids, max_length):
    """A text's tokens -> consecutive blocks of at most max_length tokens, as few as fit and of near-equal length
    (no short tail block that would train little), every token in exactly one block: the first keeps the BOS, the
    last the EOS. Each block is a sample of its own (no attention across blocks)."""
    n_blocks = -(-len(ids) // max_length)
    return np.array_split(ids, n_blocks)


def tokenize_many(tokenizer, conversations, max_length, train_on_prompt=False, last_turn_only=False):
    """Batch version of tokenize_conversation: [(messages, tools)] -> [dict(input_ids, labels, status)].
    Renders each conversation once and encodes all of them in one fast-tokenizer call."""
    return [{"input_ids": ids.tolist(), "labels": labels.tolist(), "status": status}
            for ids, labels, status, _ in _tokenize_arrays(tokenizer, conversations, max_length, train_on_prompt,
                                                        last_turn_only)]


def tokenize_conversation(tokenizer, messages, max_length, tools=None, train_on_prompt=False):
    """One conversation -> {"input_ids": [...], "labels": [...]} with labels -100 where not trained.

    Labels cover what the model generates for each assistant turn (render_conversation's rule): the turn as the
    model's own chat template renders it after the generation prompt, through all of its end tokens; nothing of
    system/user/tool turns or role headers. Over max_length, whole
    turns are dropped from the end; raises ValueError if nothing trainable fits or the template refuses."""
    (result,) = tokenize_many(tokenizer, [(messages, tools)], max_length, train_on_prompt)
    if result["status"].startswith(LOST):  # LOST:KIND:DESCRIPTION
        raise TemplateDropsData(result["status"].split(":", 2)[2])
    if result["status"].startswith(("error:", "dropped:")):
        raise ValueError(result["status"].split(":", 1)[1])
    return {"input_ids": result["input_ids"], "labels": result["labels"]}


def load_tokenizer(model_args, training_args):
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, cache_dir=training_args.cache_dir,
            trust_remote_code=model_args.trust_remote_code, model_max_length=training_args.model_max_length,
        )
    except OSError as e:  # not a local folder: the hub could not give it (no such repo, offline, gated)
        raise FileNotFoundError(f"--model_name_or_path {model_args.model_name_or_path}: not a local folder, and no "
                                f"tokenizer could be loaded from the hub ({str(e).splitlines()[0]}). Check the path "
                                "or hub id.") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("A fast tokenizer (tokenizer.json) is needed for exact label masking.")
    tokenizer.chat_template, which = chat_template_source(model_args.chat_template, tokenizer)
    log0(prepare_tokenizer(tokenizer, which))  # turn markers made single tokens, the turn end the eos
    if tokenizer.pad_token is None:  # padded positions are masked out of attention and loss anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Dataset: validated, tokenized, cached on disk as Arrow
# ---------------------------------------------------------------------------------------------


def _tokenize_batch(batch, tokenizer, max_length, train_on_prompt, last_turn_only, sources=None, template_kwargs=None,
                    long_text="cut", mask_reasoning=False):
    """datasets.map function -> an Arrow table: the batch's other columns, then the tokens, which go to
    Arrow straight from numpy (int32 list arrays), not through per-token Python ints. `sources`
    ({name: index}) adds the source_idx column. A long text split into blocks gives one row per block (each
    with its record's other columns); n_read: the tokens each row's record had before any truncation."""
    import pyarrow as pa

    convs = [json.loads(c) for c in batch["conversation"]]
    tokenized = _tokenize_arrays(tokenizer, [c["text"] if "text" in c else (c["messages"], c["tools"]) for c in convs],
                                 max_length, train_on_prompt, last_turn_only, template_kwargs, long_text,
                                 mask_reasoning)
    out, rows = [], []
    for r, (ids, labels, status, n_read) in enumerate(tokenized):
        parts = [(b, b, status, len(b)) for b in split_blocks(ids, max_length)] if status == "split" else \
            [(ids, labels, status, n_read)]
        out += parts
        rows += [r] * len(parts)
    lengths = np.asarray([len(ids) for ids, *_ in out], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def tokens(arrays):
        return pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(arrays).astype(np.int32)))

    columns = {k: [batch[k][r] for r in rows] for k in batch.keys() if k != "conversation"}
    columns.update({
        "input_ids": tokens([ids for ids, *_ in out]),
        "labels": tokens([labels for _, labels, *_ in out]),
        "length": lengths,
        "n_trained": np.asarray([int((labels[1:] != IGNORE_INDEX).sum()) for _, labels, *_ in out], dtype=np.int64),
        "status": [status for _, _, status, _ in out],
        "n_read": np.asarray([n for *_, n in out], dtype=np.int64),
    })
    if sources is not None:
        columns["source_idx"] = np.asarray([sources[s] for s in columns["source"]], dtype=np.int64)
    return pa.table(columns)


def build_dataset(spec, tokenizer, data_args, training_args, cache_root):
    """Validate + tokenize the files named by `spec` into an Arrow dataset at cache_root/<key> (finetune_cache.py:
    built once into a temporary folder and renamed into place when complete; a second run with the same files,
    tokenizer and settings just loads it) -> its folder."""
    entries, skipped = data_sources(data_args, spec)
    for kind, why in (("hidden", "hidden, skipped"), ("ignored", "not read (other types, metadata, other splits)")):
        if skipped[kind]:
            log0(f"data: {len(skipped[kind])} {why}: {', '.join(skipped[kind][:5])}"
                 f"{' ...' if len(skipped[kind]) > 5 else ''}")
    path = entry_path(entries, tokenizer, data_args, training_args, cache_root)
    return build_entry(path, lambda tmp: _write_dataset(tmp, spec, entries, skipped, tokenizer, data_args,
                                                        training_args))


def _write_dataset(tmp, spec, entries, skipped, tokenizer, data_args, training_args):
    """Read, validate, tokenize, sample and save the dataset under tmp/data, its report as tmp/report.json."""
    import datasets

    stats = {"files": {}, "invalid": {}, "rows": 0}
    try:
        raw = datasets.Dataset.from_generator(
            # a tuple, not a list: datasets would shard a list and call the generator once per entry
            normalized_rows, gen_kwargs={"entries": tuple(entries), "data_format": data_args.data_format,
                                         "skip_invalid": data_args.skip_invalid_records, "stats": stats,
                                         "placeholders": data_args.placeholder_map,
                                         "message_names": data_args.message_names},
            cache_dir=os.path.join(tmp, "raw"), keep_in_memory=False,
        )
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        if isinstance(cause, (DataError, FileNotFoundError)):
            raise cause from None
        if type(cause).__name__ == "SchemaInferenceError":  # datasets cannot build a table from zero rows
            n_records = sum(f["records"] for f in stats["files"].values())
            raise DataError(f"{spec}: no valid record in {len(stats['files'])} files, all {n_records} records invalid: "
                            f"{stats['invalid']}") from None
        raise
    sources = sorted(raw.unique("source"))
    tokenized = raw.map(
        _tokenize_batch, batched=True, batch_size=256, num_proc=data_args.preprocessing_num_workers,
        fn_kwargs={"tokenizer": tokenizer, "max_length": training_args.model_max_length,
                   "train_on_prompt": data_args.train_on_prompt,
                   "last_turn_only": data_args.train_on_last_turn_only,
                   "sources": {s: i for i, s in enumerate(sources)}, "template_kwargs": data_args.template_kwargs,
                   "long_text": data_args.long_text, "mask_reasoning": data_args.mask_reasoning},
        remove_columns=raw.column_names, desc="tokenizing",  # all: _tokenize_batch returns them (a split adds rows)
    )
    n_raw = len(raw)
    del raw  # unmap the raw Arrow file: its pages read by map would otherwise stay in this process's RSS
    status = np.asarray(tokenized["status"][:], dtype=object)
    lost = [i for i, s in enumerate(status) if s.startswith(LOST)]
    if lost:  # the template drops data: a template problem, never skipped record by record
        raise template_drops_data(tokenized.select(lost[:1])["origin"], list(status[lost]), len(status))
    failed = [i for i, s in enumerate(status) if s.startswith("error:")]
    if failed and not data_args.skip_invalid_records:
        origins = tokenized.select(failed[:20])["origin"]
        more = [f"({len(failed)} invalid records in all; the first 20 are shown)"] if len(failed) > 20 else []
        raise DataError("\n".join([f"{o}: {status[i][6:]}" for o, i in zip(origins, failed[:20])] + more))
    dropped, truncated = {}, 0
    for origin, s in zip(tokenized["origin"][:], status):  # per file and overall: invalid, dropped, truncated
        fstats = stats["files"][origin.rsplit(":", 1)[0]]
        if s.startswith("error:"):
            fstats["invalid"] += 1
            tally(stats["invalid"], invalid_reason(s[6:]))
        elif s.startswith("dropped:"):
            tally(fstats, "dropped")
            tally(dropped, s[8:])
        else:
            tally(fstats, "samples")
            tally(fstats, "truncated", s == "truncated")
            truncated += s == "truncated"
    keep = np.flatnonzero(np.asarray([s in ("", "truncated", "split") for s in status]))
    if len(keep) == 0:
        hint = (f"; every prompt is longer than --model_max_length {training_args.model_max_length}: raise it"
                if "prompt_longer_than_model_max_length" in dropped else "")
        raise DataError(f"{spec}: no sample left to train on (dropped: {dropped}, invalid: {stats['invalid']}){hint}.")
    # Columns are read whole with [:] (iterating a datasets Column goes row by row: minutes at 1M rows).
    report = {}
    if data_args.val_size:  # held out before the ratios: a repeated sample is never in both splits
        keep, held = held_out_split(keep, np.asarray(tokenized["source"][:])[keep], data_args.val_size,
                                    training_args.seed)
        report["held_out"] = {"val_size": data_args.val_size, **_save_split(tokenized.select(held), tmp, "eval")}
    final = tokenized.select(sample_indices(tokenized["entry"][:], keep, entries, training_args.seed))
    report = {"files": stats["files"], "records": sum(f["records"] for f in stats["files"].values()),
              "records_valid": n_raw - len(failed), "invalid": stats["invalid"], "dropped": dropped,
              "truncated": truncated, "samples_before_ratio": int(len(keep)),
              "token_accounting": token_accounting(tokenized, status, stats["files"]),
              "placeholders": {**stats["placeholders"], "asked": sorted(data_args.placeholder_map)},
              "keys": stats["keys"],
              **_save_split(final, tmp, "data"), "sources": sources, "skipped_files": skipped, **report}
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    shutil.rmtree(os.path.join(tmp, "raw"), ignore_errors=True)  # datasets' scratch: not part of the entry


def _save_split(dataset, tmp, name):
    """Saves the tokenized samples under tmp/name -> their counts. source_idx came with the tokens; dropping
    columns rewrites nothing: save_to_disk is the one pass."""
    per_source = dict(zip(*np.unique(dataset["source"][:], return_counts=True)))
    dataset.remove_columns(["origin", "status", "entry", "source", "n_read"]).save_to_disk(os.path.join(tmp, name))
    return {"samples": len(dataset), "samples_per_source": {str(k): int(v) for k, v in per_source.items()}}


def load_datasets(data_args, training_args, tokenizer):
    """Rank 0 validates and tokenizes (or hits the cache); every rank then loads the Arrow files.
    A data error on rank 0 is broadcast so that every rank stops with it instead of hanging."""
    import datasets

    cache_root = dataset_cache_root(data_args)
    specs = [s for s in (data_args.data_path, data_args.eval_data_path) if s]
    paths, error = None, None
    if training_args.process_index == 0:
        try:
            paths = [build_dataset(s, tokenizer, data_args, training_args, cache_root) for s in specs]
        except Exception as e:  # any failure, or the other ranks would wait for rank 0 forever
            error = cache_write_error(e, cache_root) or e  # a full disk: one line with the path and the fix
    # a DataError's lines start with path:line: so that editors and grep can jump to them
    message = error and (str(error) if isinstance(error, DataError) else f"{type(error).__name__}: {error}")
    if training_args.world_size > 1 and torch.distributed.is_initialized():
        box = [paths, message]
        torch.distributed.broadcast_object_list(box, src=0)
        paths, message = box
        if not message:  # multi-node: the cache must be on storage every node sees; all stop if not
            seen = [None] * training_args.world_size
            torch.distributed.all_gather_object(seen, all(os.path.isdir(os.path.join(p, "data")) for p in paths))
            if not all(seen):
                message = (f"the dataset cache {cache_root} written by rank 0 is missing on ranks "
                           f"{[r for r, ok in enumerate(seen) if not ok]}: set --dataset_cache_dir to shared storage")
    if error is not None and not isinstance(error, (DataError, FileNotFoundError)):
        raise error  # rank 0: not a data problem; keep the traceback
    if message and training_args.process_index != 0:
        raise StopQuietly(ExitCode.BAD_INPUT)  # rank 0 reports it: the message once, not once per rank
    if message:
        raise DataError(f"invalid data, nothing was trained:\n{message}")
    loaded = [datasets.load_from_disk(os.path.join(p, "data")) for p in paths]
    reports = []
    for p in paths:
        with open(os.path.join(p, "report.json")) as f:
            reports.append(json.load(f))
    if data_args.val_size:  # the held-out split, saved with the training data (same sources, same source_idx)
        loaded.append(datasets.load_from_disk(os.path.join(paths[0], "eval")))
        reports.append({**reports[0]["held_out"], "sources": reports[0]["sources"]})
    train = loaded[0]
    evaluation = loaded[1] if len(loaded) > 1 else None
    return train, evaluation, reports


# ---------------------------------------------------------------------------------------------
# Batching: length-grouped padding, or padding-free packing
# ---------------------------------------------------------------------------------------------


def pad_batch(batch, length, pad_token_id):
    """Right-pad every per-token column of a collated batch to `length`, with tokens that train nothing and
    that no real token attends to (causal attention: they come after every real token)."""
    extra = length - batch["input_ids"].shape[1]
    if extra <= 0:
        return batch
    fill = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0, "token_source": -1,
            "token_sample_trained": 0}
    for key, value in fill.items():
        if key in batch:
            batch[key] = F.pad(batch[key], (0, extra), value=value)
    if "position_ids" in batch:  # keep counting: positions stay increasing, as Ulysses on sdpa requires
        positions = batch["position_ids"]
        batch["position_ids"] = torch.cat([positions, positions[:, -1:] + 1 + torch.arange(extra)], 1)
    return batch


def _trained_per_sample(features):
    """Trained targets of each sample: labels[1:] that are not IGNORE_INDEX (label 0 is never predicted,
    and packing masks it)."""
    return [sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX) for f in features]


# Every batch carries per-token columns next to input_ids: token_source (the sample's data source) and
# token_sample_trained (how many trained targets its sample has: the `--loss_balance sample` weight). They
# describe the token at each input position t, and therefore also the target it is trained to predict,
# labels[t+1], whenever that target is trained: the first label of every sample is masked, so a trained
# target is never the first token of another sample. That is what keeps them right when sequence
# parallelism cuts the row into shards and shifts the labels (shift_labels[t] = labels[t+1]).
@dataclass
class PaddingCollator:
    """Pad to the longest sample of the batch (never to model_max_length), rounded up to a multiple of
    pad_to_multiple_of. position_ids are explicit: sequence parallelism needs the global positions."""

    pad_token_id: int
    pad_to_multiple_of: Optional[int] = None

    def __call__(self, features):
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            longest = math.ceil(longest / self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(features)
        ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
        attn = torch.zeros((n, longest), dtype=torch.long)
        source = torch.full((n, longest), -1, dtype=torch.long)
        trained = torch.zeros((n, longest), dtype=torch.long)
        for i, (f, t) in enumerate(zip(features, _trained_per_sample(features))):
            k = len(f["input_ids"])
            ids[i, :k], labels[i, :k], attn[i, :k] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
            source[i, :k], trained[i, :k] = f.get("source_idx", 0), t
        return {"input_ids": ids, "attention_mask": attn, "labels": labels,
                "position_ids": torch.arange(longest).expand(n, longest).clone(),
                "token_source": source, "token_sample_trained": trained}


@dataclass
class PackingCollator:
    """Padding-free packing: one row of concatenated samples, position_ids restarting at 0 per sample
    and no attention_mask, so attention stays within each sample (varlen flash-attention on GPU, a
    block-diagonal mask on sdpa/eager). The first label of every sample is masked, so no position is
    ever trained to predict across a boundary. pad_to_multiple_of appends untrained padding so that
    sequence parallelism can split the row evenly."""

    flash_attention: bool = False
    pad_to_multiple_of: Optional[int] = None
    pad_token_id: int = 0

    def __call__(self, features):
        flatten = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=self.flash_attention)
        batch = flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch["token_source"] = torch.cat(
            [torch.full((len(f["input_ids"]),), f.get("source_idx", 0)) for f in features])[None]
        batch["token_sample_trained"] = torch.cat(
            [torch.full((len(f["input_ids"]),), t) for f, t in zip(features, _trained_per_sample(features))])[None]
        length = batch["input_ids"].shape[1]
        return pad_batch(batch, length + -length % (self.pad_to_multiple_of or 1), self.pad_token_id)


def use_packing(data_args, attn_implementation):
    if data_args.packing == "auto":
        return attn_implementation == "flash_attention_2"
    return data_args.packing == "true"


# ---------------------------------------------------------------------------------------------
# Model: full, LoRA, Q-LoRA, DoRA
# ---------------------------------------------------------------------------------------------


def resolve_attn_implementation(model_args, training_args, quiet=False):
    """--attn_implementation; auto: the fastest the model's class supports (finetune_moe.choose_attention)."""
    if model_args.attn_implementation != "auto":
        return model_args.attn_implementation
    return moe.choose_attention(lambda: load_model_config(model_args, training_args), quiet)


@functools.lru_cache(maxsize=4)
def _model_config(name, cache_dir, trust_remote_code):
    return AutoConfig.from_pretrained(name, cache_dir=cache_dir, trust_remote_code=trust_remote_code)


def load_model_config(model_args, training_args):
    """The model's config.json, loaded once per run (the sequence-parallel checks and the memory estimate)."""
    return _model_config(model_args.model_name_or_path, training_args.cache_dir, model_args.trust_remote_code)


def load_model(model_args, training_args, lora_args, attn_implementation, tokenizer=None):
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": attn_implementation, "cache_dir": training_args.cache_dir,
              "trust_remote_code": model_args.trust_remote_code}
    if lora_args.q_lora:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": training_args.local_process_index}
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **kwargs)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    router_trained = moe.prepare_moe(model, training_args)  # MoE: the router loss is ours; routers frozen or not
    # embeddings and head fitted to the tokenizer (new rows: the mean of the others), its turn end an eos
    new_ids = fit_model_to_tokenizer(model, tokenizer) if tokenizer is not None else []
    if not training_args.use_lora:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if lora_args.q_lora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs or {"use_reentrant": False},
        )
    if lora_args.lora_weight_path:
        with peft_wrapping():
            model = PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    else:
        targets = lora_args.lora_target_modules
        config = LoraConfig(
            r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
            **moe.lora_targets(model, targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                           lora_args.use_dora, router_trained),  # MoE: the fused experts too (finetune_moe)
            bias=lora_args.lora_bias, use_dora=lora_args.use_dora, task_type="CAUSAL_LM",
            trainable_token_indices=lora_token_indices(model, new_ids),  # the new tokens' rows only
        )
        with peft_wrapping():
            model = get_peft_model(model, config)
    keep_adapter_small(model, new_ids)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing from the embeddings
    trainable, total = model.get_nb_trainable_parameters()
    log0(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%"
         f"{f', the rows of {len(new_ids)} new tokens included' if new_ids else ''})")
    if moe.moe_shape(model.config):
        log0(moe.reached_summary(model, router_trained))
    return model


# ---------------------------------------------------------------------------------------------
# Trainer: one loss normalisation for the whole optimizer step, per-source metrics
# ---------------------------------------------------------------------------------------------


def shifted_labels(batch):
    """target[t] = labels[t+1], IGNORE_INDEX at the end of the row: what position t is trained to predict.
    Under sequence parallelism DeepSpeed's data loader has made it already (shift_labels, before cutting the
    row into shards) and removed labels."""
    if "shift_labels" in batch:
        return batch["shift_labels"]
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)


class FinetuneTrainer(FaultHandling, RetentionEvaluation, Trainer):
    """HF Trainer with a loss that is a weighted mean over the trained tokens of the whole optimizer
    step (all micro-batches, all ranks), so batch layout, packing and gradient accumulation do not
    change what is optimised:

        loss = sum_t w_t * CE_t / sum_t w_t,   w_t = 1 (token) | 1/n_sample (sample) | 1/n_source (source)

    The per-token CE is also summed per source for the `loss_<source>` metrics: no second forward pass.
    FaultHandling (finetune_faults.py) stops a diverging run and turns a failed save into one line;
    RetentionEvaluation (finetune_retention.py) adds eval_retention to every evaluation."""

    def __init__(self, *args, loss_balance="token", source_names=(), eval_source_names=None, retention=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.retention = retention
        self.loss_balance, self.source_names = loss_balance, list(source_names) or ["data"]
        self.loss_is_scaled_for_ga = True  # compute_loss already divides by the step-wide weight
        self.token_loss = TrainedTokenLoss(self.args.loss_chunk_tokens, fused=self.args.fused_loss == "cce")
        # MoE: the router's load-balancing loss over the real tokens, once per micro-batch (finetune_moe.py)
        self.moe = moe.MoeRouting.of(self.model, getattr(self.args, "router_aux_loss_coef", None))
        self._micro_batches, self._router_term = 1, 0.0
        # source_idx indexes each dataset's own sorted source list, and the eval set may have other sources
        self._names = {"train": self.source_names, "eval": list(eval_source_names or self.source_names)}
        self._source_sums = {split: torch.zeros(2, len(names), dtype=torch.float64)
                             for split, names in self._names.items()}
        self._gradient_divisor = gradient_divisor(self.args, self.get_sp_size())
        if self.get_sp_size() > 1:
            self.accelerator.deepspeed_ulysses_dl_adapter = functools.partial(
                sequence_parallel_loader, self.accelerator.deepspeed_ulysses_dl_adapter,
                functools.partial(pad_batch, pad_token_id=getattr(self.data_collator, "pad_token_id", 0)))

    def _all_reduce(self, tensor):
        if self.args.world_size > 1:
            dev = tensor.device
            tensor = self.accelerator.reduce(tensor.to(self.args.device), reduction="sum").to(dev)
        return tensor

    def _token_weights(self, batches):
        """Per-token loss weights for every micro-batch of one step, and their global sum. Every trained
        token is on exactly one rank (under sequence parallelism: on the rank holding its shard), so the
        sum over all ranks counts it once."""
        masks = [shifted_labels(b) != IGNORE_INDEX for b in batches]
        if self.loss_balance == "source":
            counts = torch.zeros(len(self.source_names), dtype=torch.float64)
            for b, m in zip(batches, masks):
                counts += torch.bincount(b["token_source"][m].cpu(), minlength=len(counts)).double()
            counts = self._all_reduce(counts)
        weights = []
        for b, m in zip(batches, masks):
            if self.loss_balance == "token":
                w = m.double()
            elif self.loss_balance == "sample":
                w = torch.where(m, 1.0 / b["token_sample_trained"].clamp(min=1).double(), 0.0)
            else:
                w = torch.where(m, 1.0 / counts.clamp(min=1)[b["token_source"].clamp(min=0)], 0.0)
            weights.append(w)
        total = self._all_reduce(sum(w.sum() for w in weights).reshape(1)).sum()
        return weights, total

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        lengths = getattr(sampler, "lengths", None)  # group_by_length: our precomputed `length` column
        if lengths is not None and not isinstance(lengths, list):
            sampler.lengths = list(lengths[:])  # a datasets Column answers lengths[i] row by row: read it once
        return sampler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        weights, total = self._token_weights(batches)
        self._micro_batches = len(batches)  # the router loss is a mean over the step's micro-batches
        for b, w in zip(batches, weights):
            b["loss_weights"] = w.float()
        return batches, total.to(device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        target = shifted_labels(inputs)  # target[t]: what position t predicts
        for key in ("labels", "shift_labels", "token_sample_trained"):
            inputs.pop(key, None)
        source = inputs.pop("token_source")
        weights = inputs.pop("loss_weights", None)
        mask = target != IGNORE_INDEX
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        routing = self.moe is not None and model.training
        with self.moe.recording(source >= 0) if routing else contextlib.nullcontext():  # padding: source -1
            outputs, ce = self.token_loss(model, head, inputs, target, mask)  # ce: [trained tokens]
        if weights is None:  # evaluation: a plain token mean of this batch
            weights = mask.float()
            num_items_in_batch = weights.sum()
        weights = weights.to(ce.device)[mask.to(ce.device)]
        loss = (ce * weights).sum() / torch.as_tensor(num_items_in_batch, device=ce.device).clamp(min=1e-8)
        self._router_term = self.moe.step_term(self._micro_batches * self.args.world_size) if routing else 0.0
        loss = loss + self._router_term  # coef x the mean router loss over the step's micro-batches and ranks
        if model.training and self.args.world_size > 1:
            loss = loss * self._gradient_divisor  # DDP/DeepSpeed sum gradients over ranks and divide by it
            self._router_term = self._router_term * self._gradient_divisor
        with torch.no_grad():
            src = source[mask].cpu()
            sums = self._source_sums["train" if model.training else "eval"]
            sums[0] += torch.bincount(src, weights=ce.detach().double().cpu(), minlength=sums.shape[1])
            sums[1] += torch.bincount(src, minlength=sums.shape[1]).double()
        if return_outputs:
            outputs.loss = loss
            return loss, outputs
        return loss

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # MoE full fine-tuning: weights saved in the checkpoint's layout are converted back (finetune_moe)
        if self.is_deepspeed_enabled or not moe.reload_converted_weights(model or self.model, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def get_resumed_dataloader(self, dataloader, num_batches):
        # transformers >= 5.25 fast-forwards a resumed epoch through this (documented) method: the
        # sequence-parallel loader skips its own micro-batches (accelerate's skip_first_batches knows only
        # DataLoaders). Older versions never call it: _run_epoch below routes their module function here.
        if isinstance(dataloader, SequenceParallelLoader):
            return dataloader.skip_first_batches(num_batches)
        return super().get_resumed_dataloader(dataloader, num_batches)

    def _run_epoch(self, **kwargs):
        loader = kwargs.get("train_dataloader")
        if hasattr(Trainer, "get_resumed_dataloader") or not isinstance(loader, SequenceParallelLoader):
            return super()._run_epoch(**kwargs)
        with skip_first_batches_routed_to(loader):  # transformers < 5.25 only
            return super()._run_epoch(**kwargs)

    def training_step(self, *args, **kwargs):
        # What this returns is only logged, as the mean over all ranks: the N ranks of a sequence-parallel
        # group each hold a share of their replica's loss, scaled by the gradient divisor above.
        # `loss` is the token loss: the router's term is logged on its own (router_loss)
        loss = super().training_step(*args, **kwargs) - torch.as_tensor(self._router_term).detach().to(self.args.device)
        return loss * self.args.world_size / self._gradient_divisor

    def _source_metrics(self, split, prefix):
        """Token-mean CE since the last call, summed over ranks: {prefix}loss overall and
        {prefix}loss_<source> per source (when there are several sources)."""
        sums = self._all_reduce(self._source_sums[split].clone())
        self._source_sums[split].zero_()
        names, (ce, count) = self._names[split], sums
        metrics = {f"{prefix}loss": float(ce.sum() / count.sum())} if count.sum() > 0 else {}
        if len(names) > 1:
            metrics.update({f"{prefix}loss_{n}": float(s / c) for n, s, c in zip(names, ce, count) if c > 0})
        return metrics

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            metrics = self._source_metrics("train", "")
            metrics.pop("loss", None)  # `loss` stays the optimised (balanced) objective
            logs.update(metrics)
            if self.moe is not None:  # router_loss, expert_maxvio (finetune_moe.py)
                logs.update(self.moe.take_metrics(self._all_reduce))
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        # {prefix}_loss becomes the exact token mean over the eval set (Trainer's is a mean of
        # per-batch means, which depends on the eval batch size and disagrees with the per-source losses).
        output.metrics.update(self._source_metrics("eval", f"{prefix}_"))
        return output


# ---------------------------------------------------------------------------------------------
# Checkpoints and saving (ZeRO-3 safe)
# ---------------------------------------------------------------------------------------------

def save_model(trainer, tokenizer, output_dir):
    """Trainer.save_model gathers ZeRO-3 partitions (stage3_gather_16bit_weights_on_model_save) and
    writes on rank 0 only: a full model, or just the PEFT adapter for LoRA. We then check that no
    tensor came out empty, the classic failure of ZeRO-3 saves."""
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True  # off for training; generation wants it
    trainer.save_model(output_dir)
    if trainer.args.should_save:
        tokenizer.save_pretrained(output_dir)
        save_stop_tokens(trainer.accelerator.unwrap_model(trainer.model), output_dir)
        from safetensors import safe_open

        for name in ("model.safetensors", "adapter_model.safetensors"):
            file = os.path.join(output_dir, name)
            if os.path.isfile(file):
                with safe_open(file, "pt") as f:
                    empty = [k for k in f.keys() if f.get_slice(k).get_shape() in ([], [0])
                             or 0 in f.get_slice(k).get_shape()]
                if empty:
                    raise RuntimeError(f"{file} has empty tensors {empty[:3]}: with ZeRO-3 set "
                                       "stage3_gather_16bit_weights_on_model_save to true.")


# ---------------------------------------------------------------------------------------------
# train()
# ---------------------------------------------------------------------------------------------


def finish_training_args(training_args, has_eval):
    """Settings that follow from others, applied once the data is known to be good."""
    if has_eval and training_args.eval_strategy == "no":
        training_args.eval_strategy = transformers.IntervalStrategy.EPOCH
    if training_args.early_stopping_patience:
        # The best model is restored at the end from the checkpoint saved at its evaluation: checkpoints
        # must be written on the evaluation schedule (save_total_limit rotation always keeps the best one).
        training_args.load_best_model_at_end = True
        training_args.metric_for_best_model = training_args.metric_for_best_model or "eval_loss"
        training_args.greater_is_better = False
        if training_args.save_strategy != transformers.trainer_utils.SaveStrategy.BEST:
            training_args.save_strategy = transformers.trainer_utils.SaveStrategy(training_args.eval_strategy)
            if training_args.eval_strategy == transformers.IntervalStrategy.STEPS:
                training_args.save_steps = training_args.eval_steps
    if training_args.gradient_checkpointing and not training_args.gradient_checkpointing_kwargs:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": False}
        if hasattr(training_args, "activation_checkpointing_kwargs"):  # transformers >= 5.x reads the new name
            training_args.activation_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per epoch


def write_report(report, output_dir):
    with open(os.path.join(output_dir, "data_report.json"), "w") as f:
        json.dump(report, f, indent=2)


def finish_dry_run(report, training_args):
    sample = report["first_sample_marked"]
    log0("first sample, trained parts in [[...]]:\n" + (sample if len(sample) < 4000 else sample[:4000] + " ..."))
    if training_args.process_index == 0:
        os.makedirs(training_args.output_dir, exist_ok=True)
        write_report(report, training_args.output_dir)
        log0(f"dry run: report written to {training_args.output_dir}/data_report.json")
    return report


def log_run_plan(report, training_args, attn, n_train):
    """The batch plan as this run will train it (after a resume on another number of processes has changed
    the accumulation): logged, and written into the report."""
    plan = batch_plan(training_args, n_train)
    report.update(plan)
    sp, dp, world = plan["sequence_parallel_size"], plan["data_parallel_size"], plan["world_size"]
    topology = (f"{dp} data-parallel x {sp} sequence-parallel ({world} processes; each sample split across the "
                "sequence-parallel group)" if sp > 1 else f"{world} processes")
    log0(f"method: {report['memory_estimate']['method']}, attention: {attn}, batching: {report['batching']}, "
         f"global batch size {plan['global_batch_size']} = {plan['per_device_batch_size']} per device x {topology} "
         f"x {plan['gradient_accumulation_steps']} accumulation, {plan['steps_per_epoch']} steps per epoch")


def make_collator(tokenizer, attn, packing, sp):
    if packing:
        return PackingCollator(flash_attention=attn == "flash_attention_2" and sp == 1, pad_to_multiple_of=sp,
                               pad_token_id=tokenizer.pad_token_id)
    # rows a multiple of 8 feed GPU kernels best; sequence parallelism cuts them into sp equal shards
    multiple = math.lcm(8 if torch.cuda.is_available() else 1, sp)
    return PaddingCollator(tokenizer.pad_token_id, multiple if multiple > 1 else None)


def save_results(trainer, tokenizer, result, report, has_eval):
    """The final model, metrics, state and report. A failed write ends the run with one line, and the weight files
    it wrote are removed (finetune_faults.saving): no half-written model is left to be loaded. The final evaluation
    comes first: a model whose retention fell below --retention_min is not saved as the result."""
    training_args = trainer.args
    history = trainer.state.log_history
    evaluated, n_logged = any(k.startswith("eval_") for h in history for k in h), len(history)
    final_eval = trainer.evaluate() if has_eval or trainer.retention is not None else None
    if evaluated:  # trainer_state.json keeps the evaluations made while training; the final one is eval_results.json
        del history[n_logged:]
    if trainer.retention is not None:
        log0(trainer.retention.summary(final_eval))
    since = time.time() - 1  # a failed final save removes the weight files it wrote (finetune_faults.saving)

    def final_bytes():
        return checkpoint_bytes(trainer.model, training_args, zero_stage(training_args), training_args.use_lora)[1]

    with saving(training_args.output_dir, "the final model", training_args, final_bytes,
                remove=lambda: remove_new_files(training_args.output_dir, since)):
        save_model(trainer, tokenizer, training_args.output_dir)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        if final_eval is not None:
            trainer.save_metrics("eval", final_eval)
        if training_args.process_index == 0:
            write_report(report, training_args.output_dir)


def parse_and_check(argv=None):
    """parse_args and validate_args on every rank; a bad flag stops every rank with its message once
    (finetune_distributed.stop_together: parsing forms the process group, so no rank may leave alone)."""
    args, error = None, None
    try:
        args = parse_args(argv)
        validate_args(*args)
    except (FileNotFoundError, ValueError) as e:
        error = e
    stop_together(error)
    return args


def train(argv=None):
    model_args, data_args, training_args, lora_args = parse_and_check(argv)
    transformers.set_seed(training_args.seed)
    attn = resolve_attn_implementation(model_args, training_args)
    packing = use_packing(data_args, attn)

    tokenizer = load_tokenizer(model_args, training_args)
    train_data, eval_data, reports = load_datasets(data_args, training_args, tokenizer)
    if data_args.show_masking:
        return show_masking(tokenizer, train_data, data_args.show_masking)
    first = train_data[0]
    report = data_report(train_data, eval_data, reports, marked_text(tokenizer, first["input_ids"], first["labels"]),
                         load_model_config(model_args, training_args), data_args, training_args, lora_args, packing)
    report["vocabulary"] = tokenizer.finetune_vocabulary
    log_data_summary(report)
    if data_args.dry_run:
        return finish_dry_run(report, training_args)

    finish_training_args(training_args, eval_data is not None)
    retention = load_retention(tokenizer, model_args, data_args, training_args, lora_args, _tokenize_arrays)
    schedule = eval_schedule(training_args, eval_data is not None)  # a run without an evaluation set
    checkpoint = find_resume_checkpoint(training_args)
    adapt_to_world_size(checkpoint, training_args)
    log_run_plan(report, training_args, attn, len(train_data))
    model = load_model(model_args, training_args, lora_args, attn, tokenizer)
    warn_if_low_space(model, training_args, zero_stage(training_args), training_args.use_lora)
    # preemption and the non-finite guard act on what all ranks agree on at each step end (one all-reduce)
    agreement = StepAgreement()
    callbacks = [LossPlotCallback(), agreement, PreemptionCallback(agreement),
                 NonFiniteGuard(training_args, reports[0]["sources"], agreement)]
    if training_args.early_stopping_patience:
        callbacks.append(transformers.EarlyStoppingCallback(training_args.early_stopping_patience))
    if retention is not None:  # base figures at train begin, the --retention_min guard
        callbacks.append(RetentionCallback(retention, schedule, training_args.retention_min,
                                           training_args.retention_action))
    trainer = FinetuneTrainer(
        model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
        data_collator=make_collator(tokenizer, attn, packing, training_args.sequence_parallel_size),
        processing_class=tokenizer, callbacks=callbacks, loss_balance=data_args.loss_balance,
        source_names=reports[0]["sources"], eval_source_names=reports[1]["sources"] if eval_data is not None else None,
        retention=retention,
    )

    if checkpoint:
        log0(f"resuming from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_results(trainer, tokenizer, result, report, eval_data is not None)
    log0(f"done: model saved to {training_args.output_dir}")
    return trainer


def main():
    """train(), and the exit code of how it ended; exit_when_done ends the process with it (and records it)."""
    import warnings

    # DeepSpeed calls torch.distributed functions that torch deprecates: a warning per call, rank and step
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    try:
        train()
    except Preempted as e:
        log0(e)
        return ExitCode.PREEMPTED
    except Fault as e:  # finetune_faults: training diverged (3), a save failed (74); printed where it happened
        if os.environ.get("FINETUNE_TRACEBACK"):
            raise
        if e.here:
            print(f"[finetune] error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except (DataError, FileNotFoundError, ValueError) as e:
        # User errors: one clear message, no traceback, non-zero exit on every rank.
        if os.environ.get("FINETUNE_TRACEBACK"):
            raise
        print(f"[finetune] error: {e}", file=sys.stderr, flush=True)
        return ExitCode.BAD_INPUT
    except StopQuietly as e:  # rank 0 reports the reason
        return e.code
    except SystemExit as e:  # a helper that ends the rank with sys.exit(code): still recorded by exit_when_done
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)
        return 1 if isinstance(e.code, str) else (e.code or 0)
    return 0


if __name__ == "__main__":
    exit_when_done(main)
