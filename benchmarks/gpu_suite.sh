#!/usr/bin/env bash
# Every GPU benchmark, in stages of under 10 minutes each (an H100/H200 budget).
# Run from the repository root with fcmae installed (pip install -e ".[dev,bench]"):
#
#   bash benchmarks/gpu_suite.sh tests      # tests/test_gpu.py and the model tests on the device
#   bash benchmarks/gpu_suite.sh headline   # dense vs gather vs minkowski, atto..huge at 224, bf16 (+ channels_last
#                                           # + compile, which minkowski has not)
#   bash benchmarks/gpu_suite.sh base       # base: 224/384/512 x fp32/bf16 x channels_last x compile
#   bash benchmarks/gpu_suite.sh dense      # dense fine-tuning/inference step against timm
#   bash benchmarks/gpu_suite.sh data       # decode + augment img/s per worker, workers each step needs
#   bash benchmarks/gpu_suite.sh loop       # whole pretraining loop against the bare step, by --num-workers
#   bash benchmarks/gpu_suite.sh segment    # UperNet segmentation training step, base and large at 512, bf16
#   bash benchmarks/gpu_suite.sh detect     # Mask R-CNN training step, tiny and base at 1024 (LSJ), bf16
#   bash benchmarks/gpu_suite.sh cluster    # one huge pretraining step at 512 px, bf16, with and without
#                                           # --grad-checkpointing: peak CUDA memory and step time
#   bash benchmarks/gpu_suite.sh all
#
# Results land in benchmarks/results/*_cuda*.json (+ .png), each with the machine it ran on. Every
# stage asked for runs; the suite exits 1 when any of them failed (named at the end). A stage fails
# when any of its configurations does (--strict); the others' results are saved all the same.
#
#   bash benchmarks/gpu_suite.sh --dry-run [STAGE]
#
# runs each stage's code paths once, tiny (convnextv2_atto, 64 px, batch 2, one timed step, one
# configuration per path: each backend, compile on and off, channels_last, fp32 and bf16 autocast,
# activation checkpointing on and off), on the CPU even where a GPU is present, one OpenMP thread
# per process, writing every JSON and PNG to a new temporary folder (never benchmarks/results/).
# Its tests stage only collects tests/test_gpu.py. torch.compile uses the aot_eager backend there
# (dynamo + AOTAutograd, no code generation: inductor's C++ build alone takes minutes on a small
# CPU); FCMAE_DRY_COMPILE_BACKEND=inductor tries the real one. All stages at once run in two lanes
# side by side, each stage's output shown at the end (FCMAE_DRY_JOBS=1: one after another, live).
# Under 3 minutes on 2 busy CPU cores; a failed configuration fails its stage (--strict).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STAGES=(tests headline base dense data loop segment detect cluster)

dry=0
stage=all
for arg in "$@"; do
  case $arg in
    --dry-run) dry=1 ;;
    -h | --help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) stage=$arg ;;
  esac
done
if [[ $stage != all && " ${STAGES[*]} " != *" $stage "* ]]; then
  echo "unknown stage '$stage'; one of: ${STAGES[*]} all (and --dry-run)" >&2
  exit 2
fi

if ((dry)); then
  R=$(mktemp -d "${TMPDIR:-/tmp}/fcmae_gpu_suite_dry.XXXXXX")
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  # one configuration per code path, at the smallest sizes; --strict: a failed configuration fails the stage
  TINY=(--models convnextv2_atto --sizes 64 --batch-size 2 --warmup 0 --iters 1 --strict)
  COMPILE_BACKEND=${FCMAE_DRY_COMPILE_BACKEND:-aot_eager}
  echo "dry run: CPU, tiny sizes; results in $R" >&2
else
  R=benchmarks/results
fi

run() {
  echo "+ $*" >&2
  "$@"
}

stage_tests() {
  if ((dry)); then
    run $PY -m pytest --collect-only -q -p no:cacheprovider tests/test_gpu.py
  else
    run $PY -m pytest -q tests/test_gpu.py tests/test_fcmae.py tests/test_syncs.py
  fi
}

stage_headline() {
  if ((dry)); then  # the three backends, eager, fp32, in one process
    run $PY benchmarks/bench_pretrain.py "${TINY[@]}" --precisions fp32 --channels-last off --compile off \
      --backends dense gather minkowski --in-process --out $R/pretrain_step_cuda.json
  else
    run $PY benchmarks/bench_pretrain.py --models convnextv2_atto convnextv2_tiny convnextv2_base convnextv2_large \
      convnextv2_huge --sizes 224 --precisions bf16 --channels-last on --compile on --batch-size 64 \
      --backends dense gather minkowski --strict --out $R/pretrain_step_cuda.json
  fi
}

stage_base() {
  if ((dry)); then  # channels_last + torch.compile, in a process of its own (the default way)
    run $PY benchmarks/bench_pretrain.py "${TINY[@]}" --precisions fp32 --channels-last on --compile on \
      --compile-backend "$COMPILE_BACKEND" --backends gather --out $R/pretrain_step_cuda_base.json
  else
    run $PY benchmarks/bench_pretrain.py --models convnextv2_base --sizes 224 384 512 --precisions fp32 bf16 \
      --channels-last both --compile both --batch-size 32 --warmup 3 --iters 10 --strict \
      --out $R/pretrain_step_cuda_base.json
  fi
}

