#!/usr/bin/env bash
# One prepared check of the CUDA path on one GPU, in under 8 minutes on an H200:
#   bash tools/gpu_check.sh            (results in $OUT, else in ./gpu_check_out)
#
# It generates its own JPEG data, then runs, each step with its own time limit and
# going on after a failure:
#   1. torchrun --nproc_per_node=1 main.py: NCCL, SyncBatchNorm, fp16 autocast with loss
#      scaling, checkpoints inside the epoch, SIGTERM mid-epoch (exit 75), resume;
#   2. bf16 with --compile (torch.compile under DDP, SyncBatchNorm, momentum branch), and
#      --data_backend gpu (JPEGs decoded in batches and augmented on the GPU);
#   3. eval_knn.py (its bank sharded over processes) with --use_cuda True and False,
#      eval_linear.py for one epoch;
#   4. tools/benchmark.py: ResNet-50, two 224 px views, batch 256, the authors'
#      configuration against ours, on synthetic batches and through both data
#      pipelines, and the pipelines alone (PIL on one core and 14 workers, GPU backend).
# Writes env.txt, summary.txt (one line per step), check.log (everything) and the
# benchmark's JSON and markdown table: 6 files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
DATA=$WORK/data
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
: > "$OUT/summary.txt"
: > "$OUT/check.log"

step() {  # step NAME SECONDS COMMAND... : run, log, record the outcome, never stop the script
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== $name: $*" >> "$OUT/check.log"
  timeout --signal=KILL "$limit" "$@" >> "$OUT/check.log" 2>&1
  local rc=$?
  printf '%-28s rc=%-4s %4ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$OUT/summary.txt"
  return $rc
}

expect_rc() {  # expect_rc WANTED NAME SECONDS COMMAND... : like step, ok only for rc WANTED
  local wanted=$1
  shift
  step "$@"
  local rc=$?
  [ "$rc" = "$wanted" ] || echo "  ^ expected rc=$wanted" | tee -a "$OUT/summary.txt"
}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
  nproc
} > "$OUT/env.txt" 2>&1

step generate_jpegs 120 "$PY" - "$DATA" <<'EOF'
import sys
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from src.demo_data import make_image

root = Path(sys.argv[1])

def write(job):
    split, label, i = job
    path = root / split / f"c{label}" / f"{i}.JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(hash(job) % 2**32)
    make_image(label, rng, size=320).save(path, quality=90)

jobs = [("train", i % 10, i) for i in range(2560)] + [("val", i % 10, i) for i in range(200)]
with Pool() as pool:
    pool.map(write, jobs, chunksize=16)
print(len(jobs), "JPEGs in", root)
EOF

TRAIN=(--data_path "$DATA" --arch resnet50 --batch_size 64 --size_dataset 768 --workers 12
       --epochs 2 --warmup_epochs 1 --eval_every 0 --seed 0 --log_every 1 --checkpoint_iters 5)
RUN=(torchrun --standalone --nproc_per_node=1 main.py)

# 1. fp16 (the default on CUDA): stopped by SIGTERM inside epoch 1, then resumed
"${RUN[@]}" "${TRAIN[@]}" --dump_path "$WORK/fp16" >> "$OUT/check.log" 2>&1 &
RUN_PID=$!
for _ in $(seq 600); do grep -q "epoch 1/2 iter 6/12" "$WORK/fp16/out.log" 2>/dev/null && break; sleep 0.2; done
kill -TERM "$RUN_PID"
wait "$RUN_PID"
echo "fp16_sigterm rc=$? (torchrun's own code; its rank exits 75)" | tee -a "$OUT/summary.txt"
grep -h "stopping on a signal\|networks:\|process(es) on" "$WORK/fp16/out.log" | cut -c1-160 >> "$OUT/summary.txt"
step fp16_resume 300 "${RUN[@]}" "${TRAIN[@]}" --dump_path "$WORK/fp16"
grep -h "resumed from\|epoch 2/2 done" "$WORK/fp16/out.log" | cut -c1-160 >> "$OUT/summary.txt"

# 2. bf16 with torch.compile (a ResNet-18 at 96 px: the compilation stays short)
step bf16_compile 300 "${RUN[@]}" "${TRAIN[@]}" --epochs 1 --precision bf16 --compile \
  --arch resnet18 --crops_size 96 --size_dataset 256 --dump_path "$WORK/bf16"

step gpu_data_backend 240 "${RUN[@]}" "${TRAIN[@]}" --epochs 1 --data_backend gpu \
  --dump_path "$WORK/gpu_backend"
grep -h "epoch 1/1 iter 12/12" "$WORK/gpu_backend/out.log" | cut -c1-160 >> "$OUT/summary.txt"

# 3. evaluations of the fp16 run
CKPT=$WORK/fp16/checkpoint.pth.tar
EVAL=(--data_path "$DATA" --arch resnet50 --pretrained "$CKPT" --batch_size 128 --workers 12)
step knn_use_cuda_true 180 "${RUN[@]/main.py/eval_knn.py}" "${EVAL[@]}" --use_cuda True \
  --dump_path "$WORK/knn_cuda"
step knn_use_cuda_false 180 "${RUN[@]/main.py/eval_knn.py}" "${EVAL[@]}" --use_cuda False \
  --dump_path "$WORK/knn_cpu"
cat "$WORK/knn_cuda/knn_results.json" "$WORK/knn_cpu/knn_results.json" 2>/dev/null \
  | tr -d ' \n' | head -c 400 >> "$OUT/summary.txt"
echo >> "$OUT/summary.txt"
step linear_1_epoch 180 "${RUN[@]/main.py/eval_linear.py}" "${EVAL[@]}" --epochs 1 \
  --lr_classifier 10 --dump_path "$WORK/linear"

# 4. the benchmark: the authors' configuration against ours, one run
step benchmark 420 "$PY" tools/benchmark.py --arch resnet50 --batch_size 256 --steps 15 \
  --warmup 3 --configs authors channels_last fused bf16 ours ours+compile \
  --loader authors ours --gpu_loader ours --pipeline --data_path "$DATA" --workers 14 \
  --json "$OUT/benchmark.json"
sed -n '/^| configuration/,$p' "$OUT/check.log" | tail -n 20 > "$OUT/benchmark.md"

rm -rf "$WORK"
echo "done in ${SECONDS}s" | tee -a "$OUT/summary.txt"
