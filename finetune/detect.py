"""Object detection (Mask R-CNN FPN) fine-tuning from a pretrained encoder, its evaluation and prediction.

Usage:
    accelerate launch finetune/detect.py --config configs/detect/convnextv2_base_coco_maskrcnn_3x.yaml \\
        --from-fcmae outputs/pretrain --data /data/coco --output-dir outputs/det_base
    python finetune/detect.py --from-fcmae outputs/pretrain --train-ann A.json --train-images DIR \\
        --val-ann B.json --val-images DIR --input-size 256 --batch-size 4 --max-steps 400 --eval-every 200 \\
        --mixed-precision no --output-dir OUT
    python finetune/detect.py --eval-only --checkpoint OUT --data /data/coco      # COCO metrics as JSON
    python finetune/detect.py predict photo.jpg photos/ --checkpoint OUT --out-dir preds  # drawn PNG + JSON
    python finetune/detect.py --help            # every field; any of them is a flag (predict --help: its own)

--from-fcmae: a pretraining output directory, encoder.safetensors, fcmae.safetensors, a checkpoint
directory, the official checkpoints, a timm or transformers export, or hf-hub:owner/name; --model is
read from it (without --from-fcmae, give --model: the encoder then starts from scratch).
Data: --data DIR in the COCO 2017 layout (annotations/instances_{train,val}2017.json, train2017/,
val2017/), or --train-ann/--train-images/--val-ann/--val-images, or --dataset-name ID (a Hub dataset
with image and objects {bbox (x, y, w, h), category}). Category ids may be sparse: the model predicts
labels 1..K, and categories.json, config.yaml and the weights' metadata map them back to the ids.
--no-masks trains Faster R-CNN (boxes only).

The defaults are the ConvNeXt Mask R-CNN 3x recipe: AdamW lr 1e-4 (absolute), weight decay 0.05,
layer-wise decay 0.95, 36 epochs with lr x 0.1 at epochs 27 and 33 (--lr-milestones none: cosine),
warmup 500 steps, 2 images per process (x 8 GPUs = 16), multi-scale training at --input-size 800
(--jitter lsj: large-scale jitter), drop path 0.1 (the presets: 0.4), bf16. On a CPU pass
--mixed-precision no.

Outputs in --output-dir: config.yaml, categories.json, log.jsonl (train rows: step, loss and its parts,
lr; eval rows: bbox_mAP, bbox_mAP_50, _75, _s, _m, _l and segm_* as fractions, val_images),
predictions/val_bbox.json and val_segm.json (the latest evaluation's detections, COCO results format,
original category ids), best.safetensors and last.safetensors (model, categories and sizes in their
metadata), checkpoints/step_N (resume exactly with --resume auto), final.yaml (with the annotations
left out of training: crowd, degenerate, without_mask).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repo root, not finetune/, first on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from fcmae.training.config import exit_on_user_error  # noqa: E402
from fcmae.tasks.detect import load_detector, main as run  # noqa: E402


def predict(argv: list[str]) -> int:
    """Draw and list the detections of each image: OUT_DIR/<stem>.png and <stem>.json. Unreadable
    images are named on stderr with the reason, the others still predicted; exit 1 if any failed."""
    import torch
    from torchvision.transforms.v2.functional import pil_to_tensor, to_dtype

    from fcmae.data import IMAGE_EXTENSIONS, decode_rgb
    from fcmae.tasks.detect_predict import detection_records, draw_detections, write_detections

    p = argparse.ArgumentParser(prog="python finetune/detect.py predict", description=predict.__doc__)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--checkpoint", required=True, help="a detection run dir, its best/last.safetensors, or an export")
    p.add_argument("--out-dir", default="predictions")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw and list detections scoring at least this")
    args = p.parse_args(argv)
    net = load_detector(args.checkpoint)
    cats, out, failed = net.categories, Path(args.out_dir), []
    files = [f for src in map(Path, args.images) for f in (
        sorted(q for q in src.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS) if src.is_dir() else [src])]
    out.mkdir(parents=True, exist_ok=True)
    for f in files:
        try:
            image = decode_rgb(str(f))
        except Exception as e:  # noqa: BLE001 - any decoder error: name the file, go on
            failed.append(f"{f}: {type(e).__name__}: {e}")
            continue
        with torch.no_grad():
            det = net([to_dtype(pil_to_tensor(image), torch.float32, scale=True)])[0]
        records = detection_records(det, cats.class_names, cats.label_to_cat, args.score_thresh)
        write_detections(out / f"{Path(f).stem}.json", records)
        draw_detections(image, det["boxes"], det["labels"], det["scores"], det.get("masks"), cats.class_names,
                        args.score_thresh).save(out / f"{Path(f).stem}.png")
    for line in failed:
        print(f"unreadable: {line}", file=sys.stderr)
    print(f"predicted {len(files) - len(failed)} of {len(files)} images into {out}"
          + (f"; {len(failed)} unreadable" if failed else ""), file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        sys.exit(exit_on_user_error(predict, argv[1:]))
    run(argv, description=__doc__)


if __name__ == "__main__":
    main()
