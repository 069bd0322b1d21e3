"""Supervised fine-tuning (SFT) of chat LLMs: full, LoRA, Q-LoRA and DoRA, on one device or many.

    python finetune.py --model_name_or_path MODEL --data_path data.jsonl --output_dir out
    torchrun --nproc_per_node 8 finetune.py ... --deepspeed ds_config_zero3.json
    python finetune.py config.yaml [--any_flag value]         # flags from a JSON/YAML file

Data flow: files -> format adapters (every format becomes `messages` + `tools`) -> validation
(`file:line: field: problem`) -> `tokenize_conversation` (input_ids + labels, loss only on what the
assistant says) -> a cached Arrow dataset -> batching (length-grouped padding or padding-free
packing) -> Trainer (step-wide token-normalised loss, per-source metrics) -> save -> merge/chat.
"""

import dataclasses
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
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, Trainer

IGNORE_INDEX = -100
CACHE_VERSION = "2"  # bump when tokenization output changes, to invalidate old caches
LORA_DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"

# Used when a tokenizer has no chat template: Qwen's ChatML, tool-aware enough for plain chats.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def log0(*args):
    """Print once, on global rank 0 (torchrun sets RANK; a single process has none)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print("[finetune]", *args, flush=True)


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
        metadata={"help": "Training data: files (.jsonl/.json, optionally .gz) or folders, comma-separated. "
                  "A folder means all data files below it; append :RATIO to sample an entry "
                  "(e.g. a.jsonl:0.5,b/:2)."},
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
    dry_run_world_size: Optional[int] = field(
        default=None, metadata={"help": "World size assumed by --dry_run's estimates (default: this launch's)."}
    )


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where downloaded models are cached."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (any transformers OptimizerNames)."})
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
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default=LORA_DEFAULT_TARGETS, metadata={"help": "Comma-separated module names, or all-linear."}
    )
    lora_weight_path: str = field(default="", metadata={"help": "Start from this existing adapter directory."})
    lora_bias: str = field(
        default="none", metadata={"help": "none | all | lora_only.", "choices": ["none", "all", "lora_only"]}
    )
    q_lora: bool = field(default=False, metadata={"help": "Q-LoRA: 4-bit NF4 base model + LoRA (implies use_lora)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})


def parse_args(argv=None):
    """Flags, or a JSON/YAML file as first argument whose keys are flags (later flags override it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".json", ".yaml", ".yml")):
        path = argv.pop(0)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist")
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                config = json.load(f)
            else:
                import yaml

                config = yaml.safe_load(f)
        flags = []
        for key, value in (config or {}).items():
            values = value if isinstance(value, list) else [value]
            flags += [f"--{key}"] + [json.dumps(v) if isinstance(v, dict) else str(v) for v in values]
        argv = flags + argv
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, LoraArguments))
    return parser.parse_args_into_dataclasses(args=argv)


