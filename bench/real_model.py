"""Real-model benchmark: training speed, peak memory and MFU of finetune.py on SmolLM2-135M-Instruct,
full fine-tuning and LoRA, side by side with HF Trainer defaults and TRL SFTTrainer defaults.

    python bench/real_model.py                       # 200 conversations, 6 modes: ~25-35 min on 2 quiet cores
    python bench/real_model.py --rows 16             # smoke test of every mode, ~4 min
    python bench/real_model.py --modes ours_full ours_lora --repeat 3
    python bench/real_model.py --rows 200 --modes ours_full --profile 3   # + torch.profiler op breakdown

Model: SmolLM2-135M-Instruct (examples/smollm2.py; LlamaForCausalLM, 134.5M parameters, 30 layers, hidden 576,
49,152-token vocabulary, tied embeddings). Data: the first --rows (default 200, of 999) conversations of
../shared/data/alpaca_en_demo.json (alpaca: instruction [+ "\n" + input] -> user, output -> assistant), the
same conversations and the same chat template (the tokenizer's own, ChatML with SmolLM's default system turn)
in every mode. fp32, sdpa attention, batch size 4, one epoch (or --steps), --threads intra-op threads (default:
the number of cores), each mode in its own process:

  ours_full / ours_lora   finetune.py with its defaults (LoRA: r 64, alpha 16, dropout 0, the 7 projections;
                          group_by_length batches, loss at the trained (answer) positions only, chunked)
  hf_full / hf_lora       transformers.Trainer with TrainingArguments defaults and the model's own loss, data as an
                          HF user writes it: apply_chat_template, labels = input_ids with the prompt set to -100,
                          DataCollatorForSeq2Seq (pads labels with -100); LoRA: peft.get_peft_model, same LoraConfig
  trl_full / trl_lora     TRL SFTTrainer with SFTConfig defaults (gradient checkpointing ON, max_length 1024,
                          loss on the completion only: the data is given as conversational prompt/completion);
                          only bf16=False (no GPU) and the batch size are set; LoRA: peft_config= the same LoraConfig

Timing: wall time of every optimizer step (a Trainer callback); the first step is not timed (warm-up). Tokens are
counted at the decoder's input (attention_mask.sum(): real tokens; numel: computed positions incl. padding), so
every mode is measured the same way on its own batches. tokens/s = real tokens of the timed steps / their time.
Memory: peak RSS of the mode's process (ru_maxrss: model, data, everything) and the peak RSS sampled every 50 ms
while training (train RSS: without preprocessing and the final save).

MFU (model FLOPs utilisation) = model FLOP/s / the machine's matmul throughput. The throughput is measured first, in
its own process with the same threads: fp32 torch matmuls of this model's own GEMMs at 1,024 tokens (every linear
layer's forward x@W^T, input gradient g@W and weight gradient g^T@x, and lm_head's), total FLOPs / total time.
Model FLOPs per real token: full = 6*N (N = 134.5M, all parameters; of an MoE model, those one token uses;
the tied embedding is counted once, as the lm_head matmul it is; the lookup costs nothing); LoRA = 4*N + 6*N_lora
(frozen weights: forward + input gradient,
no weight gradient; adapters: all three). Attention scores (~4*layers*seq*hidden per token, ~6 % at these lengths)
are not counted, nor recomputation (gradient checkpointing), nor finetune's saving of lm_head on prompt positions:
the same useful work is credited to every mode.

The machine may be shared: times move between runs; the ratios within one run are the figures to use, and
--repeat N keeps each mode's fastest run (all runs are in the JSON). Results: a markdown table on stdout and
bench/results/real_model-<time>.json (git-ignored); --profile K adds bench/results/real_model-profile-<mode>-<time>.txt.
"""

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

from loss_memory import parse_with_worker_flags  # this folder is sys.path[0]

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

