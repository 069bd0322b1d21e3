"""Merge a LoRA / DoRA / Q-LoRA adapter into its base model: a standalone model you can serve anywhere.

    python merge_lora.py --base BASE --adapter OUTPUT_DIR --output MERGED [--dtype bf16|fp16|fp32]

The result is an ordinary transformers checkpoint (safetensors, sharded above --max_shard_size) plus the
tokenizer (and chat template) the adapter was trained with; its logits equal base + adapter up to the
rounding of --dtype. The merge itself is peft's `merge_and_unload`; this script adds what peft leaves to
you: choosing the dtype, refusing a quantized base, not clobbering an existing directory, copying the
tokenizer, growing the base's vocabulary as training did (when it added the template's turn tokens: the
trained rows are merged in), writing the template's turn end as an eos of config.json and
generation_config.json (generation stops there), and writing atomically.

Q-LoRA adapters are merged into the original, non-quantized base model (what you pass as --base),
never into 4-bit weights: merging into NF4 weights would round the merged result to 4 bits.
"""

import argparse
import json
import os
import shutil
import sys

from finetune_adapter import adapter_base, is_adapter, load_base_and_adapter

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def log(*args):
    print("[merge_lora]", *args, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None,
                   help="Base model directory or hub id (default: base_model_name_or_path in adapter_config.json).")
    p.add_argument("--adapter", required=True, help="Adapter directory (finetune.py --use_lora output or checkpoint).")
    p.add_argument("--output", required=True, help="Directory for the merged model.")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="Dtype of the merged weights (default: the base model's own dtype).")
    p.add_argument("--max_shard_size", default="5GB", help="Largest safetensors shard (default 5GB).")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output directory.")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow custom modelling code of the base model.")
    return p.parse_args(argv)


def check_paths(args):
    """Fail before loading anything: missing adapter, output that would destroy data."""
    if not is_adapter(args.adapter):
        raise SystemExit(f"error: {args.adapter} is not an adapter directory (no adapter_config.json). "
                         "A full fine-tune needs no merge: use its output directory directly.")
    base, adapter_config = adapter_base(args.adapter, args.base)
    out = os.path.realpath(args.output)
    for name, path in (("--adapter", args.adapter), ("--base", base)):
        if os.path.exists(path) and os.path.realpath(path) == out:
            raise SystemExit(f"error: --output must differ from {name} ({path}).")
    if os.path.isfile(args.output):
        raise SystemExit(f"error: --output {args.output} is a file.")
    if os.path.isdir(args.output) and os.listdir(args.output) and not args.overwrite:
        raise SystemExit(f"error: --output {args.output} exists and is not empty; pass --overwrite to replace it.")
    return base, adapter_config


def merge(args):
    base, adapter_config = check_paths(args)

    import torch
    from transformers import AutoConfig

    from finetune_tokens import write_stop_tokens

    config = AutoConfig.from_pretrained(base, trust_remote_code=args.trust_remote_code)
    if getattr(config, "quantization_config", None):
        raise SystemExit(f"error: the base {base} is a quantized checkpoint; merge into the original "
                         "full-precision model instead (pass it with --base).")
    if args.dtype:
        dtype = getattr(torch, DTYPES[args.dtype])
    else:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    method = "DoRA" if adapter_config.get("use_dora") else "LoRA"
    log(f"loading base {base} ({str(dtype).replace('torch.', '')}) and {method} adapter {args.adapter}")
    # tokens added in training: the base's embeddings and head grown as they were; the adapter holds the trained
    # rows, which the merge writes into them
    model, tokenizer, _ = load_base_and_adapter(args.adapter, base, dtype, args.trust_remote_code)
    # peft computes each delta (B @ A * scale, and DoRA's magnitude rescaling) in fp32 on CPU and
    # safe_merge checks the merged weights for NaN/inf before replacing them.
    model = model.merge_and_unload(safe_merge=True)
    model.config.use_cache = True  # training turns the KV cache off; generation wants it
    write_stop_tokens(model, tokenizer)  # the template's turn end: an eos of config.json and generation_config.json

    # Write next to the destination, then swap it in: an interrupted merge never leaves a half model.
    out = os.path.normpath(args.output)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=args.max_shard_size)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "merge_info.json"), "w") as f:
        json.dump({"base": base, "adapter": os.path.abspath(args.adapter), "method": method,
                   "dtype": str(dtype).replace("torch.", "")}, f, indent=1)
    if os.path.isdir(out):
        shutil.rmtree(out)  # only reached when empty or --overwrite (checked before loading)
    os.replace(tmp, out)
    log(f"merged model saved to {out}")
    return out


def main(argv=None):
    args = parse_args(argv)
    from finetune_console import quiet_known_notices

    quiet_known_notices()  # first: the library notices finetune.py drops too (bitsandbytes on CPU, DeepSpeed's no-GPU)
    import transformers

    transformers.logging.disable_progress_bar()  # the "[merge_lora]" lines say what happens
    merge(args)


if __name__ == "__main__":
    main()
