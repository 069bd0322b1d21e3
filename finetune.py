"""Supervised fine-tuning (SFT) of chat LLMs: full, LoRA, Q-LoRA and DoRA, on one device or many.

    python finetune.py --model_name_or_path MODEL --data_path data.jsonl --output_dir out
    torchrun --nproc_per_node 8 finetune.py ... --deepspeed ds_config_zero3.json
    python finetune.py config.yaml [--any_flag value]         # flags from a JSON/YAML file

Data flow: files -> format adapters (every format becomes `messages` + `tools`) -> validation
(`file:line: field: problem`) -> `tokenize_conversation` (input_ids + labels, loss only on what the
assistant says) -> a cached Arrow dataset -> batching (length-grouped padding or padding-free
packing) -> Trainer (step-wide token-normalised loss, per-source metrics) -> save -> merge/chat.
"""

import contextlib
import dataclasses
import difflib
import functools
import glob
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F


def quiet_known_notices():
    """Library notices that tell the user nothing to act on, dropped where they arise (loggers are
    filtered before the libraries are imported: bitsandbytes speaks on import). Each is narrow."""
    import logging

    notices = {
        # On CPUs with AVX512-BF16, bitsandbytes tries the optional `kernels` package for a faster 4-bit
        # CPU matmul and falls back to its own; only "not installed" is silenced, real failures still show.
        "bitsandbytes.backends.cpu.ops": lambda r: "gemm_4bit_forward" in r.msg and "'kernels'" in str(r.args),
        # No GPU: DeepSpeed says it runs on CPU, which is the plan (finetune.sh chose gloo for it).
        "DeepSpeed": lambda r: "Setting accelerator to CPU" in r.getMessage() and not torch.cuda.is_available(),
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
    for name, is_notice in notices.items():
        logging.getLogger(name).addFilter(lambda record, is_notice=is_notice: not is_notice(record))


@contextlib.contextmanager
def peft_wrapping():
    """While peft wraps a model: peft (0.21) reads the model's `is_gradient_checkpointing`, which
    transformers 5 deprecates with a FutureWarning on every LoRA run, naming nothing the user can change.
    Only that warning is dropped, and only here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


quiet_known_notices()
import transformers  # noqa: E402  (after the filters above)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer  # noqa: E402

# Helper modules next to this script: what it reports and plans with, and preemption-safe training.
from finetune_preemption import (PREEMPTED_EXIT_CODE, Preempted, PreemptionCallback,  # noqa: E402
                                 adapt_to_world_size, record_exit_code)
from finetune_report import (estimate_memory_gb, log0, loss_chunk_tokens, padding_share,  # noqa: E402
                             plot_loss, token_stats)

IGNORE_INDEX = -100
CACHE_VERSION = "3"  # bump when tokenization output changes, to invalidate old caches
LORA_DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# Used when a tokenizer has no chat template: Qwen's ChatML, tool-aware enough for plain chats.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default=None, metadata={"help": "Model directory or hub id, loaded with AutoModelForCausalLM."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom modelling code from the model repo."})
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto | sdpa | eager | flash_attention_2. auto: flash_attention_2 on GPU when "
                  "flash-attn is installed, else sdpa."},
    )
    chat_template: Optional[str] = field(
        default=None, metadata={"help": "Path to a Jinja chat template that replaces the tokenizer's own."}
    )


@dataclass
class DataArguments:
    data_path: str = field(
        default=None,
        metadata={"help": "Training data: files (.jsonl/.json, optionally .gz) or folders, comma-separated "
                  "(a comma inside a name is written \\,). A folder means all data files below it (hidden ones "
                  "skipped); append :RATIO to sample an entry (e.g. a.jsonl:0.5,b/:2)."},
    )
    eval_data_path: Optional[str] = field(default=None, metadata={"help": "Evaluation data, same syntax."})
    lazy_preprocess: bool = field(
        default=True,
        metadata={"help": "Kept for compatibility with Qwen's script. Preprocessing always runs once into an "
                  "on-disk Arrow cache, which is memory-bounded and reused by later runs."},
    )
    data_format: str = field(
        default="auto",
        metadata={"help": "auto | messages | sharegpt | alpaca | chat_rounds. auto detects it per file.",
                  "choices": ["auto", "messages", "sharegpt", "alpaca", "chat_rounds"]},
    )
    skip_invalid_records: bool = field(
        default=False, metadata={"help": "Drop invalid records (reported with counts) instead of stopping."}
    )
    train_on_prompt: bool = field(default=False, metadata={"help": "Train on every token, prompts included."})
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


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloaded models are cached."})
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": "Optimizer (any transformers OptimizerNames). adamw_torch_fused: AdamW in one kernel per "
        "parameter (on CPU 4x faster per step than adamw_torch's loop over parameters)."})
    model_max_length: int = field(
        default=8192, metadata={"help": "Maximum tokens per sample; longer conversations lose whole turns."}
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
                  "becomes processes / N. See README, Long samples."},
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

    @cached_property
    def _setup_devices(self):
        """DeepSpeed without GPUs (CPU runs and tests under torchrun): accelerate picks no process-group
        backend then and every rank would believe it is alone (world_size 1). Start its shared state with
        the --ddp_backend (gloo) first; TrainingArguments and Trainer then reuse it."""
        if self.deepspeed and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            try:
                PartialState(backend=self.ddp_backend or "gloo", timeout=self.ddp_timeout_delta)
            finally:
                del os.environ["ACCELERATE_USE_DEEPSPEED"]
            self.accelerator_config.use_configured_state = True
        return super()._setup_devices


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={
        "help": "LoRA dropout. 0 by default: peft drops out a copy of every adapter's input, which costs as much "
        "memory as the activations themselves and a third of the step time (README, Throughput)."})
    lora_target_modules: str = field(
        default=LORA_DEFAULT_TARGETS, metadata={"help": "Comma-separated module names, or all-linear."}
    )
    lora_weight_path: str = field(default="", metadata={"help": "Start from this existing adapter directory."})
    lora_bias: str = field(
        default="none", metadata={"help": "none | all | lora_only.", "choices": ["none", "all", "lora_only"]}
    )
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: 4-bit NF4 base model + LoRA (implies use_lora)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})


def _suggest(name, known):
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_config(path, actions):
    """A JSON/YAML config file -> flags; its keys are flag names without '--', checked here so that a
    typo names the file and the key (not 'unused arguments')."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                config = json.load(f)
            else:
                import yaml

                config = yaml.safe_load(f)
    except Exception as e:  # JSONDecodeError, yaml.YAMLError, UnicodeDecodeError: all the user's file
        raise ValueError(f"config file {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                         f"{' '.join(str(e).split())}") from None
    if not isinstance(config, (dict, type(None))):
        raise ValueError(f"config file {path}: expected a mapping of flag: value, got {type(config).__name__}")
    flags = []
    for key, value in (config or {}).items():
        if str(key) not in actions:
            raise ValueError(f"config file {path}: unknown key {key!r}{_suggest(str(key), list(actions))}; "
                             "keys are the command-line flags without '--' (see --help)")
        if value is None:  # YAML null: the flag's default
            continue
        if isinstance(value, list) and actions[key].nargs is None:  # data_path: [a.jsonl, b/] -> "a.jsonl,b/"
            value = ",".join(str(v).replace(",", "\\,") for v in value)
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}"] + [json.dumps(v) if isinstance(v, dict) else str(v) for v in values]
    return flags


def _join_repeated(argv, names=("data_path", "eval_data_path")):
    """A repeated --data_path adds its entries (argparse would silently keep only the last one)."""
    out, seen = [], {}
    i = 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None
        if name in names and (eq or i + 1 < len(argv)):
            value, i = (value, i + 1) if eq else (argv[i + 1], i + 2)
            if name in seen:
                out[seen[name]] += "," + value
            else:
                seen[name] = len(out) + 1
                out += [f"--{name}", value]
            continue
        out.append(argv[i])
        i += 1
    return out


def parse_args(argv=None):
    """Flags, or a JSON/YAML file as first argument whose keys are flags (later flags override it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    actions = {a.dest: a for a in parser._actions}
    known = list(actions)
    config = _read_config(argv.pop(0), actions) if argv and argv[0].endswith((".json", ".yaml", ".yml")) else []
    argv = config + _join_repeated(argv)  # flags after the config file override it

    def error(message):  # argparse would print usage and exit; make it one `[finetune] error:` line
        raise ValueError(f"{message} (see python finetune.py --help)")

    parser.error = error
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except json.JSONDecodeError as e:  # transformers reads --deepspeed (and other JSON file flags) itself
        for flag, value in zip(argv, argv[1:]):
            if flag.startswith("--") and value.endswith(".json") and os.path.isfile(value):
                try:
                    with open(value) as f:
                        json.load(f)
                except ValueError:
                    raise ValueError(f"{flag} {value} is not valid JSON: {e}") from None
        raise
    except ValueError as e:
        unused = re.search(r"not used by the HfArgumentParser: \[(.*)\]", str(e))
        if unused:
            flag = unused.group(1).split(",")[0].strip(" '")
            raise ValueError(f"unknown flag {flag}{_suggest(flag.lstrip('-'), known)} (see python finetune.py --help)")
        raise


# Ranges checked before anything is read: (flag, lowest, highest, lowest allowed itself?); None = open.
FLAG_RANGES = [
    ("lora_r", 1, None, True), ("lora_alpha", 0, None, False), ("lora_dropout", 0, 1, True),
    ("per_device_train_batch_size", 1, None, True), ("per_device_eval_batch_size", 1, None, True),
    ("gradient_accumulation_steps", 1, None, True), ("model_max_length", 16, None, True),
    ("learning_rate", 0, None, True), ("num_train_epochs", 0, None, False), ("weight_decay", 0, None, True),
    ("max_grad_norm", 0, None, True), ("warmup_steps", 0, None, True), ("warmup_ratio", 0, 1, True),
    ("logging_steps", 0, None, False), ("save_steps", 0, None, False), ("eval_steps", 0, None, False),
    ("save_total_limit", 1, None, True), ("seed", 0, 2**32 - 1, True), ("dataloader_num_workers", 0, None, True),
    ("preprocessing_num_workers", 1, None, True), ("dry_run_world_size", 1, None, True),
    ("early_stopping_patience", 1, None, True), ("show_masking", 0, None, True),
]


def _check_ranges(*arg_groups):
    for name, low, high, inclusive in FLAG_RANGES:
        value = next((getattr(g, name) for g in arg_groups if hasattr(g, name)), None)
        if value is None or isinstance(value, str) or (name == "num_train_epochs" and arg_groups[0].max_steps > 0):
            continue
        ok = math.isfinite(value) and (value >= low if inclusive else value > low) and (high is None or value <= high)
        if not ok:
            bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise ValueError(f"--{name} {value}: must be a finite number {bound}.")


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
    if not data_args.data_path:
        raise ValueError("--data_path is required (a .jsonl/.json file, a folder, or a comma-separated list).")
    _check_ranges(training_args, lora_args, data_args)
    check_model_path(model_args.model_name_or_path,
                     "tokenizer" if data_args.show_masking else "config" if data_args.dry_run else "weights")
    if int(os.environ.get("RANK", "0")) == 0:
        check_writable_dir(training_args.output_dir)
        check_writable_dir(data_args.dataset_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "finetune"),
                           "--dataset_cache_dir")
    # missing entries, bad ratios, folder problems, the same file twice; eval files that are also trained on
    # are said (an overfitting check may want that; a held-out set must not)
    train_files = {_file_id(f) for _, _, files in resolve_data_spec(data_args.data_path)[0] for f, _ in files}
    for _, _, files in resolve_data_spec(data_args.eval_data_path)[0] if data_args.eval_data_path else []:
        shared = [file for file, _ in files if _file_id(file) in train_files]
        if shared:
            log0(f"note: --eval_data_path files also in --data_path (evaluated on training data): {', '.join(shared)}")
    if model_args.chat_template and not os.path.isfile(model_args.chat_template):
        raise FileNotFoundError(f"--chat_template {model_args.chat_template} does not exist.")
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
    if training_args.fused_loss != "none":
        import importlib.util

        if not torch.cuda.is_available():
            raise ValueError("--fused_loss cce needs a GPU; drop it (the chunked loss is the default everywhere).")
        if importlib.util.find_spec("cut_cross_entropy") is None:
            raise ValueError("--fused_loss cce needs the cut-cross-entropy package: pip install cut-cross-entropy, "
                             "or drop the flag.")
        if zero_stage(training_args) == 3 or "lm_head" in lora_args.lora_target_modules:
            raise ValueError("--fused_loss cce reads lm_head's weight directly: not with ZeRO-3 (partitioned) nor a "
                             "LoRA on lm_head; drop the flag or use ds_config_zero2.json / other LoRA targets.")
    if training_args.loss_chunk_tokens < 0:
        raise ValueError("--loss_chunk_tokens must be 0 (automatic) or a positive number of tokens.")
    if data_args.train_on_prompt and data_args.train_on_last_turn_only:
        raise ValueError("--train_on_prompt and --train_on_last_turn_only exclude each other; pick one.")
    if training_args.early_stopping_patience and not data_args.eval_data_path:
        raise ValueError("--early_stopping_patience needs --eval_data_path (it watches eval_loss).")
    setup_sequence_parallel(model_args, data_args, training_args)


def zero_stage(training_args):
    ds = training_args.deepspeed
    if not ds:
        return 0
    if isinstance(ds, str):
        if not os.path.isfile(ds):
            raise FileNotFoundError(f"--deepspeed {ds} does not exist.")
        try:
            with open(ds) as f:
                ds = json.load(f)
        except ValueError as e:
            raise ValueError(f"--deepspeed {training_args.deepspeed} is not valid JSON: {e}") from None
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------------------------------------
# Chat data: files, formats, validation
# ---------------------------------------------------------------------------------------------

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".xlsx", ".xls")  # refused with the fix
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT (`from`) and MFTCoder (`role`) speaker names -> our roles.
SPEAKER_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "bot": "assistant",
    "assistant": "assistant", "model": "assistant", "function_call": "assistant", "observation": "tool",
    "function": "tool", "tool": "tool",
}


# Keys a message/turn may carry (messages, sharegpt, chat_rounds); a near-miss of one is a typo, an error.
MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content", "train",
                "loss_weight", "weight", "from", "value", "function_call")


class RecordError(ValueError):
    """A problem with one record: `field` names where (e.g. messages[2].content)."""

    def __init__(self, field_name, problem):
        super().__init__(f"{field_name}: {problem}")
        self.field_name, self.problem = field_name, problem


def parse_data_spec(spec):
    """'a.jsonl:0.5,dir/' -> [(path, ratio)]. Commas separate entries ('\\,' is a comma inside a name); a
    trailing ':RATIO' is a ratio only if the entry as written is not an existing path (so 'run:3/' works)."""
    entries = []
    for item in re.split(r"(?<!\\),", spec):
        item = os.path.expanduser(item.replace("\\,", ",").strip())
        if not item:
            continue
        path, ratio = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head and not os.path.exists(item):
            try:
                path, ratio = head, float(tail)
            except ValueError:
                raise FileNotFoundError(
                    f"--data_path: {head} exists, but {tail!r} after ':' is not a ratio (ENTRY:RATIO, e.g. "
                    f"{head}:0.5)" if os.path.exists(head) else
                    f"--data_path: {item} does not exist (a ',' inside a name is written '\\,')") from None
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data_path: {path} does not exist "
                                    "(entries are separated by ','; a ',' inside a name is written '\\,')")
        if not (math.isfinite(ratio) and 0 < ratio <= 1000):
            raise ValueError(f"--data_path: ratio of {path} must be a number > 0 and <= 1000, got {tail!r}.")
        entries.append((path, ratio))
    if not entries:
        raise ValueError(f"--data_path '{spec}' names no file.")
    return entries


def _file_id(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def list_data_files(path):
    """A file -> [(file, source)]; a folder -> its data files, recursively, following symbolic links to
    folders (a link to a folder that contains it is an error); source = the first-level sub-folder (one per
    task) or the folder's own name. Also returns what was not read, to be said once in the log and report:
    hidden files and folders (.ipynb_checkpoints/, .git/, ...) and files of other types."""
    skipped = {"hidden": [], "ignored": []}
    if not os.path.isdir(path):
        suffix = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower()
        if suffix in TABLE_SUFFIXES:
            raise ValueError(f"--data_path: {path}: {suffix[1:].upper()} files are not supported; give "
                             f"{'/'.join(DATA_SUFFIXES)} (e.g. pandas: pd.read_{'csv' if suffix in ('.csv', '.tsv') else suffix[1:]}"
                             f"(...).to_json('data.jsonl', orient='records', lines=True)).")
        name = os.path.basename(path)
        for suffix in DATA_SUFFIXES:
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        return [(path, name)], skipped
    root = os.path.normpath(path)
    files = []

    def walk(folder, ancestors):
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise ValueError(f"--data_path: cannot read folder {folder}: {e.strerror}") from None
        for name in names:
            full = os.path.join(folder, name)
            if name.startswith("."):
                skipped["hidden"].append(full)
            elif os.path.isdir(full):
                if _file_id(full) in ancestors:
                    raise ValueError(f"--data_path: {full} links to {os.path.realpath(full)}, a folder that "
                                     "contains the link: a loop. Remove or fix the link.")
                walk(full, ancestors | {_file_id(full)})
            elif not os.path.isfile(full):
                raise ValueError(f"--data_path: {full} is "
                                 f"{'a broken symbolic link (or a loop of links)' if os.path.islink(full) else 'not a regular file'}"
                                 "; remove it or fix the link.")
            elif name.lower().endswith(DATA_SUFFIXES):
                rel = os.path.relpath(folder, root)
                files.append((full, os.path.basename(root) if rel == "." else rel.split(os.sep)[0]))
            else:
                skipped["ignored"].append(full)

    walk(root, {_file_id(root)})
    if not files:
        raise FileNotFoundError(f"--data_path: folder {path} has no {'/'.join(DATA_SUFFIXES)} files"
                                + (f" (skipped hidden: {', '.join(skipped['hidden'][:3])})" if skipped["hidden"] else "")
                                + (f" (ignored: {', '.join(skipped['ignored'][:3])})" if skipped["ignored"] else "") + ".")
    return files, skipped


def resolve_data_spec(spec):
    """--data_path -> ([(entry, ratio, [(file, source)])], skipped). A file reached twice (named twice, via
    a folder and by name, or through a link) is an error: it would silently double its data."""
    entries, skipped, seen = [], {"hidden": [], "ignored": []}, {}
    for i, (path, ratio) in enumerate(parse_data_spec(spec)):
        files, skip = list_data_files(path)
        for kind in skipped:
            skipped[kind] += skip[kind]
        for file, _ in files:
            other = seen.setdefault(_file_id(file), (file, path, i))
            if other != (file, path, i):
                raise ValueError(f"--data_path: {file} would be read twice (entries {other[1]!r} and {path!r}"
                                 + (f", as {other[0]}" if other[0] != file else "") + "); give each file once, "
                                 f"and use a ratio to repeat data (e.g. {path}:2).")
        entries.append((path, ratio, files))
    return entries, skipped


# Leading bytes of files that are not JSON text -> what they are.
MAGIC = {b"PAR1": "a Parquet file", b"PK\x03\x04": "a ZIP archive", b"BZh": "bzip2-compressed",
         b"\xfd7zXZ": "xz-compressed", b"\x28\xb5\x2f\xfd": "zstd-compressed", b"ARROW1": "an Arrow file"}
ENCODINGS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _open_json_text(path):
    """The file as a binary stream of UTF-8 JSON text, or DataError saying in one line what it is instead.
    gzip is recognised by its content, not its name."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    f = gzip.GzipFile(fileobj=raw) if raw.read(2) == b"\x1f\x8b" else None
    raw.seek(0)
    if f is None and path.lower().endswith(".gz"):
        raw.close()
        raise DataError(f"{path}: named .gz but not gzip data; rename it (drop .gz) or re-create it.")
    if f is not None and not path.lower().endswith(".gz"):
        log0(f"{path}: gzip-compressed although not named .gz; reading it decompressed.")
    f = f or raw
    head = f.read(4096)
    f.seek(0)
    kind = next((what for magic, what in MAGIC.items() if head.startswith(magic)), None)
    encoding = next((enc for bom, enc in ENCODINGS.items() if head.startswith(bom)), None)
    if encoding or (not kind and b"\x00" in head):
        f.close()
        raise DataError(f"{path}: text encoded as {encoding or 'UTF-16/UTF-32 (NUL bytes)'}, not UTF-8; convert "
                        f"it, e.g. iconv -f {encoding or 'UTF-16'} -t UTF-8 {path} > {path}.utf8")
    if kind:
        f.close()
        raise DataError(f"{path}: {kind}, not JSON text; give {'/'.join(DATA_SUFFIXES)} files.")
    return f


def _wrapper_key(value):
    """The key of a JSON object that holds the records as a list (e.g. {"version": 1, "data": [...]})."""
    if isinstance(value, dict) and detect_format(value) is None:
        for key, items in value.items():
            if isinstance(items, list) and items and isinstance(items[0], dict):
                return key
    return None


def _not_records(path, value, line):
    key = _wrapper_key(value)
    if key is not None:
        raise DataError(f"{path}:{line}: the top level is a JSON object, not records; the records seem to be the "
                        f"list under {key!r}: give that list as a JSON array or as JSONL (e.g. jq -c '.{key}[]' "
                        f"{path} > data.jsonl).")


def read_json_records(path):
    """Yield (line, record-or-RecordError) from a JSONL file or a JSON array (BOM, CRLF, blank lines ok).
    JSONL is streamed line by line; line numbers count '\\n' like editors do. A problem with the file as a
    whole (not JSON text, truncated gzip, data after the array, ...) raises DataError naming the file."""
    bom = b"\xef\xbb\xbf"
    try:
        f = _open_json_text(path)
        with f:
            head = b""
            while not head.strip():  # peek past leading whitespace: '[' means a JSON array
                chunk = f.read(65536)
                if not chunk:
                    break
                head += chunk
            f.seek(0)
            first = head.removeprefix(bom).lstrip()[:1]
            if not first:
                raise DataError(f"{path}: {'empty file' if not head else 'only blank lines'}: no records.")
            if first == b"[":
                yield from _array_records(path, f.read())
                return
            first_line = True
            for line_no, raw in enumerate(f, 1):
                raw = raw.removeprefix(bom)
                if not raw.strip():
                    continue
                was_first, first_line = first_line, False
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield line_no, RecordError("json", "not valid UTF-8")
                    continue
                except RecursionError:
                    yield line_no, RecordError("json", "nested too deeply")
                    continue
                except json.JSONDecodeError as e:
                    if was_first:
                        _whole_file_value(path, f)  # a pretty-printed object spans lines: say what it is
                    yield line_no, RecordError("json", f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                if was_first:
                    _not_records(path, record, line_no)
                yield line_no, record
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e}); re-create or re-download it.") from None


