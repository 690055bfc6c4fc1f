#!/usr/bin/env bash
# The CUDA path, checked in GPU slots of a few minutes (at most 10 minutes a command):
#
#   tools/gpu_check.sh smoke      every CUDA code path once            (< 5 min, one H200)
#   tools/gpu_check.sh bench      the benchmark and the data pipelines  (< 5 min, one H200)
#   tools/gpu_check.sh --dry-run  both on the CPU with tiny sizes       (~1-2 min, the tests)
#
# Results go to $OUT (else ./gpu_check_out): one line per step on stdout as it ends
# (name, rc, seconds, the figure), the same appended to results.jsonl, each command's
# output in logs/, the benchmark's rows in bench_*.json as they are measured. It installs
# nothing, runs on the torch it finds (no API newer than torch 2.5) and prints its
# version first; it stops at once, in one line, if CUDA or a module is missing.
# Each command runs under `timeout -s TERM -k 30` (torchrun hands the TERM to its ranks,
# which write a checkpoint and exit); the steps of an entry point share a 285 s budget,
# and a step that would start past it is reported as skipped. The logic: tools/gpu_check/.
#
# smoke, estimated seconds on one H200 (ResNet-18 at 96 px, batch 32, 320 JPEGs); after
# the data, two steps run at a time (each as soon as what it needs is done), so the
# 300 s of steps take about 170 s:
#     5  preflight        torch/CUDA/GPU and the modules
#    10  data             the JPEGs, and CMYK, grayscale, progressive, PNG, truncated,
#                         undecodable and 10,000 x 7,500 files for the GPU backend
#    25  train_fp16       torchrun, NCCL, fp16 + loss scaler + fused SGD + channels_last,
#                         2 epochs with checkpoints inside them
#    35  sigterm_resume   the same run stopped by SIGTERM in epoch 1, then resumed
#     1  resume_matches   its losses against the uninterrupted run's (1e-2 relative)
#    30  fp32_to_fp16     an fp32 per-tensor AdamW checkpoint resumed in fp16, fused  [2, 5]
#    20  gpu_backend      --data_backend gpu over the odd files               [3, 4, 6]
#    12  knn_cpu_bank     eval_knn.py --use_cuda False under NCCL                  [1]
#    12  knn_gpu_bank     eval_knn.py --use_cuda True
#    15  linear_1_epoch   eval_linear.py, one epoch
#    40  two_processes    two ranks on the one GPU (NCCL, else gloo): SyncBatchNorm,
#                         then the sharded k-NN against one process                [1]
#    15  unit_checks      direct pass/fail checks of the defects on the GPU  [2, 3, 4, 5, 6, 7]
#    80  bf16_compile     bf16 with torch.compile (inductor), one epoch (started first)
#  ~170  in all; then one line per defect: pass or FAIL, and the steps that show it
#
# bench, estimated seconds on one H200 (ResNet-50, two 224 px views, batch 256), one
# step at a time (the measurements must not share the GPU):
#     5  preflight
#    15  data             2,560 JPEGs of 320 px
#    80  bench_synthetic  authors (per-tensor SGD), foreach, channels_last, fused, ours,
#                         bf16, on device-resident batches                          [7]
#    80  bench_pipelines  PIL on one core and 14 workers, the GPU backend; full steps
#                         fed by the PIL pipeline (authors, ours) and by the GPU backend
#   120  bench_compile    ours + torch.compile (inductor), last: the budget may cut it
#   300  in all at most
#
# [n]: the defect of issue 16 that the step checks on CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m tools.gpu_check "$@"
