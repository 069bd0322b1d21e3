"""Mixture-of-experts models (finetune_moe.py) on tiny random models of five families built from their transformers
configs (tests/moe_models.py): the router's load-balancing loss in the loss and equal to transformers' own, LoRA on
the fused experts of every family, the attention a model supports, the balance figure, the parameter counts, and
the training modes (full, LoRA, Q-LoRA, DoRA refusal, packing, ZeRO-3 on 2 processes, resume), merge and chat."""

import json

import pytest
import torch

import finetune
from conftest import ROOT, read_log_history, write_jsonl
from moe_models import FAMILIES, make_moe_model

DEMO = ROOT / "examples" / "demo_data.jsonl"
TWO = [  # two conversations of different lengths: one batch of 2 is padded
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [{"role": "user", "content": "Hello!"},
                  {"role": "assistant", "content": "Hello! How can I help you today? The answer is 42. " * 3}]},
]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """{family: path} of saved tiny MoE models whose configs ask for the router loss (output_router_logits)."""
    root = tmp_path_factory.mktemp("moe")
    return {f: make_moe_model(f, root / f, output_router_logits=True) for f in FAMILIES}


def args(model, data, out, cache, *extra):
    return [str(a) for a in ["--model_name_or_path", model, "--data_path", data, "--output_dir", out,
            "--dataset_cache_dir", cache, "--per_device_train_batch_size", 2, "--logging_steps", 1,
            "--save_strategy", "no", "--seed", 0, "--retention", "False", *extra]]