def _whole_file_value(path, f):
    """Called when the first line of a non-array file is not JSON: a JSON object over several lines is
    either a wrapper of the records, or several pretty-printed objects (not JSONL); both get one line."""
    pos = f.tell()
    f.seek(0)
    try:
        value = json.loads(f.read().decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1:  # the first value is complete and spans lines
            raise DataError(f"{path}:{e.lineno}: several JSON values over several lines, one after another: "
                            "neither JSONL (one record per line) nor a JSON array; write one of those.") from None
        value = None
    except (UnicodeDecodeError, RecursionError):
        value = None
    f.seek(pos)
    _not_records(path, value, 1)
    if isinstance(value, dict):
        raise DataError(f"{path}: one JSON object over several lines, not JSONL (one record per line) or an "
                        "array of records; put it on one line or inside [ ].")


NEWLINE = b"\n"


def _array_records(path, data):
    """Records of a JSON array, one by one, with the line each starts on. A syntax error inside a record
    makes that record invalid; reading resumes at the next record, found as the next line that starts
    like the records do (same indentation, '{'), so the broken stretch is exactly one record. If records
    do not start lines (an array on one line), the file cannot be split and is refused."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{data.count(NEWLINE, 0, e.start) + 1}: not valid UTF-8.") from None
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    line, record_start = text.count("\n", 0, pos) + 1, None
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            line += text[pos] == "\n"
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{line}: the JSON array is not closed with ']' (truncated file?).")
        if text[pos] == "]":
            break
        indent = text[text.rfind("\n", 0, pos) + 1:pos]
        if record_start is None and not indent.strip():
            record_start = re.compile(r"\n" + re.escape(indent) + r"\{")
        try:
            record, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            where = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            nxt = record_start.search(text, pos + 1) if record_start else None
            if record_start is None:
                raise DataError(f"{path}:{getattr(e, 'lineno', line)}: invalid JSON ({where}) in an array whose records "
                                "do not start lines, so the records after it cannot be told apart or counted. "
                                "Fix the file, or write JSONL (one record per line).") from None
            yield getattr(e, "lineno", line), RecordError("json", f"invalid JSON ({where})")
            if nxt is None:
                return  # the broken record was the last one: nothing after it is a record
            line += text.count("\n", pos, nxt.start() + 1)
            pos = nxt.start() + 1
            continue
        yield line, record
        line += text.count("\n", pos, end)
        pos = end
    rest = text[pos + 1:]
    if rest.strip():
        extra = line + rest[:len(rest) - len(rest.lstrip())].count("\n")
        raise DataError(f"{path}:{extra}: more data after the JSON array that ends on line {line}; a file holds "
                        "one array (files joined with cat? merge them: jq -s add a.json b.json > all.json). "
                        "JSONL needs one record object per line, not a list.")


def detect_format(record):
    if isinstance(record, dict):
        for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("chat_rounds", "chat_rounds")):
            if key in record:
                return fmt
        if "instruction" in record or "output" in record:
            return "alpaca"
    return None


def _text(content, where):
    """Content as a string: a string, None, or a list of OpenAI-style text parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, (dict, str)) for p in content):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise RecordError(where, f"unsupported content part {json.dumps(p)[:60]} (only text parts)")
        return "".join(parts)
    raise RecordError(where, f"content must be a string, got {type(content).__name__}")


