"""A LoRA/DoRA/Q-LoRA adapter folder outside training: load_base_and_adapter, the one way chat.py, merge_lora.py (and
any other tool) put an adapter back on its base model as training left it; adapter_base names that base; and
peft_wrapping, the context every peft wrapping of a model runs in (finetune.py's too).

    from finetune_adapter import load_base_and_adapter
    model, tokenizer, base = load_base_and_adapter("output_dir", dtype=torch.bfloat16)   # a peft PeftModel
"""

import contextlib
import json
import os

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(folder):
    return os.path.isfile(os.path.join(folder, ADAPTER_CONFIG))


def adapter_base(adapter_dir, base=None):
    """-> (the base model, adapter_config.json as a dict): `base` if given, else the config's
    base_model_name_or_path. Neither -> SystemExit with the fix (the tools' one-line error)."""
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise SystemExit(f"error: {ADAPTER_CONFIG} names no base model; pass --base.")
    return base, config


@contextlib.contextmanager
def peft_wrapping():
    """While peft wraps a model: peft (0.21) reads the model's `is_gradient_checkpointing`, which transformers 5
    deprecates with a FutureWarning on every LoRA run, naming nothing the user can change. Only that warning is
    dropped, and only here (finetune.py, chat.py, merge_lora.py)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_tokenizer(adapter_dir, base, trust_remote_code=False):
    """The tokenizer saved with the adapter (finetune.py writes it, with the chat template used in training), else
    the base model's."""
    from transformers import AutoTokenizer

    has_own = any(os.path.isfile(os.path.join(adapter_dir, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(adapter_dir if has_own else base, trust_remote_code=trust_remote_code)


def load_base_and_adapter(adapter_dir, base=None, dtype="auto", trust_remote_code=False):
    """-> (model, tokenizer, base): the base model (`base`, else the one adapter_config.json names) in `dtype`
    ("auto" or a torch dtype) with the adapter on top, not merged (a peft PeftModel, on the CPU), as training left
    them: the adapter's tokenizer, and the base's embeddings and head grown to it when training added the
    template's turn tokens (finetune_tokens.prepare_base_for_adapter: the adapter holds the trained rows)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_tokens import prepare_base_for_adapter

    base, _ = adapter_base(adapter_dir, base)
    tokenizer = load_tokenizer(adapter_dir, base, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code)
    with peft_wrapping():
        model = PeftModel.from_pretrained(prepare_base_for_adapter(model, tokenizer, adapter_dir), adapter_dir)
    return model, tokenizer, base