def transformers_loss(model_dir, dataset):
    """transformers' own loss (output_router_logits=True, labels) on the dataset's samples as one padded batch
    with its attention mask -> (loss, aux_loss, router_aux_loss_coef)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    rows = [dataset[i] for i in range(len(dataset))]
    longest = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    return float(out.loss), float(out.aux_loss), model.config.router_aux_loss_coef


@pytest.mark.parametrize("family,packing", [(f, "false") for f in FAMILIES] + [("qwen3_moe", "true"),
                                                                              ("mixtral", "true")])
def test_router_loss_is_transformers_own(moe_models, tmp_path, family, packing):
    """At lr 0, the logged loss + coef x router_loss equals transformers' loss with output_router_logits=True on
    the same two samples: the router loss counts the real tokens only (a padded batch; a packed row)."""
    data = write_jsonl(tmp_path / "two.jsonl", TWO)
    trainer = finetune.train(args(moe_models[family], data, tmp_path / "out", tmp_path / "cache", "--max_steps", 1,
                                  "--learning_rate", 0, "--packing", packing))
    (logged,) = [h for h in trainer.state.log_history if "loss" in h]
    loss, aux, coef = transformers_loss(moe_models[family], trainer.train_dataset)
    assert trainer.moe.coef == coef > 0
    assert logged["router_loss"] == pytest.approx(aux, rel=1e-4)
    assert logged["loss"] + coef * logged["router_loss"] == pytest.approx(loss, rel=1e-4)
    assert 0 <= logged["expert_maxvio"] <= 8 / 2 - 1
    history = read_log_history(tmp_path / "out")
    assert "router_loss" in history[0] and "expert_maxvio" in history[0]  # trainer_state.json


def test_router_loss_reaches_the_gradient(moe_models, tmp_path):
    """The router term is part of what is optimised: one step of plain SGD moves the routers by lr x the gradient
    of loss + coef x router_loss; with coef 0 the move differs (the loss' gradient alone)."""
    data = write_jsonl(tmp_path / "two.jsonl", TWO)
    moved = {}
    for coef in ("0", "1000"):
        trainer = finetune.train(args(moe_models["qwen3_moe"], data, tmp_path / coef, tmp_path / "cache",
                                      "--max_steps", 1, "--learning_rate", 1e-2, "--optim", "sgd",
                                      "--lr_scheduler_type", "constant", "--router_aux_loss_coef", coef,
                                      "--max_grad_norm", 0))
        moved[coef] = trainer.model.model.layers[0].mlp.gate.weight.detach().clone()
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(moe_models["qwen3_moe"]).model.layers[0].mlp.gate.weight
    step0, step1 = (moved[c] - base for c in ("0", "1000"))
    assert step0.abs().sum() > 0 and (step1 - step0).abs().max() > 10 * (step0.abs().max() + 1e-9) * 1e-3
    assert not torch.allclose(step0, step1)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_reaches_the_experts(moe_models, tmp_path, family, capsys):
    """Default targets: LoRA on attention and on every fused expert tensor of every family, said in the log; the
    adapter reproduces the trained model; gpt-oss (no sdpa) gets eager attention, said in the log."""
    from safetensors.torch import load_file

    from finetune_adapter import load_base_and_adapter

    out = tmp_path / "out"
    trainer = finetune.train(args(moe_models[family], DEMO, out, tmp_path / "cache", "--use_lora", "True",
                                  "--lora_r", 4, "--max_steps", 3, "--learning_rate", 1e-2))
    log = capsys.readouterr().out
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert any(".experts." in k and "lora_" in k for k in keys), sorted(keys)[:20]
    assert any("self_attn" in k for k in keys)
    assert "LoRA reaches: attention 8 modules" in log and "experts 4 fused tensors" in log and "router frozen" in log
    assert f"attention: {'eager' if family == 'gpt_oss' else 'sdpa'}" in log
    assert "router_loss" in trainer.state.log_history[0]
    model, tokenizer, _ = load_base_and_adapter(str(out))
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    trainer.model.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trainer.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_balance_holds_with_the_router_loss_and_degrades_without(moe_models, tmp_path):
    """expert_maxvio (0 = even) on one conversation repeated (narrow data), 30 steps at lr 1e-2: with the router loss
    (coef 0.1) the routing stays near even, with --router_aux_loss_coef 0 it collapses towards a few experts. The
    figure is in trainer_state.json and plotted in training_loss.png. (Measured: mean of steps 15-30 about 0.5 with
    the loss, 1.2 without.)"""
    record = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "The capital of France is Paris. The answer is 42."}]}
    data = write_jsonl(tmp_path / "narrow.jsonl", [record] * 32)
    late = {}
    for coef in ("0", "0.1"):
        out = tmp_path / f"coef{coef}"
        finetune.train(args(moe_models["qwen3_moe"], data, out, tmp_path / "cache", "--per_device_train_batch_size",
                            4, "--max_steps", 30, "--learning_rate", 1e-2, "--logging_steps", 5,
                            "--lr_scheduler_type", "constant", "--router_aux_loss_coef", coef))
        history = read_log_history(out)
        late[coef] = sum(h["expert_maxvio"] for h in history if "expert_maxvio" in h and h["step"] >= 15) / 4
        assert (out / "training_loss.png").is_file()
    assert late["0"] > 1.6 * late["0.1"], late


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_preflight_counts_total_and_active_parameters(moe_models, tmp_path, family, capsys):
    """--dry_run: the memory estimate counts every parameter, the active count leaves out the experts a token is
    not routed to (6 of 8 here): counted here from the saved weights' names."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    finetune.train(args(moe_models[family], DEMO, out, tmp_path / "cache", "--dry_run", "True"))
    estimate = json.loads((out / "data_report.json").read_text())["memory_estimate"]
    weights = load_file(f"{moe_models[family]}/model.safetensors")
    total = sum(t.numel() for t in weights.values())
    experts = sum(t.numel() for k, t in weights.items() if ".experts." in k)
    assert estimate["params"] == total and estimate["trainable_params"] == total
    assert estimate["active_params"] == total - experts * 6 // 8
    assert f"{total:,} total (the memory estimate's), {total - experts * 6 // 8:,} active" in capsys.readouterr().out


def test_zero3_two_processes_lora(moe_models, tmp_path):
    """ZeRO-3 on 2 real torchrun processes (gloo): LoRA on Qwen3-MoE (experts included, router loss from the config)
    ends with a complete adapter holding the experts; the router loss and the balance figure are logged."""
    from safetensors.torch import load_file

    from test_distributed import ZERO3, torchrun

    out = tmp_path / "lora"
    torchrun(2, args(moe_models["qwen3_moe"], DEMO, out, tmp_path / "cache", "--deepspeed", ZERO3, "--ddp_backend",
                     "gloo", "--use_lora", "True", "--lora_r", 4, "--max_steps", 2, "--learning_rate", 1e-2),
             timeout=600)
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert any(".experts." in k for k in keys)
    logged = [h for h in read_log_history(out) if "loss" in h]
    assert len(logged) == 2 and all(h["router_loss"] > 0 and "expert_maxvio" in h for h in logged)


@pytest.mark.slow
def test_zero2_two_processes_full(moe_models, tmp_path):
    """ZeRO-2, full fine-tuning of Mixtral on 2 processes: trains and saves every tensor."""
    from test_distributed import ZERO2, torchrun

    out = tmp_path / "full"
    torchrun(2, args(moe_models["mixtral"], DEMO, out, tmp_path / "cache", "--deepspeed", ZERO2, "--ddp_backend",
                     "gloo", "--max_steps", 2, "--learning_rate", 1e-3), timeout=600)
    from transformers import AutoModelForCausalLM

    # saved in the checkpoint's layout (one tensor per expert): compared as transformers loads them back
    saved, base = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (out, moe_models["mixtral"]))
    assert saved.keys() == base.keys()
    assert not torch.equal(saved["model.layers.0.mlp.experts.gate_up_proj"],
                           base["model.layers.0.mlp.experts.gate_up_proj"])


@pytest.mark.slow
def test_sequence_parallel_two_processes(moe_models, tmp_path):
    """Ulysses sequence parallelism (2 processes, one sample split across both, ZeRO-2) on Qwen3-MoE: each rank's
    router loss counts the real tokens of its shard; the run trains and logs router_loss and expert_maxvio."""
    from test_distributed import ZERO2, torchrun

    out = tmp_path / "sp"
    torchrun(2, args(moe_models["qwen3_moe"], DEMO, out, tmp_path / "cache", "--deepspeed", ZERO2, "--ddp_backend",
                     "gloo", "--sequence_parallel_size", 2, "--max_steps", 2, "--learning_rate", 1e-3), timeout=600)
    logged = [h for h in read_log_history(out) if "loss" in h]
    assert len(logged) == 2 and all(h["router_loss"] > 0 and "expert_maxvio" in h for h in logged)
    assert (out / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def lora_run(moe_models, tmp_path_factory):
    """A LoRA run on Mixtral (default targets: the experts too; routers trained whole with --freeze_router False)."""
    tmp = tmp_path_factory.mktemp("moe-lora")
    out = tmp / "out"
    finetune.train(args(moe_models["mixtral"], DEMO, out, tmp / "cache", "--use_lora", "True", "--lora_r", 4,
                        "--max_steps", 4, "--learning_rate", 2e-2, "--freeze_router", "False"))
    return out


def test_merge_and_chat_an_moe_adapter(lora_run, moe_models, tmp_path, capsys):
    """merge_lora.py: the merged model's logits equal base + adapter (experts and the trained routers merged in);
    chat.py answers from the adapter."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import chat
    import merge_lora
    from finetune_adapter import load_base_and_adapter

    keys = load_file(lora_run / "adapter_model.safetensors").keys()
    assert any(".mlp.gate." in k for k in keys), sorted(keys)[:10]  # the routers' trained weights, whole
    merged = merge_lora.main(["--adapter", str(lora_run), "--output", str(tmp_path / "merged")])
    adapter, tokenizer, _ = load_base_and_adapter(str(lora_run))
    ids = torch.tensor([tokenizer("The capital of France is Paris. Hello!")["input_ids"]])
    with torch.no_grad():
        expected = adapter.eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged or tmp_path / "merged").eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(moe_models["mixtral"]).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, expected, atol=1e-3)
    capsys.readouterr()
    chat.main(["--model", str(lora_run), "--prompt", "Hello!", "--max_new_tokens", "5"])
    assert capsys.readouterr().out.strip()


