"""Talk to a fine-tuned model: a full fine-tune, a LoRA/DoRA/Q-LoRA adapter directory, or a merged model.

    python chat.py --model OUTPUT_DIR --prompt "What is the capital of Zubrowka?"    # one answer, then exit
    python chat.py --model OUTPUT_DIR                                                # interactive
    python chat.py --model OUTPUT_DIR --tools tools.json --prompt "Weather in Paris?"  # tool calling
    echo "Hello" | python chat.py --model OUTPUT_DIR                                 # one answer per stdin line

The prompt is rendered with the model's chat template (the one saved by finetune.py), so the model
sees exactly the format it was trained on. Decoding is greedy unless --temperature > 0. Only answers
go to stdout; everything else (loading, warnings) goes to stderr, so `ANSWER=$(python chat.py ...)` works.

--tools FILE (a JSON list of function schemas, as a record's `tools`) renders them with the chat template, as in
training: with the built-in chatml the model answers a tool request with <tool_call>{"name": ..., "arguments":
...}</tool_call>, printed as it is.

Interactive mode keeps the conversation: each line is a user turn. `/reset` starts over, `/exit` (or
end of input) quits.
"""

import argparse
import json
import os
import sys


def log(*args):
    print("[chat]", *args, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="finetune.py output directory (full model, adapter or merged).")
    p.add_argument("--base", default=None,
                   help="Base model for an adapter directory (default: base_model_name_or_path of "
                   "adapter_config.json).")
    p.add_argument("--prompt", default=None, help="Answer this one message and exit (default: read stdin).")
    p.add_argument("--system", default=None, help="System prompt.")
    p.add_argument("--tools", default=None, help="JSON file: a list of function schemas the model may call, rendered "
                   "by the chat template as in training (a record's `tools`).")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples.")
    p.add_argument("--top_p", type=float, default=1.0, help="Nucleus sampling, used when --temperature > 0.")
    p.add_argument("--seed", type=int, default=None, help="Seed for sampling.")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available).")
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("--chat_template_kwargs", default=None,
                   help="JSON object for the chat template, e.g. '{\"enable_thinking\": false}' (default: what "
                   "finetune.py trained with, from MODEL/data_report.json).")
    return p.parse_args(argv)


def template_kwargs(args):
    """--chat_template_kwargs, else those the data was rendered with (MODEL/data_report.json), else {}."""
    text, where = args.chat_template_kwargs, "--chat_template_kwargs"
    if text is None:
        try:
            with open(os.path.join(args.model, "data_report.json")) as f:
                kwargs = json.load(f).get("chat_template_kwargs") or {}
        except (OSError, ValueError):
            kwargs = {}
        if kwargs:
            log(f"chat template kwargs from training ({args.model}/data_report.json): {json.dumps(kwargs)}")
        return kwargs
    from finetune_template import parse_template_kwargs

    try:
        return parse_template_kwargs(text, where)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def load_tools(path):
    """--tools FILE -> the list of function schemas, checked as finetune.py checks a record's `tools`."""
    if path is None:
        return None
    from finetune_data import _tools

    try:
        with open(path, encoding="utf-8") as f:
            return _tools(json.load(f))
    except (OSError, ValueError) as e:  # unreadable, not JSON, not schemas (RecordError is a ValueError)
        raise SystemExit(f"error: --tools {path}: {e}") from None


def load(model_dir, base=None, dtype="auto", device=None, trust_remote_code=False):
    """-> (model, tokenizer). An adapter directory is loaded on top of its base model (not merged), the base's
    vocabulary grown as in training when the adapter added tokens."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_adapter import adapter_base, is_adapter, load_base_and_adapter

    transformers.logging.disable_progress_bar()  # the "[chat] loading" line says what happens
    if not os.path.isdir(model_dir):
        raise SystemExit(f"error: --model {model_dir} is not a directory.")
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    if is_adapter(model_dir):
        base = adapter_base(model_dir, base)[0]
        log(f"loading base {base} + adapter {model_dir}")
        model, tokenizer, _ = load_base_and_adapter(model_dir, base, torch_dtype, trust_remote_code)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        log(f"loading {model_dir}")
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if not tokenizer.chat_template:  # not a finetune.py output (it saves the template it trained with)
        from finetune_template import CHATML_TEMPLATE

        log("the tokenizer has no chat template; using the built-in chatml, as finetune.py does")
        tokenizer.chat_template = CHATML_TEMPLATE
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def stop_token_ids(model, tokenizer, kwargs=None):
    """EOS ids of the generation config and tokenizer, plus the template's end-of-turn tokens
    (<|im_end|>, <|eot_id|>, <end_of_turn>...): a chat model must stop at the end of its turn."""
    from finetune_tokens import stop_token_ids as stops

    return sorted(stops(tokenizer, model.generation_config.eos_token_id, template_kwargs=kwargs))


def generate(model, tokenizer, messages, max_new_tokens=256, temperature=0.0, top_p=1.0, kwargs=None, tools=None):
    """One assistant reply (text) to `messages`; kwargs: the chat template's (--chat_template_kwargs); tools: the
    function schemas the model may call (--tools)."""
    import torch

    enc = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True, **(kwargs or {}))
    enc = {k: v.to(model.device) for k, v in enc.items()}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, use_cache=True,
                             eos_token_id=stop_token_ids(model, tokenizer, kwargs),
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def main(argv=None):
    args = parse_args(argv)
    kwargs = template_kwargs(args)
    tools = load_tools(args.tools)
    from finetune_console import quiet_known_notices

    quiet_known_notices()  # first: drops known library notices (e.g. bitsandbytes on CPU) before they are imported
    import transformers

    transformers.logging.set_verbosity_error()  # stdout is for answers; errors still reach stderr
    if args.seed is not None:
        transformers.set_seed(args.seed)
    model, tokenizer = load(args.model, args.base, args.dtype, args.device, args.trust_remote_code)
    system = [{"role": "system", "content": args.system}] if args.system else []
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "kwargs": kwargs, "tools": tools}

    if args.prompt is not None:
        print(generate(model, tokenizer, system + [{"role": "user", "content": args.prompt}], **options), flush=True)
        return

    interactive = sys.stdin.isatty()
    if interactive:
        log("type a message and press Enter; /reset starts a new conversation, /exit quits.")
    history = []
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        reply = generate(model, tokenizer, system + history, **options)
        history.append({"role": "assistant", "content": reply})
        print(reply, flush=True)


if __name__ == "__main__":
    main()