MODES = ["ours_full", "hf_full", "trl_full", "ours_lora", "hf_lora", "trl_lora"]
DATA = os.path.join(os.path.dirname(ROOT), "shared", "data", "alpaca_en_demo.json")  # ../shared beside the checkout
TOKENS = 1024  # tokens of the matmul-throughput GEMMs (4 conversations of ~250 tokens)
# op-name -> category for --profile (self CPU time of aten ops, main thread = wall time)
CATEGORIES = [
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("optimizer", ("_fused_adam", "adam", "_foreach")),
    ("loss (CE, log_softmax)", ("cross_entropy", "log_softmax", "nll_loss", "_softmax_backward")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("copies, cat, index", ("copy_", "aten::cat", "index", "aten::clone", "contiguous", "aten::to", "_to_copy",
                            "gather", "scatter", "masked", "embedding")),
    ("allocation, zero/fill", ("empty", "zero_", "fill_", "zeros", "ones", "resize_")),
]


def lora_config():
    """finetune.py's LoRA defaults (LoraArguments), as one peft LoraConfig for every LoRA mode."""
    from peft import LoraConfig

    import finetune as ft

    a = ft.LoraArguments()
    return LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, bias=a.lora_bias,
                      target_modules=[t.strip() for t in a.lora_target_modules.split(",")], task_type="CAUSAL_LM")


def messages(record):
    """The conversation finetune.py reads from an alpaca record (finetune_data._from_alpaca)."""
    prompt = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
    return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": record["output"]}]


class Meter:
    """Trainer callback + decoder pre-hook: per optimizer step its end time, process CPU time, real tokens and
    computed positions; RSS sampled every 50 ms from train begin to train end."""

    def __init__(self, profile_steps=0):
        import transformers

        meter = self
        self.ends, self.cpu, self.tokens, self.positions, self.rss_peak_kb = [], [], [], [], 0
        self._tok = self._pos = 0
        self._training = False
        self.profile_steps, self.profiler = profile_steps, None

        class Callback(transformers.TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                meter.ends[:] = [time.perf_counter()]
                meter.cpu[:] = [time.process_time()]
                meter._training = True
                threading.Thread(target=meter._sample, daemon=True).start()

            def on_step_begin(self, args, state, control, **kwargs):
                if meter.profile_steps and state.global_step == 1:  # profile steps 2..K+1 (after warm-up)
                    import torch

                    meter.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                            profile_memory=False)
                    meter.profiler.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                meter.ends.append(time.perf_counter())
                meter.cpu.append(time.process_time())
                meter.tokens.append(meter._tok)
                meter.positions.append(meter._pos)
                meter._tok = meter._pos = 0
                if meter.profiler is not None and state.global_step == 1 + meter.profile_steps:
                    meter.profiler.__exit__(None, None, None)
                    meter.profiled, meter.profiler = meter.profiler, None

            def on_train_end(self, *args, **kwargs):
                meter._training = False

        self.callback = Callback()
        transformers.trainer.DEFAULT_CALLBACKS.append(self.callback)  # every Trainer gets it, ours included

    def _sample(self):
        page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
        while self._training:
            with open("/proc/self/statm") as f:
                self.rss_peak_kb = max(self.rss_peak_kb, int(f.read().split()[1]) * page_kb)
            time.sleep(0.05)

    def hook(self, model):
        """Count tokens at the decoder (LlamaModel) input: it runs once per micro-batch in every mode (gradient
        checkpointing recomputes its layers, not its forward)."""
        decoder = next(m for m in model.modules() if type(m).__name__ == "LlamaModel")

        def count(module, args, kwargs):
            ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            if ids is None:
                ids = kwargs.get("inputs_embeds")[..., 0]
            self._pos += ids.numel()
            self._tok += int(mask.sum()) if mask is not None else ids.numel()

        decoder.register_forward_pre_hook(count, with_kwargs=True)


def finetune_argv(opts, out, lora):
    argv = ["--model_name_or_path", opts.model, "--data_path", opts.data, "--output_dir", out,
            "--dataset_cache_dir", os.path.join(opts.workdir, "cache"), "--attn_implementation", "sdpa",
            "--per_device_train_batch_size", opts.batch, "--save_strategy", "no", "--logging_steps", 10 ** 6,
            "--report_to", "none", "--disable_tqdm", "True", "--seed", 0]
    argv += ["--max_steps", opts.steps] if opts.steps else ["--num_train_epochs", 1]
    if lora:
        argv += ["--use_lora", "true"]
    return [str(a) for a in argv] + opts.ours_args.split()


