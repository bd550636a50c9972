#!/usr/bin/env bash
# The wheel built from this checkout, installed in a new virtual environment, runs every command from a
# folder outside the checkout: pretrain, finetune, predict, embed, segment, detect, export, models.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
log() { echo "[check_wheel $((SECONDS - start)) s] $*"; }

python -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO" > "$WORK/build.log" 2>&1 \
    || { tail -20 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/fcmae-*.whl)
log "built $(basename "$WHEEL")"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q -c "$REPO/constraints.txt" "$WHEEL" > "$WORK/install.log" 2>&1 \
    || { grep -v "^WARNING: Location" "$WORK/install.log" | tail -20; exit 1; }
log "installed into a new venv"
cd "$WORK"  # outside the checkout: nothing of it is importable from here
export PATH="$WORK/venv/bin:$PATH" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python -c "import fcmae, sys; assert '$WORK/venv' in fcmae.__file__, fcmae.__file__; print('fcmae', fcmae.__version__, 'from', fcmae.__file__)"
python "$REPO/.ci/tiny_data.py" data
Q=(--num-workers 0 --report-to none --input-size 64 --mixed-precision no)
fcmae --version
fcmae pretrain --data data/cls/train "${Q[@]}" --batch-size 4 --max-steps 2 --decoder-dim 16 --num-recon 1 \
    --save-every 2 --output-dir pre > pre.log 2>&1 || { tail -20 pre.log; exit 1; }
log "pretrain: $(ls pre | tr '\n' ' ')"
fcmae finetune --from-fcmae pre --data data/cls "${Q[@]}" --batch-size 4 --epochs 1 --output-dir ft > ft.log 2>&1 \
    || { tail -20 ft.log; exit 1; }
fcmae predict data/cls/val/a --checkpoint ft > pred.txt  # not `| head`: under pipefail a closed pipe fails the line
head -3 pred.txt
fcmae embed data/cls/val --checkpoint ft --out emb.parquet
fcmae segment --from-fcmae pre --data data/ade --num-classes 2 "${Q[@]}" --batch-size 2 --max-steps 2 \
    --eval-every 2 --save-every 2 --head-channels 16 --eval-mode whole --output-dir seg > seg.log 2>&1 \
    || { tail -20 seg.log; exit 1; }
fcmae predict data/ade/images/validation --checkpoint seg --mode whole --out-dir seg_pred > seg_pred.txt
tail -1 seg_pred.txt
fcmae detect --from-fcmae pre --data data/coco --num-workers 0 --report-to none --mixed-precision no \
    --train-short-side 64 --batch-size 2 --max-steps 2 --eval-every 2 --save-every 2 --output-dir det > det.log 2>&1 \
    || { tail -20 det.log; exit 1; }
fcmae predict data/coco/val2017 --checkpoint det --out-dir det_pred
for run in ft seg det; do fcmae export --checkpoint "$run" --out "export_$run" | tail -1; done
fcmae models --models convnextv2_atto --sizes 224
log "every command ran from the wheel"