def validate_args(model_args, data_args, training_args, lora_args):
    """Fail fast, before any model, process group or output directory is touched."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a model directory or hub id).")
    if not data_args.data_path:
        raise ValueError("--data_path is required (a .jsonl/.json file, a folder, or a comma-separated list).")
    for spec in (data_args.data_path, data_args.eval_data_path):
        if spec:
            parse_data_spec(spec)  # raises FileNotFoundError naming the missing entry
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
    if training_args.model_max_length < 16:
        raise ValueError("--model_max_length must be at least 16 tokens.")
    if data_args.train_on_prompt and data_args.train_on_last_turn_only:
        raise ValueError("--train_on_prompt and --train_on_last_turn_only exclude each other; pick one.")
    if training_args.early_stopping_patience and not data_args.eval_data_path:
        raise ValueError("--early_stopping_patience needs --eval_data_path (it watches eval_loss).")


def zero_stage(training_args):
    ds = training_args.deepspeed
    if not ds:
        return 0
    if isinstance(ds, str):
        if not os.path.isfile(ds):
            raise FileNotFoundError(f"--deepspeed {ds} does not exist.")
        with open(ds) as f:
            ds = json.load(f)
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# ---------------------------------------------------------------------------------------------
# Chat data: files, formats, validation
# ---------------------------------------------------------------------------------------------

DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT (`from`) and MFTCoder (`role`) speaker names -> our roles.
SPEAKER_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "bot": "assistant",
    "assistant": "assistant", "model": "assistant", "function_call": "assistant", "observation": "tool",
    "function": "tool", "tool": "tool",
}


class RecordError(ValueError):
    """A problem with one record: `field` names where (e.g. messages[2].content)."""

    def __init__(self, field_name, problem):
        super().__init__(f"{field_name}: {problem}")
        self.field_name, self.problem = field_name, problem


def parse_data_spec(spec):
    """'a.jsonl:0.5,dir/' -> [(path, ratio)], checking every path exists."""
    entries = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        path, ratio = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head:
            try:
                path, ratio = head, float(tail)
            except ValueError:
                pass
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data_path: {path} does not exist.")
        if ratio <= 0:
            raise ValueError(f"--data_path: ratio for {path} must be > 0, got {ratio}.")
        entries.append((path, ratio))
    if not entries:
        raise ValueError(f"--data_path '{spec}' names no file.")
    return entries


def list_data_files(path):
    """A file -> [(file, source)]; a folder -> its data files, source = top sub-folder (one per task) or itself."""
    if os.path.isfile(path):
        name = os.path.basename(path)
        for suffix in DATA_SUFFIXES:
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        return [(path, name)]
    root = os.path.normpath(path)
    files = []
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            if name.endswith(DATA_SUFFIXES):
                rel = os.path.relpath(dirpath, root)
                source = os.path.basename(root) if rel == "." else rel.split(os.sep)[0]
                files.append((os.path.join(dirpath, name), source))
    if not files:
        raise FileNotFoundError(f"--data_path: folder {path} has no {'/'.join(DATA_SUFFIXES)} files.")
    return files


def read_json_records(path):
    """Yield (line, record-or-RecordError) from a JSONL file or a JSON array (BOM, CRLF, blank lines ok).
    JSONL is streamed line by line; line numbers count '\\n' like editors do."""
    bom = b"\xef\xbb\xbf"
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        head = b""
        while not head.strip():  # peek past leading whitespace: '[' means a JSON array
            chunk = f.read(65536)
            if not chunk:
                break
            head += chunk
        f.seek(0)
        if head.removeprefix(bom).lstrip()[:1] != b"[":
            for line_no, raw in enumerate(f, 1):
                raw = raw.removeprefix(bom)
                if raw.strip():
                    try:
                        yield line_no, json.loads(raw.decode("utf-8"))
                    except UnicodeDecodeError:
                        yield line_no, RecordError("json", "not valid UTF-8")
                    except json.JSONDecodeError as e:
                        yield line_no, RecordError("json", f"invalid JSON ({e.msg} at column {e.colno})")
            return
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield data.count(b"\n", 0, e.start) + 1, RecordError("json", "not valid UTF-8")
        return
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    line = text.count("\n", 0, pos) + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            line += text[pos] == "\n"
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield e.lineno, RecordError("json", f"invalid JSON ({e.msg} at column {e.colno}); "
                                        "the rest of this array is unreadable")
            return
        yield line, record
        line += text.count("\n", pos, end)
        pos = end


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
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("tools", "must be a list of function schemas")
    return [t if "function" in t else {"type": "function", "function": t} for t in tools]


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
            except json.JSONDecodeError:
                pass
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
    for key in ("name", "tool_call_id", "reasoning_content", "train", "loss_weight"):
        if key in (item or {}):
            msg[key] = item[key]
    if not isinstance(msg.get("train", True), bool):
        raise RecordError(f"{prefix}.train", "must be true or false")
    weight = msg.get("loss_weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
        raise RecordError(f"{prefix}.loss_weight", "must be a number >= 0")
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
REQUIRED_KEY = {"messages": "messages", "sharegpt": "conversations", "chat_rounds": "chat_rounds",
                "alpaca": "instruction"}


def normalize_record(record, fmt):
    """Any supported record -> (messages, tools), or RecordError naming the field and the problem."""
    if not isinstance(record, dict):
        raise RecordError("record", f"must be a JSON object, got {type(record).__name__}")
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
# The conversation is rendered once by the model's own template and tokenized once, so input_ids
# are exactly what `apply_chat_template` gives. Trained character regions are then mapped to tokens
# through the tokenizer's offsets. A region is what the model would have to generate for that turn:
# from the end of the assistant header (the part the generation prompt already supplies) to the end
# of the template's end-of-turn marker (<|im_end|>, <|eot_id|>, </s>...), tool calls included.
#
# Fast path (one render): find every header, take the text up to the next end-of-turn marker, and
# check that the turn's content really is there. Templates that move or rewrite text (system prompt
# in the last user turn, reasoning stripped from earlier turns, tool calls without content) fail that
# check and take the exact path: render again with this turn's content replaced by a sentinel; the
# characters that differ are where the template put it.

SENTINEL = "\ue000\ue001"  # private-use characters: never in real text, never stripped by a template
_PROBES = {}


def _render(tokenizer, messages, tools=None, add_generation_prompt=False):
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _common_prefix(a, b):
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # binary search on slice equality: C-speed comparisons
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _token_prefix(a, b, specials):
    """Common prefix length of a and b that does not end inside a special token ('<|' is shared by
    '<|im_end|>' and '<|assistant|>', but is no boundary)."""
    k = _common_prefix(a, b)
    for text in (a, b):
        for s in specials:
            p = text.find(s, max(0, k - len(s) + 1))
            if 0 <= p < k < p + len(s):
                k = p
    return k


def _special_tokens(tokenizer):
    specials = set(tokenizer.all_special_tokens)
    specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted((s for s in specials if s), key=len, reverse=True)


def template_markers(tokenizer):
    """(header, end_of_turn) strings of this tokenizer's template, found by rendering a probe chat.

    header: the assistant turn opener that the generation prompt supplies (e.g. '<|im_start|>assistant\\n'),
    or, for templates without a generation prompt, the special token closing the prompt (Mistral's '[/INST]');
    end_of_turn: what closes an assistant turn up to and including its special token (e.g. '<|im_end|>').
    Either is '' when the template has none we can trust; then every conversation takes the exact path."""
    specials = _special_tokens(tokenizer)
    key = (tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token, tuple(specials))
    if key in _PROBES:
        return _PROBES[key]
    header = end = ""
    user = [{"role": "user", "content": "Hi"}]
    dummy_tool = [{"type": "function", "function": {"name": "probe", "description": "probe",
                                                     "parameters": {"type": "object", "properties": {}}}}]
    full = ""
    for tools in (None, dummy_tool):  # some templates (Hermes tool use) render only with tools
        try:
            plain = _render(tokenizer, user, tools)
            prompt = _render(tokenizer, user, tools, add_generation_prompt=True)
            full = _render(tokenizer, user + [{"role": "assistant", "content": SENTINEL}], tools)
            break
        except Exception:
            continue
    at = full.find(SENTINEL)
    if at >= 0:
        gen_suffix = prompt[_token_prefix(prompt, plain, specials):]
        opener = full[_token_prefix(full[:at], plain, specials):at]
        header = opener[: _token_prefix(opener, gen_suffix, specials)]
        if not gen_suffix.strip():  # the model writes right after the prompt: its last special token opens the turn
            header = full[max((full.rfind(s, 0, at) for s in specials), default=at):at]
        if not any(s in header for s in specials) or "Hi" in header:
            header = ""
        after = full[at + len(SENTINEL):]
        hits = [(after.find(s), s) for s in specials if s in after]
        if hits:
            pos, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
            if not after[:pos].strip():
                end = after[: pos + len(tok)]
    _PROBES[key] = (header, end)
    return header, end


def _regions_fast(text, messages, header, end):
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not header or not end or text.count(header) != len(assistants):
        return None
    regions, cursor = [], 0
    for m in assistants:
        start = text.find(header, cursor) + len(header)
        stop = text.find(end, start)
        nxt = text.find(header, start)
        if stop < 0 or (0 <= nxt < stop):
            return None
        body, content = text[start:stop], m.get("content") or ""
        if content.strip() and content.strip() not in body:
            return None
        if m.get("tool_calls") and not any(c["function"]["name"] in body for c in m["tool_calls"]):
            return None
        regions.append((start, stop + len(end)))
        cursor = stop + len(end)
    return regions


def _diff(text, other):
    """(start, end) of the characters of `text` that differ from `other`, or None if they are equal."""
    if text == other:
        return None
    a = _common_prefix(text, other)
    return a, len(text) - _common_prefix(text[a:][::-1], other[a:][::-1])


def _regions_exact(tokenizer, text, messages, tools, header, end):
    regions, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # Probe the content and, separately, the tool calls: some templates render only one of them.
        probes = [{**m, "content": SENTINEL}]
        if m.get("tool_calls"):
            probes.append({**m, "tool_calls": [{**c, "function": {**c["function"], "name": SENTINEL}}
                                               for c in m["tool_calls"]]})
        diffs = []
        for k, probe in enumerate(probes):
            try:
                diffs.append(_diff(text, _render(tokenizer, messages[:i] + [probe] + messages[i + 1:], tools)))
            except Exception:
                if k == 0:
                    raise
        diffs = [d for d in diffs if d and d[1] > d[0]] or [d for d in diffs if d]
        if not diffs:  # the template does not render this turn at all: nothing to train
            regions.append((0, 0))
            continue
        start, stop = min(d[0] for d in diffs), max(d[1] for d in diffs)
        h = text.rfind(header, cursor, start) if header else -1
        if h >= 0:  # include what the template writes between the header and the content (e.g. <think></think>)
            start = h + len(header)
        e = text.find(end, stop) if end else -1
        nxt = text.find(header, stop) if header else -1
        if e >= 0 and not (0 <= nxt < e):
            stop = e + len(end)
        regions.append((start, stop))
        cursor = max(cursor, stop)
    return regions


def render_conversation(tokenizer, messages, tools=None, markers=None):
    """-> (text, [(start, end) character region of each assistant turn]). Raises ValueError if the
    template refuses the conversation. `markers`: template_markers(tokenizer), when the caller has them."""
    try:
        text = _render(tokenizer, messages, tools)
        header, end = markers or template_markers(tokenizer)
        regions = _regions_fast(text, messages, header, end)
        if regions is None:
            regions = _regions_exact(tokenizer, text, messages, tools, header, end)
    except Exception as e:  # jinja raise_exception, undefined fields, type errors inside the template
        raise RecordError("messages", f"the chat template refuses this conversation: {e}") from None
    return text, regions


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


def _token_spans(starts, regions):
    """Character regions -> token index ranges, from the first character of every token."""
    starts = np.maximum.accumulate(starts) if len(starts) else starts  # byte-split characters share a start
    return [tuple(int(x) for x in np.searchsorted(starts, (a, b))) for a, b in regions]


def _encode(tokenizer, texts, regions):
    """[(ids, spans)] for each text: numpy token ids exactly as tokenizer(texts, add_special_tokens=False)
    gives them, and the token range of each character region. When the Rust tokenizer has no
    truncation/padding set (what that call would switch off) it is called directly, and only the region
    boundaries are looked up (char_to_token) instead of converting every token's offsets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and backend.truncation is None and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))):
        out = []
        for e, text, regs in zip(backend.encode_batch(texts, add_special_tokens=False), texts, regions):
            ids = np.asarray(e.ids, dtype=np.int64)

            def first_token(c):  # index of the first token that starts at or after character c
                if c >= len(text):
                    return len(ids)
                t = e.char_to_token(c)
                return None if t is None else t if e.token_to_chars(t)[0] >= c else t + 1

            spans = [(first_token(a), first_token(b)) for a, b in regs]
            if any(x is None for span in spans for x in span):  # a character no token covers: use offsets
                spans = _token_spans(np.asarray([o[0] for o in e.offsets], dtype=np.int64), regs)
            out.append((ids, spans))
        return out
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(np.asarray(ids, dtype=np.int64), _token_spans(np.asarray(o, dtype=np.int64).reshape(-1, 2)[:, 0], r))
            for ids, o, r in zip(enc["input_ids"], enc["offset_mapping"], regions)]


