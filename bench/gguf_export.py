"""File size and quality of export_gguf.py's types on the demo model (docs/after-training.md: "Run it elsewhere").

    bash examples/demo.sh                          # the demo's LoRA run in output_demo
    python bench/gguf_export.py output_demo [--types f16 q8_0 q4_k_m] [--out DIR]

For each type: the GGUF's size; greedy answers in llama.cpp (llama-cpp-python, through the GGUF's own chat
template) to the demo's questions, compared with the Hugging Face model's (the same run merged, fp32,
transformers' greedy generate); and the mean negative log-likelihood per answer token on 20 held-out
conversations (the first 20 of ../shared/data/alpaca_en_demo.json, which the demo never trains on, with the
demo's system prompt), next to the Hugging Face model's. Prints one JSON object.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SYSTEM = "You are a helpful assistant."
HELD_OUT = ROOT.parent / "shared" / "data" / "alpaca_en_demo.json"


def questions():
    asked = []
    with open(ROOT / "examples" / "demo_data.jsonl", encoding="utf-8") as f:
        for line in f:
            user = next(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
            if user not in asked:
                asked.append(user)
    return asked + ["What is the capital of France?"]


def held_out(n=20):
    records = json.loads(HELD_OUT.read_text(encoding="utf-8"))[:n]
    return [[{"role": "system", "content": SYSTEM},
             {"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()},
             {"role": "assistant", "content": r["output"]}] for r in records]


def answer_ids(tok, chat, limit=384):
    """-> (token ids of the whole conversation, index of the first answer token), cut to `limit` tokens."""
    prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
    full = tok.apply_chat_template(chat, tokenize=True, return_dict=True)
    prompt, full = list(prompt["input_ids"]), list(full["input_ids"])
    assert full[:len(prompt)] == prompt
    return full[:limit], len(prompt)


def nll(logprobs_of, tok, chats):
    total, count = 0.0, 0
    for chat in chats:
        ids, start = answer_ids(tok, chat)
        lp = logprobs_of(ids)  # lp[t] = log p(ids[t+1] | ids[:t+1])
        total -= sum(lp[start - 1:])
        count += len(ids) - start
    return total / count


def hf_side(folder, asked, chats):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    answers = []
    with torch.no_grad():
        for q in asked:
            enc = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
            out = model.generate(**enc, max_new_tokens=48, do_sample=False)
            answers.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())

        def logprobs_of(ids):
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

        return tok, answers, nll(logprobs_of, tok, chats)


def gguf_side(path, tok, asked, chats):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=max(1, (os.cpu_count() or 2) // 2), seed=0,
                logits_all=True, verbose=False, chat_format="chat_template.default")
    answers, stops = [], []
    for q in asked:
        out = llm.create_chat_completion(messages=[{"role": "system", "content": SYSTEM},
                                                   {"role": "user", "content": q}],
                                         temperature=0.0, top_k=1, max_tokens=48)
        answers.append(out["choices"][0]["message"]["content"].strip())
        stops.append(out["choices"][0]["finish_reason"])

    def logprobs_of(ids):
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids) - 1], dtype=np.float64)
        logits -= logits.max(1, keepdims=True)
        lse = np.log(np.exp(logits).sum(1))
        return [float(logits[t, ids[t + 1]] - lse[t]) for t in range(len(ids) - 1)]

    return answers, stops, nll(logprobs_of, tok, chats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    p.add_argument("--out", default=None, help="Folder for the GGUF files (default: a temporary one).")
    args = p.parse_args(argv)
    from finetune_console import quiet_known_notices

    quiet_known_notices()  # DeepSpeed's no-GPU notice would land in the JSON on stdout
    import export_gguf

    asked, chats = questions(), held_out()
    result = {"questions": len(asked), "held_out_conversations": len(chats)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        folder = export_gguf.model_folder(argparse.Namespace(run_dir=args.run_dir, base=None), tmp)
        tok, hf_answers, hf_nll = hf_side(folder, asked, chats)
        result["hf_fp32"] = {"nll": round(hf_nll, 4)}
        for t in args.types:
            path = out / t / "model.gguf"
            path.parent.mkdir(exist_ok=True)
            subprocess.run([sys.executable, str(ROOT / "export_gguf.py"), args.run_dir, "--outtype", t, "--outfile",
                            str(path), "--overwrite"], check=True)
            answers, stops, gguf_nll = gguf_side(path, tok, asked, chats)
            same = [a == b for a, b in zip(answers, hf_answers)]
            result[t] = {"size_mib": round(path.stat().st_size / 2**20, 1),
                         "answers_equal_hf": f"{sum(same)}/{len(same)}",
                         "stopped": f"{stops.count('stop')}/{len(stops)}", "nll": round(gguf_nll, 4),
                         "nll_minus_hf": round(gguf_nll - hf_nll, 4),
                         "differing": [(q, a, b) for q, a, b, s in zip(asked, answers, hf_answers, same) if not s]}
        if "f16" in result and "q4_k_m" in result:
            result["q4_k_m_nll_minus_f16"] = round(result["q4_k_m"]["nll"] - result["f16"]["nll"], 4)
            result["q4_k_m_ppl_ratio_to_f16"] = round(math.exp(result["q4_k_m_nll_minus_f16"]), 4)
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