def _tools(tools):
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RecordError("tools", "not valid JSON")
    if isinstance(tools, dict) and not {"name", "function"} & tools.keys():
        example = next(iter(tools), "")
        raise RecordError("tools", f"an object keyed by function name ({example!r}, ...); write a list of "
                          f'function schemas: [{{"name": "{example}", "description": ..., "parameters": ...}}, ...]')
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("tools", "must be a list of function schemas")
    tools = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    for i, t in enumerate(tools):
        if not isinstance(t["function"], dict) or not isinstance(t["function"].get("name"), str):
            raise RecordError(f"tools[{i}]", "a function schema needs a name (and description, parameters)")
    return tools


def _tool_calls(calls, where):
    """OpenAI tool_calls or ShareGPT function_call payloads -> [{"type","function":{"name","arguments":dict}}]."""
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            raise RecordError(where, "function call is not valid JSON")
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordError(where, "each tool call needs a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # templates render arguments with tojson: a dict, not a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}.arguments", f"not valid JSON ({e.msg} at column {e.colno}): "
                                  f"{fn['arguments'][:60]!r}") from None
        if not isinstance(args, dict):
            raise RecordError(f"{where}.arguments", f"must be a JSON object (or a string holding one), got "
                              f"{type(args).__name__}")
        item = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and "id" in call:
            item["id"] = call["id"]
        out.append(item)
    return out


def _message(role, content, field_name, item=None, tool_calls=None):
    """One normalized message, checking what every format needs; errors name the record's own field
    (field_name: where the content is; item: the source turn, whose train/loss_weight/... are kept)."""
    content = _text(content, field_name)
    if tool_calls:
        msg = {"role": role, "content": content or "", "tool_calls": tool_calls}  # "": what templates expect
    elif content is None:
        raise RecordError(field_name, "missing or null (must be a string)")
    elif role == "assistant" and not content.strip():
        raise RecordError(field_name, "empty assistant reply")
    else:
        msg = {"role": role, "content": content}
    prefix = field_name.rsplit(".", 1)[0]
    for key in item or {}:
        if key not in MESSAGE_KEYS and difflib.get_close_matches(key, MESSAGE_KEYS, n=1, cutoff=0.75):
            raise RecordError(f"{prefix}.{key}", f"unknown key{_suggest(key, MESSAGE_KEYS)}")
    for key in ("name", "tool_call_id", "reasoning_content", "train", "loss_weight", "weight"):
        if key in (item or {}):
            msg["loss_weight" if key == "weight" else key] = item[key]  # weight: OpenAI fine-tuning's 0/1
    if not isinstance(msg.get("train", True), bool):
        raise RecordError(f"{prefix}.train", "must be true or false")
    weight = msg.get("loss_weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise RecordError(f"{prefix}.{'weight' if 'weight' in (item or {}) else 'loss_weight'}",
                          f"must be a finite number >= 0, got {weight!r}")
    return msg


def _from_messages(record):
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RecordError(where, "must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise RecordError(f"{where}.role", f"unknown role {role!r} (expected {'/'.join(ROLES)})")
        if "content" not in m and not m.get("tool_calls"):
            raise RecordError(f"{where}.content", "missing")
        calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls") if m.get("tool_calls") else None
        out.append(_message(role, m.get("content"), f"{where}.content", m, calls))
    return out, _tools(record.get("tools"))


def _from_speakers(turns, list_field, speaker_key, text_key, system=None):
    if not isinstance(turns, list) or not turns:
        raise RecordError(list_field, "must be a non-empty list")
    out = [_message("system", system, "system")] if system not in (None, "") else []
    for i, t in enumerate(turns):
        where = f"{list_field}[{i}]"
        if not isinstance(t, dict):
            raise RecordError(where, "must be an object")
        sk, tk = (speaker_key, text_key) if speaker_key in t or "role" not in t else ("role", "content")
        speaker = t.get(sk)
        role = SPEAKER_ROLES.get(speaker)
        if role is None:
            raise RecordError(f"{where}.{sk}", f"unknown speaker {speaker!r} "
                              f"(expected one of {', '.join(sorted(SPEAKER_ROLES))})")
        calls = _tool_calls(t.get(tk), f"{where}.{tk}") if speaker == "function_call" else None
        out.append(_message(role, None if calls else t.get(tk), f"{where}.{tk}", t, calls))
    return out


def _from_sharegpt(record):
    msgs = _from_speakers(record["conversations"], "conversations", "from", "value", record.get("system"))
    return msgs, _tools(record.get("tools"))


def _from_chat_rounds(record):
    return _from_speakers(record["chat_rounds"], "chat_rounds", "role", "content", record.get("system")), None


def _from_alpaca(record):
    for key in ("instruction", "output", "input", "system"):
        optional = key in ("input", "system")
        if not isinstance(record.get(key), str) and not (optional and record.get(key) is None):
            raise RecordError(key, "missing or not a string" if not optional else "must be a string")
    msgs = [_message("system", record["system"], "system")] if record.get("system") else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history", "must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordError(f"history[{i}]", "must be a [question, answer] pair of strings")
        msgs += [_message("user", pair[0], f"history[{i}][0]"), _message("assistant", pair[1], f"history[{i}][1]")]
    prompt = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
    msgs += [_message("user", prompt, "instruction"), _message("assistant", record["output"], "output")]
    return msgs, None


ADAPTERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
            "chat_rounds": _from_chat_rounds}
RECORD_KEYS = ("messages", "conversations", "chat_rounds", "tools", "system", "source", "instruction", "input",
               "output", "history")
REQUIRED_KEY = {"messages": "messages", "sharegpt": "conversations", "chat_rounds": "chat_rounds",
                "alpaca": "instruction"}


