"""Tiny random MoE models of five families, built from their transformers configs with the tests' tokenizer
(examples/make_tiny_model.py) and saved like a real checkpoint: tests/test_moe.py and bench/moe_router_loss.py."""

import os

import torch

FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss", "olmoe")


def moe_config(family, tokenizer, experts=8, top_k=2, **extra):
    import transformers

    common = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False,
                  eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=None, num_experts_per_tok=top_k)
    common.update(extra)  # e.g. hidden_size, num_hidden_layers, output_router_logits
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                                           num_experts=experts)
    if family == "qwen2_moe":  # with the shared expert
        return transformers.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=32, num_experts=experts)
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=16, num_local_experts=experts)
    if family == "gpt_oss":
        return transformers.GptOssConfig(**common, head_dim=8, intermediate_size=16, num_local_experts=experts,
                                         layer_types=["sliding_attention", "full_attention"], sliding_window=64)
    if family == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=16, num_experts=experts)
    raise ValueError(family)


def make_moe_model(family, output_dir, seed=0, **config):
    """Build and save tokenizer + a tiny random `family` MoE model into output_dir -> the path."""
    from transformers import AutoModelForCausalLM

    from make_tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(family, tokenizer, **config))
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    model.save_pretrained(output_dir)
    return str(output_dir)
