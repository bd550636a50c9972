#!/usr/bin/env bash
# README command 1, the part after the install: the built-in pretraining demo, run as the README's
# first code block writes it (read from README.md, so the two cannot drift apart) from the repository
# root, with --output-dir pointing to a temporary folder. Then check what it wrote: the outputs, a loss
# that fell, and an encoder that loads strictly (fcmae.load_checkpoint) and gives finite features.
# The committed results file (benchmarks/results/demo_cpu.json) is not rewritten: the docs check
# never flips on timing noise.
set -euo pipefail
cd "$(dirname "$0")/.."
line=$(awk '/^```bash/{f=1; next} f && /^python3 -m venv/{print; exit}' README.md)
[ -n "$line" ] || { echo "check_demo: README.md has no 'python3 -m venv ...' line in its first bash block"; exit 1; }
launch=${line##*&& }
case "$launch" in accelerate\ launch*) ;; *) echo "check_demo: README command 1 does not end in 'accelerate launch ...': $launch"; exit 1 ;; esac
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "check_demo: $launch --output-dir $out"
t0=$SECONDS
bash -c "$launch --output-dir $out" > .venv-ci/demo.log 2>&1 || { tail -40 .venv-ci/demo.log; echo "check_demo: the demo failed"; exit 1; }
echo "check_demo: finished in $((SECONDS - t0)) s"
DEMO_OUT=$out python - <<'PY'
import json
import os
from pathlib import Path

import torch

import fcmae

out = Path(os.environ["DEMO_OUT"])
for name in ("config.yaml", "log.jsonl", "final.yaml", "encoder.safetensors", "fcmae.safetensors", "reconstructions"):
    assert (out / name).exists(), f"the demo wrote no {out / name}"
rows = [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines() if r.strip() and '"loss"' in r]
first, last = rows[0], rows[-1]
assert last["loss"] < 0.9 * first["loss"], f"the demo's loss did not fall: {first['loss']:.3f} -> {last['loss']:.3f}"
model = fcmae.create_model("convnextv2_atto", num_classes=0).eval()
report = fcmae.load_checkpoint(model, out / "encoder.safetensors")
with torch.no_grad():
    features = model.forward_features(torch.randn(1, 3, 128, 128))
assert features.shape == (1, 320, 4, 4) and torch.isfinite(features).all()
print(f"check_demo: {len(rows)} log rows, loss {first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f} "
      f"(step {last['step']}); encoder.safetensors loads strictly ({report})")
PY