def normalize_record(record, fmt):
    """Any supported record -> (messages, tools), or RecordError naming the field and the problem."""
    if not isinstance(record, dict):
        raise RecordError("record", f"must be a JSON object, got {type(record).__name__}")
    for key in record:
        if key not in RECORD_KEYS and difflib.get_close_matches(key, RECORD_KEYS, n=1, cutoff=0.75):
            raise RecordError(key, f"unknown key{_suggest(key, RECORD_KEYS)}")
    if REQUIRED_KEY[fmt] not in record:
        raise RecordError(REQUIRED_KEY[fmt], f"missing (file read as {fmt} format)")
    messages, tools = ADAPTERS[fmt](record)
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise RecordError(REQUIRED_KEY[fmt], "no assistant turn to train on")
    if not any(is_trained(m) for m in assistants):
        raise RecordError(REQUIRED_KEY[fmt], "every assistant turn is excluded (train: false / loss_weight: 0)")
    return messages, tools


def is_trained(message):
    return message.get("train", True) is not False and message.get("loss_weight", 1) != 0


# ---------------------------------------------------------------------------------------------
# Tokenization: chat template -> input_ids + labels (loss only on what the assistant says)
# ---------------------------------------------------------------------------------------------
# The whole conversation is rendered by the model's own template and tokenized once, so input_ids are
# exactly what `apply_chat_template` gives (the prefixes the rule compares are rendered, never tokenized).
# What to train is found by one rule, from how the template renders (nothing is searched for in the text,
# so no template needs to be known in advance):
#
#   the trained part of assistant turn i is what render(messages[:i+1]) adds to the generation prompt
#   render(messages[:i], add_generation_prompt=True): the model's answer, its tool calls and everything
#   the template writes to close the turn (all of its end tokens).
#
# The prompt is matched whitespace aside (hand-written templates indent it differently from the turn). If
# it is not a prefix of the turn (the template renders the turn with other text, e.g. DeepSeek-LLM's
# prompt 'Assistant:' and the turn 'Assistant: answer'), the turn starts where the two
# first differ. A template that supplies an empty reasoning block when thinking is off (Qwen3) has that
# block as part of a prompt: it is not trained when the template inserts it on its own. Text a template
# appends after every conversation (Command-R's next-turn opener) is not part of the turn.
# Templates that render a turn differently once later messages follow (Qwen3 strips earlier reasoning,
# Mistral moves the system prompt into the last user turn) are mapped through the turn's content: the
# characters of the full text that change when only this turn's content changes are where it is.
# Tokens are trained if they overlap the trained characters, so a token that carries the separator space
# and the first word ('▁two', 'Ġtwo') is trained.

SENTINEL = "\ue000\ue001"  # private-use characters: never in real text, never stripped by a template
# Passed to the generation prompt to ask for the template's thinking-off prompt (Qwen3, SmolLM3, GLM: enable_thinking;
# DeepSeek-V3.1, Granite: thinking); templates that do not know them ignore them.
THINKING_OFF = {"enable_thinking": False, "thinking": False}
_TEMPLATE_FACTS = {}


class ChatRenderer:
    """render(messages, add_generation_prompt=False, **template_kwargs) -> text, exactly as
    tokenizer.apply_chat_template(messages, tools=tools, tokenize=False) renders it (the same compiled template,
    None-valued keys dropped, reasoning fields aliased, tools as plain data, the special tokens as variables).
    It is called several times per conversation, so what apply_chat_template redoes on every call is done once:
    each message is prepared once (our messages are JSON data already: no defensive deep copy), and the Jinja
    context is built from a plain dict of the template's globals."""

    def __init__(self, tokenizer, tools=None):
        self.tokenizer, self.tools = tokenizer, tools
        self.prepared = {}  # id(message) -> (message, prepared); the message is kept so its id stays unique
        try:
            from transformers.utils import chat_template_utils as ctu

            self.template = ctu._compile_jinja_template(tokenizer.get_chat_template(None, tools))
            self.alias, self.plain = ctu._alias_reasoning_fields, ctu._plain_template_data
        except (ImportError, AttributeError):  # another transformers: its public API, one call per render
            self.template = None
            return
        self.globals = dict(self.template.globals)
        self.variables = {**self.globals, **self.plain(dict(tokenizer.special_tokens_map)), "tools": self.plain(tools),
                          "documents": None}

    def _prepare(self, message):
        hit = self.prepared.get(id(message))
        if hit is None or hit[0] is not message:
            hit = self.prepared[id(message)] = (message, self.alias([{k: v for k, v in message.items()
                                                                       if v is not None}])[0])
        return hit[1]

    def __call__(self, messages, add_generation_prompt=False, **template_kwargs):
        if self.template is None:
            return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **template_kwargs)
        env = self.template.environment
        context = env.context_class(env, {**self.variables, **self.plain(template_kwargs),
                                          "messages": [self._prepare(m) for m in messages],
                                          "add_generation_prompt": add_generation_prompt},
                                    self.template.name, self.template.blocks, globals=self.globals)
        try:
            return env.concat(self.template.root_render_func(context))
        except Exception:
            env.handle_exception()


def _common_prefix(a, b):
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on slice equality: C-speed comparisons
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a, b):
    return _common_prefix(a[::-1], b[::-1])


def _special_tokens(tokenizer):
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


def _snap_out_of_specials(text, k, specials):
    """k moved back to the start of a special token that text[k-1:k+1] would cut in two ('<|' is shared by
    '<|im_end|>' and '<|im_start|>' but is no boundary)."""
    for s in specials:
        p = text.find(s, max(0, k - len(s) + 1))
        if 0 <= p < k < p + len(s):
            k = p
    return k


def _template_facts(tokenizer, render):
    """(specials, has a thinking-off prompt, renders like apply_chat_template) for this tokenizer and template,
    from one probe chat; cached."""
    key = (id(tokenizer), len(tokenizer), tokenizer.chat_template, str(tokenizer.special_tokens_map))
    if key not in _TEMPLATE_FACTS:
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes", "reasoning_content": "r"}]
        try:
            same = render(probe) == tokenizer.apply_chat_template(probe, tools=render.tools, tokenize=False)
            thinking_off = render(probe[:1], True, **THINKING_OFF) != render(probe[:1], True)
        except Exception:
            same, thinking_off = True, False  # the template refuses the probe; real conversations will say why
        _TEMPLATE_FACTS[key] = (tuple(_special_tokens(tokenizer)), thinking_off, same)
    return _TEMPLATE_FACTS[key]


def _prompt_end(render, messages, i, prompt, turn, specials):
    """Where the generation prompt of turn i ends in `turn` (= render(messages[:i+1])) when the prompt is not a
    prefix of it: the template renders the turn's opener differently (DeepSeek-R1's prompt ends in '<think>\\n'),
    or the history (a system prompt moved into the last user turn, a tool result closed differently when it is
    last). Both are aligned after the previous message's content, and, if what stands right before the turn's
    content is the prompt's own ending, the prompt ends there."""
    start = _snap_out_of_specials(turn, _common_prefix(prompt, turn), specials)
    if i > 0:
        before = {**messages[i - 1], "content": SENTINEL}
        probe = messages[:i - 1] + [before]
        in_prompt = _diff(prompt, render(probe, True))
        in_turn = _diff(turn, render(probe + [messages[i]]))
        if in_prompt and in_turn:
            k = in_turn[1] + _common_prefix(prompt[in_prompt[1]:], turn[in_turn[1]:])
            start = max(start, _snap_out_of_specials(turn, k, specials))
    c = (_where_content(render, turn, messages[:i + 1], i) or (None,))[0]
    if c is not None and c > start and turn[c - _common_suffix(prompt, turn[:c]):c].strip():
        start = c
    return start


def _after_prompt(prompt, turn):
    """Where `prompt` ends in `turn` if the turn starts with it, whitespace aside (hand-written templates often
    indent the generation prompt, or end it with another newline, than the turn they render), else None."""
    if turn.startswith(prompt):
        return len(prompt)
    i = j = _common_prefix(prompt, turn)
    while i < len(prompt):
        if prompt[i].isspace():
            i += 1
            continue
        while j < len(turn) and turn[j].isspace():
            j += 1
        if j == len(turn) or turn[j] != prompt[i]:
            return None
        i, j = i + 1, j + 1
    if prompt[-1:].isspace():  # the prompt ends with whitespace: so does what it supplies of the turn
        while j < len(turn) and turn[j].isspace():
            j += 1
    return j


def _generated_part(prompts, turn, specials, eos, prompt_end, history):
    """(start, end) in `turn` (= render(messages[:i+1])) of what the model generates for its last turn, given
    the generation prompts the template gives for messages[:i] (default first, then thinking-off).
    prompt_end(): _prompt_end for the default prompt; history(): render(messages[:i]) (both lazy)."""
    full = [k for k in (_after_prompt(p, turn) for p in prompts) if k is not None]
    start = max(full) if full else prompt_end()
    end = len(turn)
    # Text the template writes after the last message of any conversation (an unconditional next-turn opener,
    # Command-R) ends the generation prompt and history() too: it is not part of the turn. It starts at a
    # special token, and after the EOS token if the shared text has one (nothing after EOS is generated).
    shared = _common_suffix(prompts[0], turn[start:]) if prompts[0][-1:] == turn[-1:] else 0
    if shared and turn[end - shared:].strip():
        tail = turn[end - shared:]
        cut = tail.rfind(eos) + len(eos) if eos and eos in tail else \
            min((p for p in (tail.find(s) for s in specials) if p >= 0), default=None)
        if cut is not None and cut < len(tail) and history().endswith(tail[cut:]):
            end -= len(tail) - cut
    return start, max(start, end)


@functools.lru_cache(maxsize=64)
def _ends_with_special(specials):
    """A test of whether a text ends with one of `specials` (a tuple), reading only the text's last characters."""
    pattern = re.compile("(?:" + "|".join(map(re.escape, specials)) + r")\Z") if specials else re.compile(r"(?!)")
    longest = max(map(len, specials), default=0)
    return lambda text: pattern.search(text, max(0, len(text) - longest)) is not None


def _trim_after_end_token(text, start, end, specials):
    """Whitespace after a turn's final special token is never generated: not trained."""
    body = text[start:end].rstrip()
    if len(body) == end - start or not body:
        return start, end
    return (start, start + len(body)) if _ends_with_special(specials)(body) else (start, end)


def _diff(text, other):
    """(start, end) of the characters of `text` that differ from `other`, or None if they are equal."""
    if text == other:
        return None
    a = _common_prefix(text, other)
    return a, len(text) - _common_prefix(text[a:][::-1], other[a:][::-1])


