"""Build a tiny random Qwen2-architecture model and a byte-level BPE tokenizer, saved locally.

Nothing is downloaded: the tokenizer is trained in about a second with `tokenizers`, the model is
randomly initialised. The result loads with `AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)`
exactly like a real checkpoint, which is what the demo, the tests and the benchmark need.

    python examples/make_tiny_model.py --output examples/tiny-model
"""

import argparse
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))

# ChatML specials first (ids 0..2, like Qwen), then the special tokens that other model families'
# chat templates use, so a test can set any of ../shared/templates/ on this tokenizer and every
# control token stays a single token.
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
    "<|eom_id|>", "<|python_tag|>",
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
    "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>",
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]

CORPUS = """The quick brown fox jumps over the lazy dog. A language model predicts the next token.
You are a helpful assistant. Hello! How can I help you today? Please answer the question.
Fine-tuning adapts a pretrained model to follow instructions. The answer is 42.
def add(a, b):\n    return a + b\nprint(add(1, 2))\nimport json\n{"name": "get_weather", "arguments": {"city": "Paris"}}
What is the capital of France? The capital of France is Paris. Translate to German: Guten Morgen.
今天天气很好。你好，我是一个人工智能助手。Bonjour, comment allez-vous? 1234567890 + - * / = ( ) [ ] { } < > | _ .
Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024 Environment: ipython system user assistant tool model
"""


def training_corpus():
    """Texts the BPE tokenizer is trained on: a generic corpus plus the demo data, so the demo answers
    tokenize into few tokens and the tiny model can learn them in a minute."""
    texts = CORPUS.split("\n")
    demo = os.path.join(HERE, "demo_data.jsonl")
    if os.path.exists(demo):
        with open(demo, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    texts.extend(m["content"] for m in json.loads(line)["messages"])
    return texts * 4


def build_tokenizer(vocab_size=2048):
    sys.path.insert(0, os.path.dirname(HERE))
    from transformers import PreTrainedTokenizerFast

    from finetune_template import CHATML_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHATML_TEMPLATE,
        model_max_length=32768,
    )


def build_model(tokenizer, hidden_size=64, num_layers=2, seed=0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    return Qwen2ForCausalLM(config)


def make_tiny_model(output_dir, hidden_size=64, num_layers=2, seed=0):
    """Build and save tokenizer + model into `output_dir`; returns the path."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    os.makedirs(output_dir, exist_ok=True)
    tokenizer.save_pretrained(output_dir)
    model.save_pretrained(output_dir)
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=os.path.join(HERE, "tiny-model"), help="where to save it")
    parser.add_argument("--hidden_size", type=int, default=64)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_tiny_model(args.output, args.hidden_size, args.num_layers, args.seed)
    print(f"tiny model + tokenizer saved to {path}")


if __name__ == "__main__":
    main()
