#!/usr/bin/env bash
# Launch finetune.py with torchrun on one machine or many.
#
#   bash finetune.sh -m MODEL -d data.jsonl [--deepspeed ds_config_zero3.json] [--use_lora] [--q_lora] [finetune.py flags...]
#
# Topology comes from the environment (defaults in brackets):
#   GPUS_PER_NODE [number of visible GPUs; 1 process on a CPU-only machine]
#   NNODES [1]  NODE_RANK [0]  MASTER_ADDR [127.0.0.1]  MASTER_PORT [6001]
# Under SLURM (SLURM_JOB_NODELIST set) NNODES, NODE_RANK and MASTER_ADDR are derived from it.
# FINETUNE_PRINT_CMD=1: print the torchrun command instead of running it (to check the topology).
# Preemption: SIGTERM or SIGUSR1 (to this script, torchrun or any worker) saves a checkpoint at the next
# step end and exits 75 (see docs/distributed.md, "Preemption and requeue"). FINETUNE_SIGNALS [SIGTERM,SIGINT,SIGHUP,
# SIGQUIT,SIGUSR1]: signals torchrun forwards to the workers; FINETUNE_SHUTDOWN_TIMEOUT [300]: seconds
# torchrun gives them to save after a signal before it kills them.
set -euo pipefail
DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options:
  -m, --model PATH         model directory or hub id            (MODEL_NAME_OR_PATH)
  -d, --data PATH          training data: files/folders, comma-separated
  -o, --output_dir PATH    where checkpoints and the result go   [output_finetune]
      --deepspeed FILE     DeepSpeed config (ds_config_zero2.json, ds_config_zero3.json)
      --use_lora [BOOL]    train a LoRA adapter                  [False]
      --q_lora [BOOL]      Q-LoRA: 4-bit base + LoRA             [False]
  -h, --help               this help
Any other argument is passed to finetune.py unchanged (see: python finetune.py --help).
EOF
}

MODEL="${MODEL_NAME_OR_PATH:-Qwen/Qwen2.5-0.5B-Instruct}"
DATA=""
OUTPUT_DIR="output_finetune"
DS_CONFIG=""
USE_LORA=False
Q_LORA=False
EXTRA=()
is_bool() { [[ "${1:-}" =~ ^([Tt]rue|[Ff]alse|1|0)$ ]]; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -m|--model) MODEL="$2"; shift 2 ;;
    -d|--data) DATA="$2"; shift 2 ;;
    -o|--output_dir) OUTPUT_DIR="$2"; shift 2 ;;
    --deepspeed) DS_CONFIG="$2"; shift 2 ;;
    --use_lora) if is_bool "${2:-}"; then USE_LORA="$2"; shift 2; else USE_LORA=True; shift; fi ;;
    --q_lora) if is_bool "${2:-}"; then Q_LORA="$2"; shift 2; else Q_LORA=True; shift; fi ;;
    -h|--help) usage; exit 0 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done
if [[ -z "$DATA" ]]; then echo "finetune.sh: -d/--data is required (see -h)" >&2; exit 2; fi
[[ "$Q_LORA" =~ ^([Tt]rue|1)$ ]] && USE_LORA=True

# ------------------------------------------------------------------ hyperparameters: edit these
EPOCHS=3
PER_DEVICE_BATCH=2
GRAD_ACCUM=8
MODEL_MAX_LENGTH=4096
if [[ "$USE_LORA" =~ ^([Tt]rue|1)$ ]]; then LR=2e-4; else LR=1e-5; fi
WARMUP=0.03            # < 1: a ratio of all steps
WEIGHT_DECAY=0.0
LR_SCHEDULER=cosine
SAVE_STEPS=500
SAVE_TOTAL_LIMIT=3
LOGGING_STEPS=10
# ------------------------------------------------------------------

# Topology. SLURM first (if the user did not set it), then environment, then single-node defaults.
if [[ -n "${SLURM_JOB_NODELIST:-}" && -z "${NNODES:-}" ]]; then
  NNODES="${SLURM_NNODES:-1}"
  NODE_RANK="${SLURM_NODEID:-0}"
  if command -v scontrol >/dev/null 2>&1; then
    MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
  else  # expand the first host of e.g. "gpu[07-10,12],cpu01" without scontrol
    MASTER_ADDR="${MASTER_ADDR:-$("$PYTHON" -c '
