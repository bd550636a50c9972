#!/usr/bin/env bash
# Every GPU benchmark, in stages of under 10 minutes each (an H100/H200 budget).
# Run from the repository root with fcmae installed (pip install -e ".[dev,bench]"):
#
#   bash benchmarks/gpu_suite.sh tests      # tests/test_gpu.py and the model tests on the device
#   bash benchmarks/gpu_suite.sh headline   # dense vs gather, atto..huge at 224, bf16 + channels_last + compile
#   bash benchmarks/gpu_suite.sh base       # base: 224/384/512 x fp32/bf16 x channels_last x compile
#   bash benchmarks/gpu_suite.sh dense      # dense fine-tuning/inference step against timm
#   bash benchmarks/gpu_suite.sh data       # decode + augment img/s per worker, workers each step needs
#   bash benchmarks/gpu_suite.sh loop       # whole pretraining loop against the bare step, by --num-workers
#   bash benchmarks/gpu_suite.sh segment    # UperNet segmentation training step, base and large at 512, bf16
#   bash benchmarks/gpu_suite.sh detect     # Mask R-CNN training step, tiny and base at 1024 (LSJ), bf16
#   bash benchmarks/gpu_suite.sh all
#
# Results land in benchmarks/results/*_cuda*.json (+ .png), each with the machine it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=benchmarks/results
stage=${1:-all}

run() { echo "+ $*" >&2; "$@"; }

if [[ $stage == tests || $stage == all ]]; then
  run $PY -m pytest -q tests/test_gpu.py tests/test_fcmae.py tests/test_syncs.py
fi
if [[ $stage == headline || $stage == all ]]; then
  run $PY benchmarks/bench_pretrain.py --models convnextv2_atto convnextv2_tiny convnextv2_base convnextv2_large \
    convnextv2_huge --sizes 224 --precisions bf16 --channels-last on --compile on --batch-size 64 \
    --backends dense gather minkowski --out $R/pretrain_step_cuda.json
fi
if [[ $stage == base || $stage == all ]]; then
  run $PY benchmarks/bench_pretrain.py --models convnextv2_base --sizes 224 384 512 --precisions fp32 bf16 \
    --channels-last both --compile both --batch-size 32 --warmup 3 --iters 10 --out $R/pretrain_step_cuda_base.json
fi
if [[ $stage == dense || $stage == all ]]; then
  run $PY benchmarks/bench_dense.py --models convnextv2_tiny,convnextv2_base --batch 128 --bf16 --channels-last \
    --compile --iters 20 --out $R/dense_vs_timm_cuda.json
fi
if [[ $stage == data || $stage == all ]]; then
  run $PY benchmarks/bench_data.py --workers 0 1 2 4 8 12 16 --batches 64 --step-results $R/pretrain_step_cuda.json \
    --out $R/data_loading_cuda_host.json
fi
if [[ $stage == loop || $stage == all ]]; then
  run $PY benchmarks/bench_loop.py --model convnextv2_base --batch-size 128 --mixed-precision bf16 --channels-last \
    --compile --workers 4 8 12 --steps 150 --log-every 50 --num-images 8192 --out $R/pretrain_loop_cuda.json
fi
if [[ $stage == segment || $stage == all ]]; then
  run $PY benchmarks/bench_segment.py --models convnextv2_base convnextv2_large --size 512 --precisions bf16 \
    --batch-sizes 2 8 --channels-last --warmup 3 --iters 10 --out $R/segment_step_cuda.json
fi
if [[ $stage == detect || $stage == all ]]; then
  run $PY benchmarks/bench_detect.py --models convnextv2_tiny convnextv2_base --sizes 800 1024 --precisions bf16 \
    --batch-sizes 2 4 --warmup 3 --iters 10 --out $R/detect_step_cuda.json
fi