def test_qlora_and_dora(moe_models, tmp_path, capsys):
    """Q-LoRA on an MoE model: the dense layers 4-bit (bitsandbytes quantizes nn.Linear only), LoRA on the fused
    experts in the compute dtype; DoRA (peft has no variant of it for fused expert tensors) is refused in one line."""
    import bitsandbytes as bnb

    trainer = finetune.train(args(moe_models["olmoe"], DEMO, tmp_path / "q", tmp_path / "cache", "--q_lora", "True",
                                  "--lora_r", 4, "--max_steps", 2))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    assert "experts 4 fused tensors" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--use_dora: peft 0.21 has no DoRA for the fused expert weights"):
        finetune.train(args(moe_models["olmoe"], DEMO, tmp_path / "d", tmp_path / "cache", "--use_lora", "True",
                            "--use_dora", "True", "--max_steps", 1))


def test_full_with_frozen_router_resumes(moe_models, tmp_path):
    """Full fine-tuning of Qwen2-MoE (shared expert), --freeze_router True: the routers stay as they were, the rest
    trains; a run resumed from checkpoint-2 ends where an uninterrupted one does."""
    from transformers import AutoModelForCausalLM

    def run(out, steps):
        return finetune.train(args(moe_models["qwen2_moe"], DEMO, out, tmp_path / "cache", "--max_steps", steps,
                                   "--learning_rate", 1e-3, "--freeze_router", "True", "--save_strategy", "steps",
                                   "--save_steps", 2, "--train_sampling_strategy", "random",
                                   "--lr_scheduler_type", "constant"))  # the same rate whatever max_steps

    run(tmp_path / "ref", 4)
    run(tmp_path / "out", 2)
    run(tmp_path / "out", 4)  # resumes from checkpoint-2
    # (saved in the checkpoint's layout, one tensor per expert: compared as transformers loads them back)
    base, ref, resumed = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in
                          (moe_models["qwen2_moe"], tmp_path / "ref", tmp_path / "out"))
    assert torch.equal(ref["model.layers.0.mlp.gate.weight"], base["model.layers.0.mlp.gate.weight"])
    assert not torch.equal(ref["model.layers.0.mlp.experts.down_proj"], base["model.layers.0.mlp.experts.down_proj"])
    for k in ref:
        torch.testing.assert_close(resumed[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)
    assert [h["router_loss"] for h in read_log_history(tmp_path / "out") if "loss" in h][-1] == pytest.approx(
        [h["router_loss"] for h in read_log_history(tmp_path / "ref") if "loss" in h][-1], rel=1e-4)


@pytest.mark.engine
def test_moe_adapter_exported_to_gguf_runs_in_llama_cpp(smollm2, tmp_path):
    """export_gguf.py on a Qwen3-MoE LoRA adapter (SmolLM2's tokenizer: one llama.cpp's converter knows): llama.cpp
    loads it as qwen3moe with its 8 experts and its logits are base + adapter's up to f16 rounding."""
    import subprocess
    import sys

    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import ENV
    from finetune_adapter import load_base_and_adapter
    from moe_models import moe_config
    from test_export_gguf import engine

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(moe_config("qwen3_moe", tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "out"
    finetune.train(args(base, DEMO, out, tmp_path / "cache", "--use_lora", "True", "--lora_r", 4, "--max_steps", 2,
                        "--learning_rate", 1e-2))
    gguf = tmp_path / "model.gguf"
    subprocess.run([sys.executable, str(ROOT / "export_gguf.py"), str(out), "--outtype", "f16", "--outfile", str(gguf)],
                   env=ENV, check=True, capture_output=True, timeout=600)
    llm = engine().Llama(model_path=str(gguf), n_ctx=256, n_threads=1, seed=0, verbose=False, logits_all=True)
    assert llm.metadata["general.architecture"] == "qwen3moe" and llm.metadata["qwen3moe.expert_count"] == "8"
    model, tok, _ = load_base_and_adapter(str(out))
    ids = tok("The capital of France is Paris.")["input_ids"]
    llm.eval(ids)
    with torch.no_grad():
        expected = model.eval()(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.array(llm.scores[:len(ids)]) - expected).max() < 0.05