import re, sys
first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", sys.argv[1])
prefix, rng = first.group(1), first.group(3)
print(prefix + (rng.split(",")[0].split("-")[0] if rng else ""))' "$SLURM_JOB_NODELIST")}"
  fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-6001}"
read -r N_GPUS BF16_OK < <("$PYTHON" -c '
import torch
ok = torch.cuda.is_available()
print(torch.cuda.device_count() if ok else 0, int(ok and torch.cuda.is_bf16_supported()))')
GPUS_PER_NODE="${GPUS_PER_NODE:-$(( N_GPUS > 0 ? N_GPUS : 1 ))}"

ARGS=(
  --model_name_or_path "$MODEL"
  --data_path "$DATA"
  --output_dir "$OUTPUT_DIR"
  --num_train_epochs "$EPOCHS"
  --per_device_train_batch_size "$PER_DEVICE_BATCH"
  --per_device_eval_batch_size "$PER_DEVICE_BATCH"
  --gradient_accumulation_steps "$GRAD_ACCUM"
  --model_max_length "$MODEL_MAX_LENGTH"
  --learning_rate "$LR"
  --warmup_steps "$WARMUP"
  --weight_decay "$WEIGHT_DECAY"
  --lr_scheduler_type "$LR_SCHEDULER"
  --save_strategy steps
  --save_steps "$SAVE_STEPS"
  --save_total_limit "$SAVE_TOTAL_LIMIT"
  --logging_steps "$LOGGING_STEPS"
  --use_lora "$USE_LORA"
  --q_lora "$Q_LORA"
)
if [[ "$N_GPUS" -gt 0 ]]; then
  ARGS+=(--gradient_checkpointing True)
  [[ "$BF16_OK" == 1 ]] && ARGS+=(--bf16 True) || ARGS+=(--fp16 True)
else
  ARGS+=(--ddp_backend gloo)  # CPU: fp32, gloo collectives
fi
[[ -n "$DS_CONFIG" ]] && ARGS+=(--deepspeed "$DS_CONFIG")

# finetune_launch.py is torchrun (torch.distributed.run) that ends a run stopped on purpose (user error,
# preemption) with the workers' exit code, without torchrun's ChildFailedError traceback after their message.
CMD=("$PYTHON" "$DIR/finetune_launch.py"
  --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
  --signals-to-handle "${FINETUNE_SIGNALS:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
  --shutdown-timeout "${FINETUNE_SHUTDOWN_TIMEOUT:-300}"
  "$DIR/finetune.py" "${ARGS[@]}" "${EXTRA[@]}")
shell_line() {  # the command as one line to copy: words quoted only where the shell needs it
  local word line=""
  for word in "$@"; do
    [[ "$word" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]] || word=$(printf '%q' "$word")
    line+="${line:+ }$word"
  done
  printf '%s\n' "$line"
}
if [[ -n "${FINETUNE_PRINT_CMD:-}" ]]; then shell_line "${CMD[@]}"; exit 0; fi

# torchrun exits 1 whenever it got a signal or a worker failed, so each worker writes its exit code (0 done,
# 2 user error, 3 diverged, 4 retention fell, 74 save failed, 75 preempted: finetune_exit_codes.py,
# tests/test_exit_codes.py) to a file and this script exits with what they meant.
export FINETUNE_EXIT_CODE_FILE="$(mktemp "${TMPDIR:-/tmp}/finetune-exit.XXXXXX")"
trap 'rm -f "$FINETUNE_EXIT_CODE_FILE"' EXIT
echo "[finetune.sh] $(shell_line "${CMD[@]}")" >&2  # what runs, once
( trap - INT QUIT; exec "${CMD[@]}" ) &  # a background job would start with Ctrl-C ignored, down to the workers
LAUNCHER=$!
for sig in TERM INT HUP QUIT USR1; do trap "kill -s $sig $LAUNCHER 2>/dev/null" "$sig"; done
while true; do  # `wait` returns early when a trapped signal arrives; wait again until torchrun is gone
  rc=0; wait "$LAUNCHER" || rc=$?
  kill -0 "$LAUNCHER" 2>/dev/null || break
done
codes=$(sort -u "$FINETUNE_EXIT_CODE_FILE")
if [[ "$rc" -ne 0 && "$(wc -l < "$FINETUNE_EXIT_CODE_FILE")" -eq "$GPUS_PER_NODE" && "$codes" =~ ^(0|2|3|4|74|75)$ ]]; then
  rc=$codes  # every worker of this node ended the same deliberate way
fi
exit "$rc"