def _tokenize_arrays(tokenizer, conversations, max_length, train_on_prompt=False, last_turn_only=False):
    """[(messages, tools)] -> [(input_ids, labels, status)] with numpy arrays; see tokenize_many."""
    empty = np.zeros(0, dtype=np.int64)
    results, texts, pending = [None] * len(conversations), [], []
    try:
        markers = template_markers(tokenizer)  # once per batch; render_conversation reports any failure
    except Exception:
        markers = None
    for i, (messages, tools) in enumerate(conversations):
        try:
            text, regions = render_conversation(tokenizer, messages, tools, markers)
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

    Labels cover each assistant turn as the model's own chat template renders it plus the template's
    end-of-turn marker; nothing of system/user/tool turns or role headers. Over max_length, whole
    turns are dropped from the end; raises ValueError if nothing trainable fits or the template refuses."""
    (result,) = tokenize_many(tokenizer, [(messages, tools)], max_length, train_on_prompt)
    if result["status"].startswith(("error:", "dropped:")):
        raise ValueError(result["status"].split(":", 1)[1])
    return {"input_ids": result["input_ids"], "labels": result["labels"]}


def load_tokenizer(model_args, training_args):
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, cache_dir=training_args.cache_dir,
        trust_remote_code=model_args.trust_remote_code, model_max_length=training_args.model_max_length,
    )
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
    """Generator for datasets.Dataset.from_generator: reads every file, validates, normalizes."""
    errors = []
    for entry_idx, (path, _) in enumerate(entries):
        for file, source in list_data_files(path):
            fmt = None if data_format == "auto" else data_format
            fstats = {"records": 0, "invalid": 0, "samples": 0, "truncated": 0, "dropped": 0}
            stats["files"][file] = fstats
            for line, record in read_json_records(file):
                fstats["records"] += 1
                try:
                    if isinstance(record, RecordError):
                        raise record
                    fmt = fmt or detect_format(record)
                    if fmt is None:
                        raise RecordError("record", "unknown format: expected messages, conversations, "
                                          "chat_rounds or instruction/output fields")
                    fstats["format"] = fmt
                    messages, tools = normalize_record(record, fmt)
                except RecordError as e:
                    fstats["invalid"] += 1
                    _count(stats["invalid"], invalid_reason(str(e)))
                    if not skip_invalid:
                        errors.append(f"{file}:{line}: {e}")
                        if len(errors) >= 20:
                            raise DataError("\n".join(errors + ["(stopping after 20 errors)"]))
                    continue
                yield {"conversation": json.dumps({"messages": messages, "tools": tools}, ensure_ascii=False),
                       "source": str(record.get("source") or source), "origin": f"{file}:{line}",
                       "entry": entry_idx}
    if errors:
        raise DataError("\n".join(errors))


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


def _cache_key(spec, tokenizer, data_args, training_args):
    files = []
    for path, ratio in parse_data_spec(spec):
        for file, _ in list_data_files(path):
            st = os.stat(file)
            files.append([os.path.abspath(file), st.st_size, st.st_mtime_ns, ratio])
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

    path = os.path.join(cache_root, _cache_key(spec, tokenizer, data_args, training_args))
    if os.path.isfile(os.path.join(path, "report.json")):
        return path
    entries = parse_data_spec(spec)
    stats = {"files": {}, "invalid": {}}
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
        raise (cause if isinstance(cause, (DataError, FileNotFoundError)) else DataError(str(cause))) from None
    finally:
        datasets.disable_progress_bars()
    if len(raw) == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{spec}: no usable records (invalid: {stats['invalid']}).")
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
        raise DataError("\n".join(f"{o}: {status[i][6:]}" for o, i in zip(origins, failed[:20])))
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
        raise DataError(f"{spec}: no sample left to train on (dropped: {dropped}, invalid: {stats['invalid']}).")
    # Columns are read whole with [:] (iterating a datasets Column goes row by row: minutes at 1M rows).
    final = tokenized.select(_sample_indices(tokenized["entry"][:], keep, entries, training_args.seed))
    per_source = dict(zip(*np.unique(final["source"][:], return_counts=True)))
    # source_idx came with the tokens; dropping columns rewrites nothing: save_to_disk is the one pass
    final = final.remove_columns(["origin", "status", "entry", "source"])
    final.save_to_disk(os.path.join(tmp, "data"))
    report = {"files": stats["files"], "records": sum(f["records"] for f in stats["files"].values()),
              "records_valid": n_raw - len(failed), "invalid": stats["invalid"], "dropped": dropped,
              "truncated": truncated, "samples_before_ratio": int(len(keep)), "samples": len(final),
              "sources": sources, "samples_per_source": {str(k): int(v) for k, v in per_source.items()}}
    with open(os.path.join(tmp, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    shutil.rmtree(os.path.join(tmp, "raw"), ignore_errors=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written cache that looks complete
    return path


def _sample_indices(entry_col, keep, entries, seed):
    """Per-entry sampling ratios: <1 takes a random subset, >1 repeats (whole copies + a random rest)."""
    entry_col = np.asarray(entry_col)[keep]
    rng, out = np.random.default_rng(seed), []
    for e, (_, ratio) in enumerate(entries):
        idx = keep[entry_col == e]
        whole, frac = int(ratio), ratio - int(ratio)
        out += [idx] * whole + [rng.permutation(idx)[: int(round(len(idx) * frac))]]
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


@dataclass
class PaddingCollator:
    """Pad to the longest sample of the batch (never to model_max_length)."""

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
        sample = torch.full((n, longest), -1, dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k], labels[i, :k], attn[i, :k] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
            sample[i, :k] = i
        source = torch.tensor([f.get("source_idx", 0) for f in features])[:, None].expand(n, longest)
        return {"input_ids": ids, "attention_mask": attn, "labels": labels,
                "token_sample": sample, "token_source": torch.where(sample >= 0, source, -1)}


@dataclass
class PackingCollator:
    """Padding-free packing: one row of concatenated samples, position_ids restarting at 0 per sample
    and no attention_mask, so attention stays within each sample (varlen flash-attention on GPU, a
    block-diagonal mask on sdpa/eager). The first label of every sample is masked, so no position is
    ever trained to predict across a boundary."""

    flash_attention: bool = False

    def __call__(self, features):
        flatten = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=self.flash_attention)
        batch = flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        batch["token_sample"] = torch.cat([torch.full((len(f["input_ids"]),), i) for i, f in enumerate(features)])[None]
        batch["token_source"] = torch.cat(
            [torch.full((len(f["input_ids"]),), f.get("source_idx", 0)) for f in features])[None]
        return batch


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
        model = PeftModel.from_pretrained(model, lora_args.lora_weight_path, is_trainable=True)
    else:
        targets = lora_args.lora_target_modules
        model = get_peft_model(model, LoraConfig(
            r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
            target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
            bias=lora_args.lora_bias, use_dora=lora_args.use_dora, task_type="CAUSAL_LM",
        ))
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed LoRA needs grads flowing from the embeddings
    trainable, total = model.get_nb_trainable_parameters()
    log0(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model


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

LOSS_CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk


def loss_chunk_tokens(vocab_size, requested=0):
    return requested or max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))


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
    being the shifted labels' [batch, seq - 1]. outputs.logits holds the last position only (all of
    them on the full-logits fallback)."""

    def __init__(self, chunk_tokens=0, fused=False):
        self.chunk_tokens, self.fused, self.chunked = chunk_tokens, fused, None  # chunked: decided on 1st batch

    def __call__(self, model, head, inputs, target, mask):
        if self.chunked is False:
            outputs = model(**inputs, use_cache=False)
            logits = outputs.logits[:, :-1][mask]
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
            self.chunked = (hidden is not None and hidden.shape[:2] == (mask.shape[0], mask.shape[1] + 1)
                            and torch.equal(logits.to(outputs.logits.dtype), outputs.logits))
            if not self.chunked:
                return self._fall_back(model, head, inputs, target, mask)
        hidden = seen["hidden"][:, :-1][mask]
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

    def _all_reduce(self, tensor):
        if self.args.world_size > 1:
            dev = tensor.device
            tensor = self.accelerator.reduce(tensor.to(self.args.device), reduction="sum").to(dev)
        return tensor

    def _token_weights(self, batches):
        """Per-token loss weights for every micro-batch of one step, and their global sum."""
        masks = [b["labels"][:, 1:] != IGNORE_INDEX for b in batches]
        if self.loss_balance == "source":
            counts = torch.zeros(len(self.source_names), dtype=torch.float64)
            for b, m in zip(batches, masks):
                counts += torch.bincount(b["token_source"][:, 1:][m].cpu(), minlength=len(counts)).double()
            counts = self._all_reduce(counts)
        weights = []
        for b, m in zip(batches, masks):
            if self.loss_balance == "token":
                w = m.double()
            elif self.loss_balance == "sample":
                sample = b["token_sample"][:, 1:]
                row_offset = torch.arange(sample.shape[0])[:, None] * (int(sample.max()) + 1)
                key = torch.where(m, sample + row_offset, 0)
                per_sample = torch.bincount(key[m].flatten(), minlength=int(key.max()) + 1).double()
                w = torch.where(m, 1.0 / per_sample.clamp(min=1)[key], 0.0)
            else:
                src = b["token_source"][:, 1:].clamp(min=0)
                w = torch.where(m, 1.0 / counts.clamp(min=1)[src], 0.0)
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
        labels, source = inputs.pop("labels"), inputs.pop("token_source")
        inputs.pop("token_sample", None)
        weights = inputs.pop("loss_weights", None)
        target = labels[:, 1:]
        mask = target != IGNORE_INDEX
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        outputs, ce = self.token_loss(model, head, inputs, target, mask)  # ce: [trained tokens]
        if weights is None:  # evaluation: a plain token mean of this batch
            weights = mask.float()
            num_items_in_batch = weights.sum()
        weights = weights.to(ce.device)[mask.to(ce.device)]
        loss = (ce * weights).sum() / torch.as_tensor(num_items_in_batch, device=ce.device).clamp(min=1e-8)
        if model.training and self.args.world_size > 1:
            loss = loss * self.args.world_size  # DDP/DeepSpeed average gradients over ranks
        with torch.no_grad():
            src = source[:, 1:][mask].cpu()
            sums = self._source_sums["train" if model.training else "eval"]
            sums[0] += torch.bincount(src, weights=ce.detach().double().cpu(), minlength=sums.shape[1])
            sums[1] += torch.bincount(src, minlength=sums.shape[1]).double()
        if return_outputs:
            outputs.loss = loss
            return loss, outputs
        return loss

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
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, label="train loss")
        ax.plot(steps, smooth(losses), color="tab:blue", label="train loss (smoothed)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="eval loss")
    ax.set_title(f"{os.path.basename(os.path.normpath(output_dir))}: loss per step")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    os.makedirs(output_dir, exist_ok=True)
    fig.savefig(os.path.join(output_dir, "training_loss.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)


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
# Data report (--dry_run) and memory estimate
# ---------------------------------------------------------------------------------------------


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
    """(all parameters, parameters in Linear layers except lm_head, sum of in+out features of those layers),
    counted on a meta-device model: no memory, no weights read."""
    key = config.to_json_string()
    if key not in _PARAM_COUNTS:
        # set_zero3_state: no deepspeed.zero.Init (it would partition, and check batch sizes) under ZeRO-3
        with torch.device("meta"), transformers.modeling_utils.set_zero3_state():
            model = AutoModelForCausalLM.from_config(config)
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
        _PARAM_COUNTS[key] = (sum(p.numel() for p in model.parameters()), sum(m.weight.numel() for m in linears),
                              sum(m.in_features + m.out_features for m in linears))
    return _PARAM_COUNTS[key]


def estimate_memory_gb(config, method, stage, world, micro_tokens, dtype_bytes, lora_r, grad_ckpt, loss_chunk=0):
    """Peak memory per device in GiB for method full | lora | q-lora under ZeRO `stage` (0 = none) on
    `world` devices, for a micro-batch of `micro_tokens` tokens. Formula (README, "Memory estimate"):
    1.1 x (weights + gradients + optimizer states + activations + logits of one loss chunk), ZeRO
    dividing what it partitions; `loss_chunk` is --loss_chunk_tokens (0: automatic)."""
    params, linear, lora_dims = _param_counts(config)
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
    acts = micro_tokens * per_token
    # The loss holds one chunk's logits at a time: their values, fp32 copy and gradient
    chunk = min(micro_tokens, loss_chunk_tokens(config.vocab_size, loss_chunk))
    logits = chunk * config.vocab_size * (dtype_bytes + 8)
    gib = 1024 ** 3
    parts = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts, "logits": logits}
    return {"params": params, "trainable_params": trainable,
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


def data_report(train, evaluation, reports, model_args, data_args, training_args, lora_args, packing):
    world = data_args.dry_run_world_size or training_args.world_size
    micro = training_args.per_device_train_batch_size
    global_batch = micro * world * training_args.gradient_accumulation_steps
    stats = token_stats(train)
    lengths = np.asarray(train["length"][:])
    grouped = training_args.train_sampling_strategy == "group_by_length"
    report = {
        "train": {**reports[0], "tokens": stats,
                  "padding_share": padding_share(lengths, micro, packing, grouped, training_args.seed,
                                                 micro * training_args.gradient_accumulation_steps)},
        "batching": "packing" if packing else ("length-grouped padding" if grouped else "padding"),
        "world_size": world, "global_batch_size": global_batch,
        "steps_per_epoch": math.ceil(len(train) / global_batch),  # = Trainer's ceil(ceil(N/micro/world)/accum)
    }
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
                                 grad_ckpt=training_args.gradient_checkpointing,
                                 loss_chunk=training_args.loss_chunk_tokens)
    report["memory_estimate"] = {
        "method": method, "zero_stage": stage, "world_size": world, "per_device_micro_batch_tokens": micro_tokens,
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
    report = data_report(train_data, eval_data, reports, model_args, data_args, training_args, lora_args, packing)
    log_data_summary(report)
    if data_args.dry_run:
        if training_args.process_index == 0:
            os.makedirs(training_args.output_dir, exist_ok=True)
            write_report(report, training_args.output_dir)
            log0(f"dry run: report written to {training_args.output_dir}/data_report.json")
        return report

    finish_training_args(training_args, eval_data is not None)
    log0(f"method: {report['memory_estimate']['method']}, attention: {attn}, batching: {report['batching']}, "
         f"global batch size {report['global_batch_size']} = {training_args.per_device_train_batch_size} per device "
         f"x {training_args.world_size} processes x {training_args.gradient_accumulation_steps} accumulation")
    model = load_model(model_args, training_args, lora_args, attn)
    collator = (PackingCollator(flash_attention=attn == "flash_attention_2") if packing
                else PaddingCollator(tokenizer.pad_token_id, 8 if torch.cuda.is_available() else None))
    callbacks = [LossPlotCallback()]
    if training_args.early_stopping_patience:
        callbacks.append(transformers.EarlyStoppingCallback(training_args.early_stopping_patience))
    trainer = FinetuneTrainer(
        model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data,
        data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
        loss_balance=data_args.loss_balance, source_names=reports[0]["sources"],
        eval_source_names=reports[1]["sources"] if eval_data is not None else None,
    )

    checkpoint = find_resume_checkpoint(training_args)
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
    except (DataError, FileNotFoundError, ValueError) as e:
        # User errors: one clear message, no traceback, non-zero exit on every rank.
        if os.environ.get("FINETUNE_TRACEBACK"):
            raise
        print(f"[finetune] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