def _content_probes(message):
    """Copies of an assistant message with its content, and separately its tool call names, replaced by a
    sentinel: some templates render only one of the two."""
    probes = [{**message, "content": SENTINEL}]
    if message.get("tool_calls"):
        probes.append({**message, "tool_calls": [{**c, "function": {**c["function"], "name": SENTINEL}}
                                                 for c in message["tool_calls"]]})
    return probes


def _where_content(render, text, messages, i):
    """(start, end) of the characters of `text` (render of messages) that turn i's content and tool calls
    decide, or None if the template does not render them."""
    diffs = []
    for k, probe in enumerate(_content_probes(messages[i])):
        try:
            d = _diff(text, render(messages[:i] + [probe] + messages[i + 1:]))
        except Exception:
            if k == 0:
                raise
            continue
        if d:
            diffs.append(d)
    return (min(d[0] for d in diffs), max(d[1] for d in diffs)) if diffs else None


def _map_turn(render, text, messages, i, turn, start, end, specials):
    """Turn i's trained region in `text`, when the template renders it there differently from `turn` (its
    render as the last message): the turn's content is located in both, and what surrounds it in `turn`
    (reasoning, tool calls, end tokens) is kept where `text` has it too."""
    in_text = _where_content(render, text, messages, i)
    in_turn = _where_content(render, turn, messages[:i + 1], i)
    if in_text is None or in_turn is None:
        return 0, 0  # the template does not render this turn here: nothing to train
    before, after = turn[start:in_turn[0]], turn[in_turn[1]:end]
    lead = _common_suffix(before, text[:in_text[0]])
    if not before[len(before) - lead:].strip():
        lead = 0  # only whitespace in common: the opener's own newline, not something the model writes
    trail = _snap_out_of_specials(text, in_text[1] + _common_prefix(after, text[in_text[1]:]), specials)
    rest = text[trail:]
    if trail == in_text[1] and any(after.lstrip().startswith(s) for s in specials):
        # nothing of the closing matches: the template closes the turn with another end token once more
        # messages follow (gpt-oss: <|end|> where the last turn has <|return|>); that token is the closing
        closing = next((s for s in specials if rest.lstrip().startswith(s)), None)
        trail += len(rest) - len(rest.lstrip()) + len(closing) if closing else 0
    return in_text[0] - lead, max(trail, in_text[1])


def _arguments_as_strings(messages):
    """Tool-call arguments as JSON strings, for templates that print them as they are (functionary)."""
    return [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.dumps(
        c["function"]["arguments"], ensure_ascii=False)}} if not isinstance(c["function"].get("arguments"), str)
        else c for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in messages]


def _with_template_arguments(render, messages):
    """Messages as this template renders them right, and their render. Arguments are given as a dict (what
    HF documents and most templates pass to tojson); a template that cannot render a dict (raises, or prints
    its Python repr) gets them as a JSON string instead."""
    calls = [c["function"].get("arguments") for m in messages for c in m.get("tool_calls") or []]
    dicts = [a for a in calls if isinstance(a, dict) and a]
    try:
        text = render(messages)
        if not any(repr(a) in text for a in dicts):
            return messages, text
    except Exception:
        if not dicts:
            raise
    messages = _arguments_as_strings(messages)
    return messages, render(messages)


def render_conversation(tokenizer, messages, tools=None):
    """-> (text, [(start, end) character region to train, for each assistant turn]). Raises RecordError if
    the template refuses the conversation."""
    try:
        render = ChatRenderer(tokenizer, tools)
        specials, thinking_off, same = _template_facts(tokenizer, render)
        if not same:  # this transformers renders differently from what ChatRenderer mirrors: use its own API
            render.template = None
        messages, text = _with_template_arguments(render, messages)
        regions = []
        for i in (i for i, m in enumerate(messages) if m["role"] == "assistant"):
            prompts = [render(messages[:i], True)] + ([render(messages[:i], True, **THINKING_OFF)] if thinking_off else [])
            turn = render(messages[:i + 1]) if i + 1 < len(messages) else text
            start, end = _generated_part(prompts, turn, specials, tokenizer.eos_token,
                                         lambda: _prompt_end(render, messages, i, prompts[0], turn, specials),
                                         lambda: render(messages[:i]))
            if not text.startswith(turn[:end]):
                start, end = _map_turn(render, text, messages, i, turn, start, end, specials)
            regions.append(_trim_after_end_token(text, start, end, specials))
    except Exception as e:  # jinja raise_exception, undefined fields, type errors inside the template
        raise RecordError("messages", f"the chat template refuses this conversation: {e}") from None
    return text, regions


