"""What the check that a chat template drops nothing (finetune_coverage.py) costs in preprocessing: the same
conversations rendered, checked, tokenized and labelled (finetune._tokenize_arrays, the work of preprocessing
that the check adds to) with the check and with it switched off. Target: under 10 % more time.

    python bench/bench_coverage.py                       # 20,000 conversations, 2 rounds
    python bench/bench_coverage.py --rows 2000 --repeat 3 --template ../shared/templates/Qwen-Qwen3-0.6B.jinja

The conversations are real LLaMA-Factory data, cycled to --rows: glaive_toolcall_en_demo (tool calls, tool
results, `tools`) and alpaca_en_demo (plain chats), half each; the tokenizer is the real GPT-2 one with the
template's markers as special tokens, the template the built-in chatml (tools rendered as Qwen2.5 does) unless
--template names a file. Both variants run in each round, in turn, in this one process, and each keeps its fastest
round of CPU time (this process's; a shared machine moves wall time by 2x).

Measured (2 shared cores, 20,000 conversations, chatml, fastest of 2 rounds):
20.7 s of CPU without the check and 22.5 s with it, +8.7 % (0.09 ms a conversation; +5.4 % in the other round).
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
sys.path.insert(0, ROOT)


def conversations(rows):
    from finetune_data import normalize_record

    with open(os.path.join(SHARED, "data", "glaive_toolcall_en_demo.json"), encoding="utf-8") as f:
        glaive = [normalize_record(r, "sharegpt") for r in json.load(f)]
    with open(os.path.join(SHARED, "data", "alpaca_en_demo.json"), encoding="utf-8") as f:
        alpaca = [normalize_record(r, "alpaca") for r in json.load(f)]
    # copies, not the same objects again: nothing cached per message object carries over from one to the next
    return [json.loads(json.dumps((glaive if k % 2 else alpaca)[(k // 2) % (len(glaive) if k % 2 else len(alpaca))]))
            for k in range(rows)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=2, help="rounds; each variant keeps its fastest")
    p.add_argument("--template", default=None, help="a Jinja file (default: the built-in chatml)")
    opts = p.parse_args()
    from transformers import AutoTokenizer

    import finetune
    from finetune_template import CHATML_TEMPLATE

    tok = AutoTokenizer.from_pretrained(os.path.join(SHARED, "tokenizers", "gpt-2"))
    tok.chat_template = open(opts.template, encoding="utf-8").read() if opts.template else CHATML_TEMPLATE
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    convs = conversations(opts.rows)
    check = finetune.dropped_piece
    best, statuses = {}, {}
    for r in range(opts.repeat):
        for name, fn in (("without check", lambda *a, **k: None), ("with check", check)):
            finetune.dropped_piece = fn
            start = time.process_time()  # CPU time: a shared machine's other processes move wall time by 2x
            out = finetune._tokenize_arrays(tok, convs, 4096)
            took = time.process_time() - start
            best[name] = min(best.get(name, took), took)
            statuses[name] = sum(s.startswith(finetune.LOST) for _, _, s in out)
            print(f"[bench] round {r + 1}/{opts.repeat}: {name}: {took:.1f} s", flush=True)
    finetune.dropped_piece = check
    base, checked = best["without check"], best["with check"]
    print(f"\n{opts.rows} conversations ({opts.template or 'chatml'}), fastest of {opts.repeat} rounds: "
          f"{base:.1f} s CPU without the check, {checked:.1f} s with it: +{100 * (checked / base - 1):.1f} % "
          f"({1000 * (checked - base) / opts.rows:.2f} ms per conversation; {statuses['with check']} refused)")


if __name__ == "__main__":
    main()