def worker(opts):
    """One mode, in this process: prints its measurements as JSON on the last line."""
    import datasets
    import torch
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    if opts.mode == "matmul":
        return print(json.dumps(matmul_throughput(opts.model)))
    meter = Meter(opts.profile)
    lora = opts.mode.endswith("_lora")
    out = os.path.join(opts.workdir, "out-" + opts.mode)
    if opts.mode.startswith("ours"):
        spec = importlib.util.spec_from_file_location("finetune_bench", opts.finetune_py)
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # datasets pickles its classes
        spec.loader.exec_module(module)
        load_model = module.load_model

        def counted_model(*args, **kwargs):
            model = load_model(*args, **kwargs)
            meter.hook(model)
            return model

        module.load_model = counted_model
        trainer = module.train(finetune_argv(opts, out, lora))
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(opts.model)
        model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=torch.float32, attn_implementation="sdpa")
        model.config.use_cache = False
        with open(opts.data) as f:
            records = [messages(r) for r in json.load(f)]
        common = dict(output_dir=out, report_to="none", save_strategy="no", per_device_train_batch_size=opts.batch,
                      logging_steps=10 ** 6, seed=0, disable_tqdm=True,
                      **({"max_steps": opts.steps} if opts.steps else {"num_train_epochs": 1}))
        if opts.mode.startswith("trl"):
            from trl import SFTConfig, SFTTrainer

            train = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in records])
            meter.hook(model)
            trainer = SFTTrainer(model=model, args=SFTConfig(bf16=False, **common), train_dataset=train,
                                 processing_class=tok, peft_config=lora_config() if lora else None)
        else:  # hf: what a user of the HF Trainer writes: chat template, prompt masked with -100, a stock collator
            def tokenize(row):
                prompt = tok.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
                full = tok.apply_chat_template(row["prompt"] + row["completion"], tokenize=False)
                ids = tok(full, add_special_tokens=False)["input_ids"]
                n = len(tok(prompt, add_special_tokens=False)["input_ids"])
                return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n + ids[n:]}

            train = datasets.Dataset.from_list([{"prompt": p, "completion": c} for p, c in records])
            train = train.map(tokenize, remove_columns=["prompt", "completion"])
            if lora:
                from peft import get_peft_model

                model = get_peft_model(model, lora_config())
            meter.hook(model)
            trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**common),
                                           train_dataset=train,
                                           data_collator=transformers.DataCollatorForSeq2Seq(tok, padding=True))
        trainer.train()
    model = trainer.model
    n_all = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    n_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # FLOPs per token count the parameters a token uses: an MoE model's experts it is not routed to left out
    import finetune_moe

    n_active = finetune_moe.active_parameters(model.config, n_all, finetune_moe.expert_parameter_count(model))
    steps = [b - a for a, b in zip(meter.ends, meter.ends[1:])]
    cpu = [b - a for a, b in zip(meter.cpu, meter.cpu[1:])]
    result = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
              "train_rss_mb": round(meter.rss_peak_kb / 1024), "steps": len(steps),
              "timed_s": round(sum(steps[1:]), 3), "timed_cpu_s": round(sum(cpu[1:]), 3),
              "timed_tokens": sum(meter.tokens[1:]), "timed_positions": sum(meter.positions[1:]),
              "tokens": sum(meter.tokens), "params": n_all, "active_params": n_active, "lora_params": n_lora,
              "trainable_params": n_grad,
              "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}
    if getattr(trainer, "retention", None) is not None:  # finetune's retention: what it cost in this run
        history = trainer.state.log_history
        result["retention_s"] = round(sum(h.get("eval_runtime", 0) for h in history if "eval_retention" in h), 3)
        result["retention_base_s"] = round(trainer.retention.base_seconds, 3)
        result["train_runtime_s"] = next(h["train_runtime"] for h in history if "train_runtime" in h)
    if opts.profile and hasattr(meter, "profiled"):
        result["profile"] = profile_summary(meter.profiled, opts)
    print(json.dumps(result))


