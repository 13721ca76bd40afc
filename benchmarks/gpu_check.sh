#!/usr/bin/env bash
# GPU check for issue 3: the training-throughput (item 1), incremental-vs-full (item 4) and
# scoring (item 5) benchmarks on CUDA, each in its --quick size, under 8 minutes in all;
# ends by printing the training step's MFU (achieved FLOP/s over the card's dense bf16 peak:
# 989 TFLOP/s for H100/H200, 312 for A100, else a measured bf16 matmul).
#
#   bash benchmarks/gpu_check.sh                 # logs and JSON under $OUT (or /tmp/llmrec-gpu-check)
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# Needs MovieLens-100k at ../shared/data/movielens-100k (or $ML100K_DIR) and a Python with
# llmrec's dependencies and a CUDA build of torch (.venv/bin/python when present).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR="${OUT:-/tmp/llmrec-gpu-check}"
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export LLMREC_BENCH_CACHE="${LLMREC_BENCH_CACHE:-$OUT_DIR/cache}"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: $PYTHON sees no CUDA device (or no torch); nothing run" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); cores: $(nproc)"

status=0
start=$(date +%s)
# Per-step limits add up to 450 s, under the 8-minute budget.
run() {  # run <seconds> <name> <script> [args...]
    local limit=$1 name=$2 script=$3
    shift 3
    echo
    echo "=== $name: $PYTHON benchmarks/$script --device cuda --quick $* ==="
    local t0=$(date +%s)
    timeout "$limit" "$PYTHON" "benchmarks/$script" --device cuda --quick --json "$OUT_DIR/$name.json" "$@" \
        2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s ==="
    [ "$rc" -eq 0 ] || status=1
}

run 240 train train_throughput.py
run 150 incremental incremental_vs_full.py
run 60 score score_throughput.py

echo
echo "=== summary ($(( $(date +%s) - start )) s in all; budget 480 s) ==="
"$PYTHON" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None

train = load("train")
if train:
    print(f"GPU: {train['machine'].get('gpu')}; bf16 peak {train['peak_flops'] / 1e12:.0f} TFLOP/s ({train['peak_source']})")
    for row in train["same_count"]:
        print(f"train tl={row['trainable_layers']}: naive {row['naive r/s']:.0f} r/s, llmrec step {row['llmrec step r/s']:.0f} r/s "
              f"(x{row['ratio (step)']:.0f}); RMSE {row['llmrec RMSE']:.4f} vs naive {row['naive RMSE']:.4f}")
    for row in train["epoch"]:
        print(f"epoch tl={row['trainable_layers']}: {row['step r/s']:.0f} r/s in the training loop; "
              f"MFU of the training step {row['of peak (train loop)']:.2%}; "
              f"incl. cache encoding {row['of peak (fit)']:.2%}")
else:
    print("train: no result")
incremental = load("incremental")
if incremental:
    for row in incremental["rows"]:
        print(f"day {row['day']}: incremental {row['incr. s']:.2f} s vs full {row['full s']:.2f} s "
              f"({row['incr./full %']:.1%}); RMSE {row['incr. RMSE']:.4f} vs {row['full RMSE']:.4f}")
else:
    print("incremental: no result")
score = load("score")
if score:
    first = score["rows"][0]
    print(f"score: {first['scores/s']:,.0f} scores/s on {score['scored_on']} ({first['call']})")
else:
    print("score: no result")
EOF
exit $status
