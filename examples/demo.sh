#!/usr/bin/env bash
# The demo, end to end on CPU in about a minute:
#   1. build a tiny random Qwen2-architecture model + tokenizer (nothing is downloaded),
#   2. ask it a question from examples/demo_data.jsonl (it answers gibberish),
#   3. fine-tune it on that file with finetune.sh (full fine-tuning, 1 CPU process),
#   4. ask again: it now answers from the data.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
MODEL=examples/tiny-model
OUT=output_demo
QUESTION="What is the capital of Zubrowka?"

"$PYTHON" examples/make_tiny_model.py --output "$MODEL" --hidden_size 128 --num_layers 2
echo "== before fine-tuning: $QUESTION"
"$PYTHON" chat.py --model "$MODEL" --system "You are a helpful assistant." --prompt "$QUESTION" --max_new_tokens 16

rm -rf "$OUT"
PYTHON="$PYTHON" bash finetune.sh -m "$MODEL" -d examples/demo_data.jsonl -o "$OUT" \
  --num_train_epochs 40 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
  --learning_rate 3e-3 --save_strategy no --logging_steps 20 --disable_tqdm True

echo "== after fine-tuning: $QUESTION"
"$PYTHON" chat.py --model "$OUT" --system "You are a helpful assistant." --prompt "$QUESTION"