def profile_summary(prof, opts):
    """Self CPU time by category (of the profiled steps' total), and the op table in a text file."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    cats = {}
    for e in events:
        name = e.key.lower()
        cat = next((c for c, keys in CATEGORIES if any(k.lower() in name for k in keys)), "other (elementwise...)")
        cats[cat] = cats.get(cat, 0) + e.self_cpu_time_total
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", time.strftime(f"real_model-profile-{opts.mode}-%Y%m%d-%H%M%S.txt"))
    with open(path, "w") as f:
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=60))
    return {"file": path, "self_cpu_s": round(total / 1e6, 3),
            "share": {c: round(t / total, 4) for c, t in sorted(cats.items(), key=lambda x: -x[1])}}


def matmul_throughput(model_path):
    """fp32 FLOP/s of this model's own GEMMs at TOKENS tokens: per linear layer the forward x@W^T, the input
    gradient g@W and the weight gradient g^T@x, weighted by how often each occurs; total FLOPs / total time."""
    import torch
    import torch.nn.functional as F

    with open(os.path.join(model_path, "config.json")) as f:
        c = json.load(f)
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c.get("head_dim", 64)
    shapes = [((h, h), 2), ((h, kv), 2), ((h, i), 2), ((i, h), 1)]  # (in, out), per layer: q o, k v, gate up, down
    shapes = [(s, n * c["num_hidden_layers"]) for s, n in shapes] + [((h, c["vocab_size"]), 1)]
    total_flops = total_time = 0.0
    per_shape = {}
    for (n_in, n_out), count in shapes:
        x, w, g = torch.randn(TOKENS, n_in), torch.randn(n_out, n_in), torch.randn(TOKENS, n_out)
        for kind, fn in (("fwd", lambda x=x, w=w: F.linear(x, w)), ("dgrad", lambda g=g, w=w: g @ w),
                         ("wgrad", lambda g=g, x=x: g.t() @ x)):
            for _ in range(3):
                fn()
            reps, start = 0, time.perf_counter()
            while reps < 5 or time.perf_counter() - start < 0.3:
                fn()
                reps += 1
            seconds = (time.perf_counter() - start) / reps
            flops = 2 * TOKENS * n_in * n_out
            per_shape[f"{kind} {n_in}x{n_out}"] = round(flops / seconds / 1e9, 1)
            total_flops, total_time = total_flops + flops * count, total_time + seconds * count
    return {"matmul_gflops": round(total_flops / total_time / 1e9, 1), "per_shape_gflops": per_shape,
            "tokens": TOKENS, "threads": torch.get_num_threads()}


def prepare(opts):
    """The model folder, and the first --rows alpaca records (as many as there are) in workdir."""
    model = subprocess.check_output([sys.executable, os.path.join(ROOT, "examples", "smollm2.py")],
                                    text=True).strip().splitlines()[-1]
    with open(DATA) as f:
        records = json.load(f)
    if len(records) < opts.rows:
        print(f"only {len(records)} conversations in {DATA}: using all", file=sys.stderr)
    data = os.path.join(opts.workdir, f"alpaca-{opts.rows}.json")
    with open(data, "w") as f:
        json.dump(records[: opts.rows], f)
    return model, data, min(opts.rows, len(records))


def run(opts, mode, model, data):
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, "--model", model, "--data", data,
           "--workdir", opts.workdir, "--batch", str(opts.batch), "--steps", str(opts.steps),
           "--threads", str(opts.threads), "--profile", str(opts.profile), "--ours_args", opts.ours_args,
           "--finetune_py", os.path.abspath(opts.finetune_py)]
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        return {"mode": mode, "error": proc.returncode}
    return {"mode": mode, "wall_s": round(time.perf_counter() - start, 1),
            **json.loads(proc.stdout.strip().splitlines()[-1])}


def model_flops_per_token(r):
    frozen = r.get("active_params", r["params"])  # MoE: the parameters one token uses (finetune_moe)
    return 6 * frozen if not r["lora_params"] else 4 * frozen + 6 * r["lora_params"]


def print_table(results, matmul, n_rows, opts):
    gflops = matmul["matmul_gflops"]
    print(f"\n{n_rows} conversations, batch size {opts.batch}, fp32, sdpa, {opts.threads} threads; "
          f"matmul throughput {gflops:.0f} GFLOP/s (this model's GEMMs at {TOKENS} tokens)\n")
    print("| mode | grad ckpt | real tokens/s | vs ours | s (timed steps) | padding | peak RSS (GiB) | train RSS (GiB) "
          "| RSS vs ours | MFU |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | failed ({r['error']}) | | | | | | | | |")
            continue
        ours = next((x for x in results if x["mode"] == "ours_" + r["mode"].split("_")[1] and "error" not in x), r)
        tps = r["timed_tokens"] / r["timed_s"]
        ours_tps = ours["timed_tokens"] / ours["timed_s"]
        mfu = model_flops_per_token(r) * tps / (gflops * 1e9)
        print(f"| {r['mode']} | {'on' if r['gradient_checkpointing'] else 'off'} | {tps:,.0f} | "
              f"{tps / ours_tps:.2f}x | "
              f"{r['timed_s']:.1f} | {1 - r['timed_tokens'] / r['timed_positions']:.0%} | "
              f"{r['peak_rss_mb'] / 1024:.2f} | {r['train_rss_mb'] / 1024:.2f} | "
              f"{r['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x | {mfu:.0%} |")
    for r in results:
        if "retention_s" in r:
            print(f"\n{r['mode']}: retention measured in {r['retention_s']:.1f} s against {r['train_runtime_s']:.1f} s "
                  f"of training ({r['retention_s'] / r['train_runtime_s']:.1%}); the base figures took "
                  f"{r['retention_base_s']:.1f} s (once per model and reference set: then cached)")
    for r in results:
        if "profile" in r:
            share = ", ".join(f"{c} {s:.0%}" for c, s in r["profile"]["share"].items())
            print(f"\nprofile {r['mode']} ({r['profile']['self_cpu_s']} s self CPU): {share}\n  {r['profile']['file']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200, help="conversations (the first of alpaca_en_demo.json)")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--repeat", type=int, default=1, help="runs per mode; the fastest is reported")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps (0: one epoch)")
    parser.add_argument("--profile", type=int, default=0, help="torch.profiler over K steps after the first")
    parser.add_argument("--ours_args", default="", help="extra finetune.py flags for the ours_* modes (experiments)")
    parser.add_argument("--finetune_py", default=os.path.join(ROOT, "finetune.py"),
                        help="the finetune.py of the ours_* modes, e.g. an older revision: "
                             "git show REV:finetune.py > F")
    opts = parse_with_worker_flags(parser)
    if opts.mode:
        return worker(opts)
    opts.workdir = opts.workdir or tempfile.mkdtemp(prefix="bench_real_")
    os.makedirs(opts.workdir, exist_ok=True)
    model, data, n_rows = prepare(opts)
    matmul = run(opts, "matmul", model, data)
    print(json.dumps(matmul), flush=True)
    results = []
    for mode in opts.modes:
        runs = [run(opts, mode, model, data) for _ in range(opts.repeat)]
        for r in runs:
            print(json.dumps({k: v for k, v in r.items() if k != "profile"}), flush=True)
        ok = [r for r in runs if "error" not in r]
        best = max(ok, key=lambda r: r["timed_tokens"] / r["timed_s"]) if ok else runs[0]
        results.append({**best, "runs": runs if len(runs) > 1 else None})
    print_table(results, matmul, n_rows, opts)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", time.strftime("real_model-%Y%m%d-%H%M%S.json")), "w") as f:
        json.dump({"rows": n_rows, "batch": opts.batch, "threads": opts.threads, "matmul": matmul,
                   "ours_args": opts.ours_args, "finetune_py": opts.finetune_py, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
