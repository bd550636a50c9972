"""Semantic segmentation (UperNet) fine-tuning from a pretrained encoder, its evaluation and prediction.

Usage:
    accelerate launch finetune/segment.py --config configs/segment/convnextv2_base_ade20k_512.yaml \\
        --from-fcmae outputs/pretrain --data /data/ADEChallengeData2016 --output-dir outputs/seg_base
    python finetune/segment.py --from-fcmae outputs/pretrain --data DIR --num-classes 3 --input-size 128 \\
        --batch-size 8 --max-steps 300 --eval-every 100 --head-channels 128 --mixed-precision no --output-dir OUT
    python finetune/segment.py --eval-only --checkpoint OUT --data DIR --eval-ms-flip      # as mmseg's tools/test.py
    python finetune/segment.py predict photo.jpg photos/ --checkpoint OUT --out-dir preds  # palette PNG + overlay
    python -m fcmae.hub export --checkpoint OUT --format transformers --out hub/seg   # transformers UperNet
    python finetune/segment.py --help            # every field; any of them is a flag (predict --help: its own)

--from-fcmae: a pretraining output directory, encoder.safetensors, fcmae.safetensors, a checkpoint
directory, the official checkpoints, a timm or transformers export, or hf-hub:owner/name; --model is
read from it (without --from-fcmae, give --model: the encoder then starts from scratch).
--data: an ADE20K-layout folder (images/training/x.jpg with annotations/training/x.png, and
validation/), or split parquet/arrow files; --dataset-name ID: a Hub dataset (scene_parse_150) with
--image-column / --label-column. Label maps hold one class index per pixel; with --reduce-zero-label
(the default, as ADE20K) values 1..N are the classes and 0 is ignored, as 255 always is.
--num-classes (default 150) and --class-names FILE (one name per line).

The defaults are mmsegmentation's ConvNeXt UPerNet ADE20K recipe: AdamW lr 1e-4 (absolute), weight
decay 0.05, stage-wise layer decay 0.9, warmup 1500 then poly to 0, 160k steps, 2 images per process
(x 8 GPUs = 16), 512 px crops, UPerHead 512 channels, auxiliary head weight 0.4, bf16, slide
evaluation every 16k steps. On a CPU pass --mixed-precision no. Several GPUs use SyncBatchNorm.

Outputs in --output-dir: config.yaml, log.jsonl (train rows: step, loss, lr; eval rows: mIoU, mAcc,
aAcc in percent, val_images, val_pixels, best_mIoU), per_class_iou.json (the latest evaluation),
best.safetensors and last.safetensors (with the model, class names and input size in their metadata),
checkpoints/step_N (resume exactly with --resume auto), final.yaml.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repo root, not finetune/, first on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from fcmae.tasks.segment import main as run  # noqa: E402
from fcmae.tasks.segment_predict import main as predict  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["predict"]:
        predict(argv[1:], prog="python finetune/segment.py predict")
    else:
        run(argv, description=__doc__)


if __name__ == "__main__":
    main()