stage_dense() {
  if ((dry)); then
    run $PY benchmarks/bench_dense.py --models convnextv2_atto --size 64 --batch 2 --channels-last --warmup 0 \
      --iters 1 --out $R/dense_vs_timm_cuda.json
  else
    run $PY benchmarks/bench_dense.py --models convnextv2_tiny,convnextv2_base --batch 128 --bf16 --channels-last \
      --compile --iters 20 --out $R/dense_vs_timm_cuda.json
  fi
}

stage_data() {
  local steps=()  # the headline's steps, when measured, get their --num-workers advice
  if [[ -f $R/pretrain_step_cuda.json ]]; then
    steps=(--step-results $R/pretrain_step_cuda.json)
  else
    echo "no $R/pretrain_step_cuda.json (the headline stage): no --num-workers advice" >&2
  fi
  if ((dry)); then  # in-process loading and one worker process
    run $PY benchmarks/bench_data.py --workers 0 1 --batches 2 --batch-size 2 --input-size 64 --num-images 8 \
      "${steps[@]}" --out $R/data_loading_cuda_host.json
  else
    run $PY benchmarks/bench_data.py --workers 0 1 2 4 8 12 16 --batches 64 "${steps[@]}" \
      --out $R/data_loading_cuda_host.json
  fi
}

stage_loop() {
  if ((dry)); then  # fcmae pretrain for two log intervals, in-process loading, channels_last
    run $PY benchmarks/bench_loop.py --model convnextv2_atto --size 64 --batch-size 2 --channels-last --workers 0 \
      --steps 4 --log-every 2 --num-images 8 --out $R/pretrain_loop_cuda.json
  else
    run $PY benchmarks/bench_loop.py --model convnextv2_base --batch-size 128 --mixed-precision bf16 --channels-last \
      --compile --workers 4 8 12 --steps 150 --log-every 50 --num-images 8192 --out $R/pretrain_loop_cuda.json
  fi
}

stage_segment() {
  if ((dry)); then  # a narrow head: the same code, 64x less of its work
    run $PY benchmarks/bench_segment.py --models convnextv2_atto --size 64 --precisions fp32 --batch-sizes 2 \
      --head-channels 64 --channels-last --warmup 0 --iters 1 --in-process --strict --out $R/segment_step_cuda.json
  else
    run $PY benchmarks/bench_segment.py --models convnextv2_base convnextv2_large --size 512 --precisions bf16 \
      --batch-sizes 2 8 --channels-last --warmup 3 --iters 10 --strict --out $R/segment_step_cuda.json
  fi
}

stage_detect() {
  if ((dry)); then  # few sampled RoIs: the same code, a fraction of the box and mask heads' work
    run $PY benchmarks/bench_detect.py --models convnextv2_atto --sizes 64 --precisions fp32 --batch-sizes 2 \
      --objects 2 --rois-per-image 16 --warmup 0 --iters 1 --in-process --strict --out $R/detect_step_cuda.json
  else
    run $PY benchmarks/bench_detect.py --models convnextv2_tiny convnextv2_base --sizes 800 1024 --precisions bf16 \
      --batch-sizes 2 4 --warmup 3 --iters 10 --strict --out $R/detect_step_cuda.json
  fi
}

stage_cluster() {
  if ((dry)); then  # bf16 autocast, activation checkpointing off and on
    run $PY benchmarks/bench_pretrain.py "${TINY[@]}" --precisions bf16 --backends gather --grad-checkpointing both \
      --in-process --out $R/pretrain_step_cuda_huge_ckpt.json
  else
    run $PY benchmarks/bench_pretrain.py --models convnextv2_huge --sizes 512 --precisions bf16 --backends gather \
      --grad-checkpointing both --batch-size 32 --warmup 2 --iters 5 --strict --out $R/pretrain_step_cuda_huge_ckpt.json
  fi
}

FAILED=$(mktemp)
trap 'rm -f "$FAILED"' EXIT

run_stage() {  # one stage; its output live, or into $LOGS/STAGE.log when LOGS is set
  local s=$1 t0=$SECONDS rc
  if [[ -n ${LOGS:-} ]]; then
    "stage_$s" >"$LOGS/$s.log" 2>&1
    rc=$?
  else
    echo "=== stage $s" >&2
    "stage_$s"
    rc=$?
  fi
  if ((rc == 0)); then
    echo "=== stage $s: ok ($((SECONDS - t0)) s)" >&2
  else
    echo "=== stage $s: FAILED, exit $rc ($((SECONDS - t0)) s)" >&2
    echo "$s" >>"$FAILED"
  fi
}

lane() {  # the stages named, one after another, among those asked for
  local s
  for s in "$@"; do
    [[ $stage == all || $stage == "$s" ]] && run_stage "$s"
  done
  return 0
}

start=$SECONDS
if ((dry)) && [[ $stage == all && ${FCMAE_DRY_JOBS:-2} -gt 1 ]]; then
  # two lanes side by side (each process has one thread; start-up, not arithmetic, is most of a tiny run),
  # balanced by their time on 2 cores; data follows headline, whose steps it gives --num-workers advice for
  LOGS=$R/logs
  mkdir -p "$LOGS"
  lane tests headline data segment detect cluster &
  lane base loop dense &
  wait
  for s in "${STAGES[@]}"; do
    echo "----- stage $s ($LOGS/$s.log)" >&2
    cat "$LOGS/$s.log" >&2
  done
else
  lane "${STAGES[@]}"
fi
echo "=== $((SECONDS - start)) s in all$( ((dry)) && echo "; results in $R")" >&2
if [[ -s $FAILED ]]; then
  echo "FAILED stages: $(sort -u "$FAILED" | tr '\n' ' ')" >&2
  exit 1
fi