def end_of_turn_tokens(tokenizer):
    """The special tokens the template writes to close an assistant text turn (e.g. ['<|im_end|>'],
    ['<|END_RESPONSE|>', '<|END_OF_TURN_TOKEN|>']): where generation must stop."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SENTINEL}]
    text, ((_, end),) = render_conversation(tokenizer, probe)
    closing = text[text.find(SENTINEL) + len(SENTINEL):end]
    specials = _special_tokens(tokenizer)
    found, k = [], 0
    while k < len(closing):
        s = next((s for s in specials if closing.startswith(s, k)), None)
        found += [s] if s else []
        k += len(s) if s else 1
    return found


def _labels_and_cut(ids, spans, trained, max_length, train_on_prompt):
    """Labels from each assistant turn's token span, then truncation that keeps whole turns where possible.
    ids: numpy token ids; spans: [(lo, hi)] token index range of each turn (the tokens starting in its
    character region). -> (input_ids, labels, status) as numpy arrays, status '' | 'truncated' | 'dropped:<reason>'."""
    mask = np.zeros(len(ids), dtype=bool)
    turn_ends = []
    for (lo, hi), keep in zip(spans, trained):
        if keep:
            mask[lo:hi] = True
            turn_ends.append(hi)
    if train_on_prompt:
        mask[:] = True
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


def _token_spans(offsets, regions):
    """Character regions -> token index ranges: the tokens that overlap each region (a token that starts in
    the prompt and carries the region's first character is in; so is every byte token of a split character)."""
    offsets = np.maximum.accumulate(offsets, axis=0) if len(offsets) else offsets.reshape(0, 2)
    spans = []
    for a, b in regions:
        lo = int(np.searchsorted(offsets[:, 1], a, side="right"))  # first token ending after a
        hi = int(np.searchsorted(offsets[:, 0], b, side="left"))  # first token starting at or after b
        spans.append((lo, max(lo, hi)) if b > a else (lo, lo))
    return spans


def _encode(tokenizer, texts, regions):
    """[(ids, spans)] for each text: numpy token ids exactly as tokenizer(texts, add_special_tokens=False)
    gives them, and the range of tokens overlapping each character region. When the Rust tokenizer has no
    truncation/padding set (what that call would switch off) it is called directly, and only the region
    boundaries are looked up (char_to_token gives the first token covering a character) instead of
    converting every token's offsets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        out = []
        for e, text, regs in zip(backend.encode_batch(texts, add_special_tokens=False), texts, regions):
            ids = np.asarray(e.ids, dtype=np.int64)

            def first_starting_at(c):  # index of the first token that starts at or after character c
                if c >= len(text):
                    return len(ids)
                t = e.char_to_token(c)
                while t is not None and t < len(ids) and e.token_to_chars(t)[0] < c:
                    t += 1
                return t

            spans = []
            for a, b in regs:
                lo = e.char_to_token(a) if a < len(text) else len(ids)
                spans.append((lo, lo) if b <= a else (lo, first_starting_at(b)))
            if any(x is None for span in spans for x in span):  # a character no token covers: use offsets
                spans = _token_spans(np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2), regs)
            out.append((ids, spans))
        return out
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(np.asarray(ids, dtype=np.int64), _token_spans(np.asarray(o, dtype=np.int64).reshape(-1, 2), r))
            for ids, o, r in zip(enc["input_ids"], enc["offset_mapping"], regions)]


def _tokenize_arrays(tokenizer, conversations, max_length, train_on_prompt=False, last_turn_only=False):
    """[(messages, tools)] -> [(input_ids, labels, status)] with numpy arrays; see tokenize_many."""
    empty = np.zeros(0, dtype=np.int64)
    results, texts, pending = [None] * len(conversations), [], []
    for i, (messages, tools) in enumerate(conversations):
        try:
            text, regions = render_conversation(tokenizer, messages, tools)
        except RecordError as e:
            results[i] = (empty, empty, f"error:{e}")
            continue
        trained = [is_trained(m) for m in messages if m["role"] == "assistant"]
        if last_turn_only:
            trained = [False] * (len(trained) - 1) + [trained[-1]]
        texts.append(text)
        pending.append((i, regions, trained))
    if texts:
        encoded = _encode(tokenizer, texts, [regions for _, regions, _ in pending])
        for (i, _, trained), (ids, spans) in zip(pending, encoded):
            results[i] = _labels_and_cut(ids, spans, trained, max_length, train_on_prompt)
    return results


def tokenize_many(tokenizer, conversations, max_length, train_on_prompt=False, last_turn_only=False):
    """Batch version of tokenize_conversation: [(messages, tools)] -> [dict(input_ids, labels, status)].
    Renders each conversation once and encodes all of them in one fast-tokenizer call."""
    return [{"input_ids": ids.tolist(), "labels": labels.tolist(), "status": status}
            for ids, labels, status in _tokenize_arrays(tokenizer, conversations, max_length, train_on_prompt,
                                                        last_turn_only)]


def tokenize_conversation(tokenizer, messages, max_length, tools=None, train_on_prompt=False):
    """One conversation -> {"input_ids": [...], "labels": [...]} with labels -100 where not trained.

    Labels cover what the model generates for each assistant turn (render_conversation's rule): the turn as the
    model's own chat template renders it after the generation prompt, through all of its end tokens; nothing of
    system/user/tool turns or role headers. Over max_length, whole
    turns are dropped from the end; raises ValueError if nothing trainable fits or the template refuses."""
    (result,) = tokenize_many(tokenizer, [(messages, tools)], max_length, train_on_prompt)
    if result["status"].startswith(("error:", "dropped:")):
        raise ValueError(result["status"].split(":", 1)[1])
    return {"input_ids": result["input_ids"], "labels": result["labels"]}


def marked_text(tokenizer, input_ids, labels, mark=("[[", "]]")):
    """The sample's text with every run of trained tokens between [[ and ]]. Each piece is decoded as part of
    everything before it, so separator spaces ('▁two') show where they are."""
    ids = list(input_ids)
    trained = [lab != IGNORE_INDEX for lab in labels]
    cuts = [0] + [k for k in range(1, len(ids)) if trained[k] != trained[k - 1]] + [len(ids)]
    decoded = [tokenizer.decode(ids[:k], skip_special_tokens=False) for k in cuts]
    pieces = []
    for a, b, before, upto in zip(cuts, cuts[1:], decoded, decoded[1:]):
        piece = upto[len(before):]
        pieces.append(f"{mark[0]}{piece}{mark[1]}" if trained[a] else piece)
    return "".join(pieces)


def show_masking(tokenizer, dataset, n):
    """--show_masking N: print N samples with their trained parts marked."""
    for k in range(min(n, len(dataset))):
        row = dataset[k]
        print(f"----- sample {k} ({row['length']} tokens, {row['n_trained']} trained; [[trained]]) -----")
        print(marked_text(tokenizer, row["input_ids"], row["labels"]), flush=True)
    return None


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
    if model_args.chat_template:
        with open(model_args.chat_template, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    elif not tokenizer.chat_template:
        log0("WARNING: the tokenizer has no chat template; using ChatML (<|im_start|>role ... <|im_end|>).")
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:  # padded positions are masked out of attention and loss anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Dataset: validated, tokenized, cached on disk as Arrow
# ---------------------------------------------------------------------------------------------


class DataError(ValueError):
    pass


def invalid_reason(error):
    """'messages[3].role: unknown role 'x' (expected ...)' -> 'messages[].role: unknown role 'x'': the key
    under which the report counts invalid records."""
    return re.sub(r"\[\d+\]", "[]", error.split(" (")[0])


def _count(counter, key, n=1):
    counter[key] = counter.get(key, 0) + n


def _normalized_rows(entries, data_format, skip_invalid, stats):
    """Generator for datasets.Dataset.from_generator: reads every file, validates, normalizes. Without
    --skip_invalid_records the first invalid record stops the output but not the reading: every file is
    still validated so that the error names the total count."""
    errors, n_invalid = [], 0

    def fail(last=None, stopped=False):
        lines = errors + ([last] if last else [])
        if stopped and n_invalid:
            lines.append(f"(reading stopped there: at least {n_invalid} invalid records in all)")
        elif n_invalid > len(errors):
            lines.append(f"({n_invalid} invalid records in all; the first {len(errors)} are shown)")
        raise DataError("\n".join(lines))

    for entry_idx, (_, _, files) in enumerate(entries):
        for file, source in files:
            fmt = None if data_format == "auto" else data_format
            fstats = {"records": 0, "invalid": 0, "samples": 0, "truncated": 0, "dropped": 0}
            stats["files"][file] = fstats
            try:
                for line, record in read_json_records(file):
                    fstats["records"] += 1
                    try:
                        if isinstance(record, RecordError):
                            raise record
                        if not isinstance(record, dict):
                            raise RecordError("record", f"must be a JSON object, got {type(record).__name__}")
                        fmt = fmt or detect_format(record)
                        if fmt is None:
                            near = [k for k in record if _suggest(k, list(REQUIRED_KEY.values()))]
                            raise RecordError("record", "unknown format: expected messages, conversations, "
                                              "chat_rounds or instruction/output fields"
                                              + (f"; {near[0]!r}{_suggest(near[0], list(REQUIRED_KEY.values()))}" if near else ""))
                        fstats["format"] = fmt
                        messages, tools = normalize_record(record, fmt)
                    except RecordError as e:
                        fstats["invalid"] += 1
                        n_invalid += 1
                        _count(stats["invalid"], invalid_reason(str(e)))
                        if not skip_invalid and len(errors) < 20:
                            errors.append(f"{file}:{line}: {e}")
                        continue
                    if not errors:
                        stats["rows"] += 1
                        yield {"conversation": json.dumps({"messages": messages, "tools": tools}, ensure_ascii=False),
                               "source": str(record.get("source") or source), "origin": f"{file}:{line}",
                               "entry": entry_idx}
            except DataError as e:  # the file as a whole: reading stops, so the count is a lower bound
                fail(str(e), stopped=True)
            if fstats["records"] == 0:
                fail(f"{file}: no records (an empty JSON array).", stopped=True)
    if errors:
        fail()


def _tokenize_batch(batch, tokenizer, max_length, train_on_prompt, last_turn_only, sources=None):
    """datasets.map function -> an Arrow table: the batch's other columns, then the tokens, which go to
    Arrow straight from numpy (int32 list arrays), not through per-token Python ints. `sources`
    ({name: index}) adds the source_idx column."""
    import pyarrow as pa

    convs = [json.loads(c) for c in batch["conversation"]]
    out = _tokenize_arrays(tokenizer, [(c["messages"], c["tools"]) for c in convs], max_length,
                           train_on_prompt, last_turn_only)
    lengths = np.asarray([len(ids) for ids, _, _ in out], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def tokens(arrays):
        return pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(arrays).astype(np.int32)))

    columns = {k: batch[k] for k in batch.keys() if k != "conversation"}
    columns.update({
        "input_ids": tokens([ids for ids, _, _ in out]),
        "labels": tokens([labels for _, labels, _ in out]),
        "length": lengths,
        "n_trained": np.asarray([int((labels[1:] != IGNORE_INDEX).sum()) for _, labels, _ in out], dtype=np.int64),
        "status": [status for _, _, status in out],
    })
    if sources is not None:
        columns["source_idx"] = np.asarray([sources[s] for s in batch["source"]], dtype=np.int64)
    return pa.table(columns)


def _cache_key(entries, tokenizer, data_args, training_args):
    """Every file's path, size, mtime, inode and ctime (an in-place edit that restores size and mtime
    still changes ctime; a file replaced by another one changes the inode), the ratios, the tokenizer,
    the template and every setting that changes the tokens."""
    files = []
    for path, ratio, entry_files in entries:
        for file, _ in entry_files:
            st = os.stat(file)
            files.append([os.path.abspath(file), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, ratio])
    h = hashlib.sha256(json.dumps({
        "v": CACHE_VERSION, "files": files, "format": data_args.data_format,
        "template": tokenizer.chat_template, "max_len": training_args.model_max_length,
        "specials": [tokenizer.bos_token, tokenizer.eos_token],
        "prompt": data_args.train_on_prompt, "last": data_args.train_on_last_turn_only,
        "skip": data_args.skip_invalid_records, "seed": training_args.seed,
    }, sort_keys=True).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    return h.hexdigest()[:20]


def build_dataset(spec, tokenizer, data_args, training_args, cache_root):
    """Validate + tokenize the files named by `spec` into an Arrow dataset at cache_root/<key>.
    A second run with the same files, tokenizer and settings just loads it."""
    import datasets

    entries, skipped = resolve_data_spec(spec)
    for kind, why in (("hidden", "hidden, skipped"), ("ignored", "not .jsonl/.json(.gz), ignored")):
        if skipped[kind]:
            log0(f"data: {len(skipped[kind])} {why}: {', '.join(skipped[kind][:5])}{' ...' if len(skipped[kind]) > 5 else ''}")
    path = os.path.join(cache_root, _cache_key(entries, tokenizer, data_args, training_args))
    if os.path.isfile(os.path.join(path, "report.json")):
        return path
    stats = {"files": {}, "invalid": {}, "rows": 0}
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        raw = datasets.Dataset.from_generator(
            # a tuple, not a list: datasets would shard a list and call the generator once per entry
            _normalized_rows, gen_kwargs={"entries": tuple(entries), "data_format": data_args.data_format,
                                          "skip_invalid": data_args.skip_invalid_records, "stats": stats},
            cache_dir=os.path.join(tmp, "raw"), keep_in_memory=False,
        )
    except datasets.exceptions.DatasetGenerationError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = e.__cause__ or e
        if isinstance(cause, (DataError, FileNotFoundError)):
            raise cause from None
        if type(cause).__name__ == "SchemaInferenceError":  # datasets cannot build a table from zero rows
            raise DataError(f"{spec}: no valid record in {len(stats['files'])} files, all "
                            f"{sum(f['records'] for f in stats['files'].values())} records invalid: {stats['invalid']}") from None
        raise
    finally:
        datasets.disable_progress_bars()
    sources = sorted(raw.unique("source"))
    tokenized = raw.map(
        _tokenize_batch, batched=True, batch_size=256, num_proc=data_args.preprocessing_num_workers,
        fn_kwargs={"tokenizer": tokenizer, "max_length": training_args.model_max_length,
                   "train_on_prompt": data_args.train_on_prompt,
                   "last_turn_only": data_args.train_on_last_turn_only,
                   "sources": {s: i for i, s in enumerate(sources)}},
        remove_columns=["conversation"], desc="tokenizing",
    )
    n_raw = len(raw)
    del raw  # unmap the raw Arrow file: its pages read by map would otherwise stay in this process's RSS
    status = np.asarray(tokenized["status"][:], dtype=object)
    failed = [i for i, s in enumerate(status) if s.startswith("error:")]
    if failed and not data_args.skip_invalid_records:
        shutil.rmtree(tmp, ignore_errors=True)
        origins = tokenized.select(failed[:20])["origin"]
        more = [f"({len(failed)} invalid records in all; the first 20 are shown)"] if len(failed) > 20 else []
        raise DataError("\n".join([f"{o}: {status[i][6:]}" for o, i in zip(origins, failed[:20])] + more))
    dropped, truncated = {}, 0
    for origin, s in zip(tokenized["origin"][:], status):  # per file and overall: invalid, dropped, truncated
        fstats = stats["files"][origin.rsplit(":", 1)[0]]
        if s.startswith("error:"):
            fstats["invalid"] += 1
            _count(stats["invalid"], invalid_reason(s[6:]))
        elif s.startswith("dropped:"):
            _count(fstats, "dropped")
            _count(dropped, s[8:])
        else:
            _count(fstats, "samples")
            _count(fstats, "truncated", s == "truncated")
            truncated += s == "truncated"
    keep = np.flatnonzero(np.asarray([s in ("", "truncated") for s in status]))
    if len(keep) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        hint = (f"; every prompt is longer than --model_max_length {training_args.model_max_length}: raise it"
                if "prompt_longer_than_model_max_length" in dropped else "")
        raise DataError(f"{spec}: no sample left to train on (dropped: {dropped}, invalid: {stats['invalid']}){hint}.")
    # Columns are read whole with [:] (iterating a datasets Column goes row by row: minutes at 1M rows).
    try:
        final = tokenized.select(_sample_indices(tokenized["entry"][:], keep, entries, training_args.seed))
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    per_source = dict(zip(*np.unique(final["source"][:], return_counts=True)))
    # source_idx came with the tokens; dropping columns rewrites nothing: save_to_disk is the one pass
    final = final.remove_columns(["origin", "status", "entry", "source"])
    final.save_to_disk(os.path.join(tmp, "data"))
    report = {"files": stats["files"], "records": sum(f["records"] for f in stats["files"].values()),
              "records_valid": n_raw - len(failed), "invalid": stats["invalid"], "dropped": dropped,
              "truncated": truncated, "samples_before_ratio": int(len(keep)), "samples": len(final),
              "sources": sources, "samples_per_source": {str(k): int(v) for k, v in per_source.items()},
              "skipped_files": skipped}
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    shutil.rmtree(os.path.join(tmp, "raw"), ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache that looks complete
    return path


def _sample_indices(entry_col, keep, entries, seed):
    """Per-entry sampling ratios: <1 takes a random subset, >1 repeats (whole copies + a random rest).
    An entry left with no sample is an error: a source must not vanish without a word."""
    entry_col = np.asarray(entry_col)[keep]
    rng, out = np.random.default_rng(seed), []
    for e, (path, ratio, _) in enumerate(entries):
        idx = keep[entry_col == e]
        whole, frac = int(ratio), ratio - int(ratio)
        out += [idx] * whole + [rng.permutation(idx)[: int(round(len(idx) * frac))]]
        if sum(len(i) for i in out[-whole - 1:]) == 0:
            raise DataError(f"--data_path entry {path}:{ratio:g} keeps no sample of its {len(idx)}"
                            + (f"; use a ratio of at least {1 / len(idx):.3g}" if len(idx) else
                               " (all its records are invalid or dropped)") + ".")
    return np.sort(np.concatenate(out)) if out else keep


def load_datasets(data_args, training_args, tokenizer):
    """Rank 0 validates and tokenizes (or hits the cache); every rank then loads the Arrow files.
    A data error on rank 0 is broadcast so that every rank stops with it instead of hanging."""
    import datasets

    cache_root = data_args.dataset_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "finetune")
    specs = [s for s in (data_args.data_path, data_args.eval_data_path) if s]
    paths, error = None, None
    if training_args.process_index == 0:
        try:
            paths = [build_dataset(s, tokenizer, data_args, training_args, cache_root) for s in specs]
        except Exception as e:  # any failure, or the other ranks would wait for rank 0 forever
            error = e
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
        sys.exit(2)  # rank 0 reports it: the message once, not once per rank
    if message:
        raise DataError(f"invalid data, nothing was trained:\n{message}")
    loaded = [datasets.load_from_disk(os.path.join(p, "data")) for p in paths]
    reports = []
    for p in paths:
        with open(os.path.join(p, "report.json")) as f:
            reports.append(json.load(f))
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
        batch["position_ids"] = torch.cat([batch["position_ids"], batch["position_ids"][:, -1:] + 1 + torch.arange(extra)], 1)
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


def resolve_attn_implementation(requested):
    if requested != "auto":
        return requested
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(model_args, training_args, lora_args, attn_implementation):
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
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            bias=lora_args.lora_bias, use_dora=lora_args.use_dora, task_type="CAUSAL_LM",
        )
        with peft_wrapping():
            model = get_peft_model(model, config)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing from the embeddings
    trainable, total = model.get_nb_trainable_parameters()
    log0(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model


# ---------------------------------------------------------------------------------------------
# Sequence parallelism: DeepSpeed Ulysses through the HF Trainer (--sequence_parallel_size N)
# ---------------------------------------------------------------------------------------------
# accelerate's ParallelismConfig(sp_backend="deepspeed") makes N consecutive ranks one group: DeepSpeed's
# data loader adapter gathers the group's batches, turns labels into shift_labels (before cutting, so the
# target across a shard boundary is kept) and gives each rank 1/N of every row (all per-token columns);
# the attention all-to-all gives each rank all positions for 1/N of the heads. ZeRO still partitions over
# all ranks; gradients are summed over all ranks and divided by the data-parallel size (world / N).
SP_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def setup_sequence_parallel(model_args, data_args, training_args):
    """Refuse what Ulysses cannot run (exactly) before anything is loaded; else set the Trainer's
    parallelism_config."""
    n = training_args.sequence_parallel_size
    if n < 1:
        raise ValueError(f"--sequence_parallel_size {n}: must be 1 (off) or more.")
    if n == 1:
        return
    world = (data_args.dry_run and data_args.dry_run_world_size) or int(os.environ.get("WORLD_SIZE", "1"))
    if world % n:
        raise ValueError(f"--sequence_parallel_size {n} must divide the number of processes ({world}): launch a "
                         f"multiple of {n} processes (torchrun --nproc_per_node / finetune.sh GPUS_PER_NODE, "
                         "NNODES) or lower it.")
    if not training_args.deepspeed:
        raise ValueError("--sequence_parallel_size needs DeepSpeed: add --deepspeed ds_config_zero2.json "
                         "(or ds_config_zero3.json).")
    attn = resolve_attn_implementation(model_args.attn_implementation)
    if attn not in SP_ATTENTION:
        raise ValueError(f"--sequence_parallel_size needs --attn_implementation {' or '.join(SP_ATTENTION)} "
                         f"(got {attn}): Ulysses drops the attention mask and relies on causal kernels.")
    if use_packing(data_args, attn) and not attn.startswith("flash_attention"):
        raise ValueError(f"--packing true with --sequence_parallel_size needs flash-attention: with {attn}, "
                         "Ulysses attends causally over the whole packed row, across sample boundaries. "
                         "Use --packing false (padding is exact) or --attn_implementation flash_attention_2.")
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=training_args.cache_dir,
                                        trust_remote_code=model_args.trust_remote_code).get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % n or (kv_heads % n and n % kv_heads):
        usable = [d for d in range(2, heads + 1) if heads % d == 0 and (kv_heads % d == 0 or d % kv_heads == 0)]
        raise ValueError(f"--sequence_parallel_size {n}: this model has {heads} attention heads and {kv_heads} "
                         f"key/value heads; Ulysses gives each rank heads / N of them. Use one of {usable}.")
    from accelerate import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    training_args.parallelism_config = ParallelismConfig(
        sp_backend="deepspeed", sp_size=n,
        sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length_is_variable=True, sp_attn_implementation=attn))


class SameLengthInGroup:
    """A train loader whose batches are padded to the longest of the sequence-parallel group's current
    batches. DeepSpeed's adapter all-gathers the group's batches, which gloo (CPU) accepts only when all
    have the same shape; NCCL takes different lengths, so GPUs skip this."""

    def __init__(self, loader, pad_token_id):
        self.loader, self.pad_token_id = loader, pad_token_id

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # set_epoch, dataset, ...
        return getattr(self.loader, name)

    def __iter__(self):
        from deepspeed.utils import groups

        for batch in self.loader:
            length = torch.tensor([batch["input_ids"].shape[1]])
            torch.distributed.all_reduce(length, torch.distributed.ReduceOp.MAX,
                                         group=groups._get_sequence_parallel_group())
            yield pad_batch(batch, int(length), self.pad_token_id)


class SequenceParallelLoader:
    """What the Trainer iterates: a fresh DeepSpeed adapter per epoch (one adapter would carry the last
    epoch's unfinished iterator into the next: one update lost and the next epoch's order taken from the
    wrong epoch), the set_epoch it hides, and a fast-forward for resuming mid-epoch (accelerate's
    skip_first_batches knows only DataLoaders): the skipped micro-batches are loaded and dropped."""

    def __init__(self, new_adapter, loader, skip=0):
        self.new_adapter, self.loader, self.skip, self.set_epoch = new_adapter, loader, skip, loader.set_epoch

    def __len__(self):
        return len(self.new_adapter())

    def __iter__(self):
        adapter = iter(self.new_adapter())
        for _ in range(self.skip):
            next(adapter)
        return adapter

    def skip_first_batches(self, n):
        return SequenceParallelLoader(self.new_adapter, self.loader, n)


def sequence_parallel_loader(adapt, pad_token_id, loader, model):
    """accelerate's Ulysses adapter (`adapt`) around the train loader, equal lengths first on gloo."""
    if torch.distributed.get_backend() == "gloo":
        loader = SameLengthInGroup(loader, pad_token_id)
    return SequenceParallelLoader(functools.partial(adapt, loader, model), loader)


def gradient_divisor(training_args, sp):
    """What DDP/DeepSpeed divide the gradients summed over all ranks by: the data-parallel size, world / N.
    Except DeepSpeed 0.19's ZeRO-3 reduce-scatter (on by default), which divides by the world size even under
    sequence parallelism (stage3 __avg_scatter_grads; its all-reduce path and ZeRO-1/2 divide by world / N).
    tests/test_sequence_parallel.py checks the gradient norms of both stages against one process."""
    ds = training_args.deepspeed
    if isinstance(ds, str):
        with open(ds) as f:
            ds = json.load(f)
    zero = (ds or {}).get("zero_optimization", {})
    if sp > 1 and int(zero.get("stage", 0)) == 3 and zero.get("reduce_scatter", True):
        return training_args.world_size
    return training_args.world_size // sp


def data_parallel_size(training_args, world=None):
    return (world or training_args.world_size) // training_args.sequence_parallel_size


# ---------------------------------------------------------------------------------------------
# Loss: chunked cross-entropy over trained positions
# ---------------------------------------------------------------------------------------------
# With a large vocabulary the logits are training's largest tensor (151,936 x 8 x 2,048 tokens: 10 GB
# in fp32), and most positions (prompt, padding) take no loss. So the model runs with its output head
# applied to the last position only (a forward pre-hook slices the head's input, and keeps the hidden
# states it was given); the positions whose next token is trained are gathered, and the head and the
# fp32 cross-entropy run on them chunk by chunk under activation checkpointing: one chunk's logits
# exist at a time, in the forward and when the backward recomputes them (all but the last chunk). The head is called as a
# module, so a LoRA on lm_head, Q-LoRA and DeepSpeed ZeRO-3 (which gathers the weight in the module's
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
    being [batch, seq] with target[t] what position t predicts (shifted_labels). outputs.logits holds the last position only (all of
    them on the full-logits fallback)."""

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


class FinetuneTrainer(Trainer):
    """HF Trainer with a loss that is a weighted mean over the trained tokens of the whole optimizer
    step (all micro-batches, all ranks), so batch layout, packing and gradient accumulation do not
    change what is optimised:

        loss = sum_t w_t * CE_t / sum_t w_t,   w_t = 1 (token) | 1/n_sample (sample) | 1/n_source (source)

    The per-token CE is also summed per source for the `loss_<source>` metrics: no second forward pass."""

    def __init__(self, *args, loss_balance="token", source_names=(), eval_source_names=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_balance, self.source_names = loss_balance, list(source_names) or ["data"]
        self.loss_is_scaled_for_ga = True  # compute_loss already divides by the step-wide weight
        self.token_loss = TrainedTokenLoss(self.args.loss_chunk_tokens, fused=self.args.fused_loss == "cce")
        # source_idx indexes each dataset's own sorted source list, and the eval set may have other sources
        self._names = {"train": self.source_names, "eval": list(eval_source_names or self.source_names)}
        self._source_sums = {split: torch.zeros(2, len(names), dtype=torch.float64)
                             for split, names in self._names.items()}
        self._gradient_divisor = gradient_divisor(self.args, self.get_sp_size())
        if self.get_sp_size() > 1:
            self.accelerator.deepspeed_ulysses_dl_adapter = functools.partial(
                sequence_parallel_loader, self.accelerator.deepspeed_ulysses_dl_adapter,
                getattr(self.data_collator, "pad_token_id", 0))

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
        outputs, ce = self.token_loss(model, head, inputs, target, mask)  # ce: [trained tokens]
        if weights is None:  # evaluation: a plain token mean of this batch
            weights = mask.float()
            num_items_in_batch = weights.sum()
        weights = weights.to(ce.device)[mask.to(ce.device)]
        loss = (ce * weights).sum() / torch.as_tensor(num_items_in_batch, device=ce.device).clamp(min=1e-8)
        if model.training and self.args.world_size > 1:
            loss = loss * self._gradient_divisor  # DDP/DeepSpeed sum gradients over ranks and divide by it
        with torch.no_grad():
            src = source[mask].cpu()
            sums = self._source_sums["train" if model.training else "eval"]
            sums[0] += torch.bincount(src, weights=ce.detach().double().cpu(), minlength=sums.shape[1])
            sums[1] += torch.bincount(src, minlength=sums.shape[1]).double()
        if return_outputs:
            outputs.loss = loss
            return loss, outputs
        return loss

    def _run_epoch(self, **kwargs):
        loader = kwargs.get("train_dataloader")
        if not isinstance(loader, SequenceParallelLoader):
            return super()._run_epoch(**kwargs)
        # A resumed epoch is fast-forwarded with accelerate's skip_first_batches, which rebuilds a plain
        # DataLoader: route it to the sequence-parallel loader's own, for this epoch only.
        import transformers.trainer as hf_trainer

        skip = hf_trainer.skip_first_batches
        hf_trainer.skip_first_batches = lambda dl, n: dl.skip_first_batches(n) if dl is loader else skip(dl, n)
        try:
            return super()._run_epoch(**kwargs)
        finally:
            hf_trainer.skip_first_batches = skip

    def training_step(self, *args, **kwargs):
        # What this returns is only logged, as the mean over all ranks: the N ranks of a sequence-parallel
        # group each hold a share of their replica's loss, scaled by the gradient divisor above.
        return super().training_step(*args, **kwargs) * self.args.world_size / self._gradient_divisor

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
        super().log(logs, *args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        # {prefix}_loss becomes the exact token mean over the eval set (Trainer's is a mean of
        # per-batch means, which depends on the eval batch size and disagrees with the per-source losses).
        output.metrics.update(self._source_metrics("eval", f"{prefix}_"))
        return output


class LossPlotCallback(transformers.TrainerCallback):
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


# ---------------------------------------------------------------------------------------------
# Checkpoints and saving (ZeRO-3 safe)
# ---------------------------------------------------------------------------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                "pytorch_model.bin", "adapter_model.bin")


def checkpoint_is_complete(path):
    """trainer_state.json is written last by Trainer; weights must be there, and a DeepSpeed
    checkpoint must have its `latest` tag (written after every rank saved its shards)."""
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        return False
    if not any(os.path.isfile(os.path.join(path, w)) for w in WEIGHT_FILES):
        return False
    if glob.glob(os.path.join(path, "global_step*")) and not os.path.isfile(os.path.join(path, "latest")):
        return False
    return True


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
    found = glob.glob(os.path.join(training_args.output_dir, "checkpoint-*"))
    found = sorted((p for p in found if p.rsplit("-", 1)[-1].isdigit()), key=lambda p: int(p.rsplit("-", 1)[-1]))
    complete = [p for p in found if checkpoint_is_complete(p)]
    if training_args.process_index == 0:
        for p in found:
            if p not in complete:
                log0(f"WARNING: {p} is incomplete (interrupted while saving); removing it.")
                shutil.rmtree(p, ignore_errors=True)
    return complete[-1] if complete else None


def save_model(trainer, tokenizer, output_dir):
    """Trainer.save_model gathers ZeRO-3 partitions (stage3_gather_16bit_weights_on_model_save) and
    writes on rank 0 only: a full model, or just the PEFT adapter for LoRA. We then check that no
    tensor came out empty, the classic failure of ZeRO-3 saves."""
    trainer.accelerator.unwrap_model(trainer.model).config.use_cache = True  # off for training; generation wants it
    trainer.save_model(output_dir)
    if trainer.args.should_save:
        tokenizer.save_pretrained(output_dir)
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
# Data report (--dry_run); the memory estimate and the other numbers it uses are in finetune_report.py
# ---------------------------------------------------------------------------------------------


def data_report(train, evaluation, reports, tokenizer, model_args, data_args, training_args, lora_args,
                packing):
    world = data_args.dry_run_world_size or training_args.world_size
    sp = training_args.sequence_parallel_size
    micro = training_args.per_device_train_batch_size
    global_batch = micro * data_parallel_size(training_args, world) * training_args.gradient_accumulation_steps
    stats = token_stats(train)
    lengths = np.asarray(train["length"][:])
    grouped = training_args.train_sampling_strategy == "group_by_length"
    report = {
        "train": {**reports[0], "tokens": stats,
                  "padding_share": padding_share(lengths, micro, packing, grouped, training_args.seed,
                                                 micro * training_args.gradient_accumulation_steps)},
        "batching": "packing" if packing else ("length-grouped padding" if grouped else "padding"),
        "world_size": world, "sequence_parallel_size": sp, "data_parallel_size": data_parallel_size(training_args, world),
        "global_batch_size": global_batch,
        "steps_per_epoch": math.ceil(len(train) / global_batch),  # = Trainer's ceil(ceil(N/micro/world)/accum)
    }
    first = train[0]
    report["first_sample_marked"] = marked_text(tokenizer, first["input_ids"], first["labels"])
    if evaluation is not None:
        report["eval"] = {**reports[1], "tokens": token_stats(evaluation)}
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code)
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
    t = report["train"]
    log0(f"data: {t['samples']} samples from {t['records_valid']} valid records "
         f"({sum(f['records'] for f in t['files'].values())} read in {len(t['files'])} files); "
         f"truncated {t['truncated']}, dropped {t['dropped'] or 0}, invalid {t['invalid'] or 0}")
    s = t["tokens"]
    log0(f"tokens: {s['tokens']:,} total, {s['trained_tokens']:,} trained; length mean {s['mean']} "
         f"p50 {s['p50']} p90 {s['p90']} p99 {s['p99']} max {s['max']}; padding share {t['padding_share']:.1%} "
         f"with {report['batching']}")


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
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per epoch


def write_report(report, output_dir):
    with open(os.path.join(output_dir, "data_report.json"), "w") as f:
        json.dump(report, f, indent=2)


def train(argv=None):
    model_args, data_args, training_args, lora_args = parse_args(argv)
    validate_args(model_args, data_args, training_args, lora_args)
    transformers.set_seed(training_args.seed)
    attn = resolve_attn_implementation(model_args.attn_implementation)
    packing = use_packing(data_args, attn)

    tokenizer = load_tokenizer(model_args, training_args)
    train_data, eval_data, reports = load_datasets(data_args, training_args, tokenizer)
    if data_args.show_masking:
        return show_masking(tokenizer, train_data, data_args.show_masking)
    report = data_report(train_data, eval_data, reports, tokenizer, model_args, data_args, training_args, lora_args,
                         packing)
    log_data_summary(report)
    if data_args.dry_run:
        sample = report["first_sample_marked"]
        log0("first sample, trained parts in [[...]]:\n" + (sample if len(sample) < 4000 else sample[:4000] + " ..."))
        if training_args.process_index == 0:
            os.makedirs(training_args.output_dir, exist_ok=True)
            write_report(report, training_args.output_dir)
            log0(f"dry run: report written to {training_args.output_dir}/data_report.json")
        return report

    finish_training_args(training_args, eval_data is not None)
    checkpoint = find_resume_checkpoint(training_args)
    adapt_to_world_size(checkpoint, training_args)
    sp, accumulation = training_args.sequence_parallel_size, training_args.gradient_accumulation_steps  # as resumed
    dp = training_args.world_size // sp
    topology = (f"{dp} data-parallel x {sp} sequence-parallel ({training_args.world_size} "
                "processes; each sample split across the sequence-parallel group)" if sp > 1
                else f"{training_args.world_size} processes")
    log0(f"method: {report['memory_estimate']['method']}, attention: {attn}, batching: {report['batching']}, "
         f"global batch size {training_args.per_device_train_batch_size * dp * accumulation} = "
         f"{training_args.per_device_train_batch_size} per device x {topology} x {accumulation} accumulation, "
         f"{report['steps_per_epoch']} steps per epoch")
    model = load_model(model_args, training_args, lora_args, attn)
    # rows a multiple of 8 feed GPU kernels best; sequence parallelism cuts them into sp equal shards
    multiple = math.lcm(8 if torch.cuda.is_available() else 1, sp)
    collator = (PackingCollator(flash_attention=attn == "flash_attention_2" and sp == 1,
                                pad_to_multiple_of=sp, pad_token_id=tokenizer.pad_token_id) if packing
                else PaddingCollator(tokenizer.pad_token_id, multiple if multiple > 1 else None))
    callbacks = [LossPlotCallback(), PreemptionCallback()]
    if training_args.early_stopping_patience:
        callbacks.append(transformers.EarlyStoppingCallback(training_args.early_stopping_patience))
    trainer = FinetuneTrainer(
        model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
        data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
        loss_balance=data_args.loss_balance, source_names=reports[0]["sources"],
        eval_source_names=reports[1]["sources"] if eval_data is not None else None,
    )

    if checkpoint:
        log0(f"resuming from {checkpoint}")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    save_model(trainer, tokenizer, training_args.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if eval_data is not None:
        trainer.save_metrics("eval", trainer.evaluate())
    if training_args.process_index == 0:
        write_report(report, training_args.output_dir)
    log0(f"done: model saved to {training_args.output_dir}")
    return trainer


def main():
    import warnings

    # DeepSpeed calls torch.distributed functions that torch deprecates: a warning per call, rank and step
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    try:
        train()
    except Preempted as e:
        log0(e)
        record_exit_code(PREEMPTED_EXIT_CODE)
        sys.exit(PREEMPTED_EXIT_CODE)
    except (DataError, FileNotFoundError, ValueError) as e:
        # User errors: one clear message, no traceback, non-zero exit on every rank.
        if os.environ.get("FINETUNE_TRACEBACK"):
            raise
        print(f"[finetune] error: {e}", file=sys.stderr, flush=True)
        record_exit_code(2)
        sys.exit(2)
    record_exit_code(0)


if __name__ == "__main__":
    main()
