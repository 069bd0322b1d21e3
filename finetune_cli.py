"""Command-line parsing for finetune.py: flags (HfArgumentParser over its argument dataclasses), a JSON/YAML file
of flags as the first argument, repeated --data_path flags, one-line errors for unknown flags and config keys
(with a did-you-mean), and the numeric ranges every flag must be in (FLAG_RANGES: checked before anything is
read). Interface: parse_args(dataclass_types, argv), check_ranges(*groups)."""

import json
import math
import os
import re
import sys

from finetune_console import suggest

# LLaMA-Factory's names for what this script calls otherwise (its dataset, dataset_dir, val_size, ... are the same):
# name -> (this script's flag or None, a note)
LLAMAFACTORY_FLAGS = {
    "cutoff_len": ("model_max_length", ""),
    "template": ("chat_template", " (default: the model's own template; a .jinja file or a built-in name)"),
    "lora_rank": ("lora_r", ""),
    "lora_target": ("lora_target_modules", " (LLaMA-Factory's `all` is all-linear)"),
    "stage": (None, "not needed: this script does supervised fine-tuning (stage sft); for pretraining (stage pt) "
                    "give text-format data"),
    "finetuning_type": ("use_lora", " (lora: use_lora true; full is the default; freeze is not offered)"),
    "quantization_bit": ("q_lora", " (4-bit)"),
}


def llamafactory_flags(names, where, dashes="--"):
    """One error line for LLaMA-Factory flag names that are named otherwise here, each with this script's flag."""
    found = [n for n in dict.fromkeys(names) if n in LLAMAFACTORY_FLAGS]
    hints = [f"{dashes}{n}: did you mean {dashes}{flag}?{note}" if flag else f"{dashes}{n}: {note}"
             for n, (flag, note) in ((n, LLAMAFACTORY_FLAGS[n]) for n in found)]
    if hints:
        raise ValueError(f"{where}: LLaMA-Factory's name{'s' if len(hints) > 1 else ''} " + "; ".join(hints))


def read_config_file(path, actions):
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
    llamafactory_flags([str(k) for k in config or {} if str(k) not in actions], f"config file {path}", dashes="")
    flags = []
    for key, value in (config or {}).items():
        if str(key) not in actions:
            raise ValueError(f"config file {path}: unknown key {key!r}{suggest(str(key), list(actions))}; "
                             "keys are the command-line flags without '--' (see --help)")
        if value is None:  # YAML null: the flag's default
            continue
        if isinstance(value, list) and actions[key].nargs is None:  # data_path: [a.jsonl, b/] -> "a.jsonl,b/"
            value = ",".join(str(v).replace(",", "\\,") for v in value)
        values = value if isinstance(value, list) else [value]
        flags += [f"--{key}"] + [json.dumps(v) if isinstance(v, dict) else str(v) for v in values]
    return flags


def renamed_flags(argv, actions):
    """transformers 5.x renamed --gradient_checkpointing(_kwargs) to --activation_checkpointing(_kwargs) and warns
    on the old names. The old name is the one Qwen's script, our finetune.sh and most guides use: where this
    transformers knows the new name, the old one is passed as the new one (same meaning, no warning); with an
    older transformers it stays as it is."""
    renames = {f"--{old}": f"--{new}" for old, new in (("gradient_checkpointing", "activation_checkpointing"),
               ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")) if new in actions}
    out = []
    for arg in argv:
        flag, eq, value = arg.partition("=")
        flag = "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag  # --gradient-checkpointing too
        out.append(renames[flag] + eq + value if flag in renames else arg)
    return out


def join_repeated(argv, names=("data_path", "eval_data_path", "dataset", "eval_dataset", "columns", "placeholders")):
    """A repeated --data_path (--dataset, --columns, ...) adds its entries (argparse would keep only the last one)."""
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


def parse_args(dataclass_types, argv=None):
    """argv -> one instance of each dataclass. Flags, or a JSON/YAML file as first argument whose keys are flags
    (later flags override it)."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    actions = {a.dest: a for a in parser._actions}
    known = list(actions)
    config = read_config_file(argv.pop(0), actions) if argv and argv[0].endswith((".json", ".yaml", ".yml")) else []
    argv = renamed_flags(config + join_repeated(argv), actions)  # flags after the config file override it

    def error(message):  # argparse would print usage and exit; make it one `[finetune] error:` line
        raise ValueError(f"{message} (see python finetune.py --help)")

    parser.error = error
    llamafactory_flags([a[2:].partition("=")[0] for a in argv if a.startswith("--") and
                        a[2:].partition("=")[0] not in actions], "unknown flag")
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
            raise ValueError(f"unknown flag {flag}{suggest(flag.lstrip('-'), known)} "
                             "(see python finetune.py --help)") from None
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
    ("loss_chunk_tokens", 0, None, True), ("sequence_parallel_size", 1, None, True),
]
# What a flag's number means, where the bare range would not say it.
RANGE_MEANING = {"sequence_parallel_size": "1 (off) or more",
                 "loss_chunk_tokens": "0 (automatic) or a number of tokens"}


def check_ranges(*arg_groups):
    """FLAG_RANGES over the parsed argument groups (the first one is TrainingArguments)."""
    for name, low, high, inclusive in FLAG_RANGES:
        value = next((getattr(g, name) for g in arg_groups if hasattr(g, name)), None)
        if value is None or isinstance(value, str) or (name == "num_train_epochs" and arg_groups[0].max_steps > 0):
            continue
        ok = math.isfinite(value) and (value >= low if inclusive else value > low) and (high is None or value <= high)
        if not ok:
            bound = f"{'>=' if inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            meaning = f" ({RANGE_MEANING[name]})" if name in RANGE_MEANING else ""
            raise ValueError(f"--{name} {value}: must be a finite number {bound}{meaning}.")

