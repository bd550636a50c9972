"""Fine-tune (or linear-probe, or evaluate) a ConvNeXt classifier, typically from an FCMAE encoder.

Usage:
    python finetune/run.py --config configs/finetune/convnextv2_atto_224.yaml --from-fcmae outputs/pretrain \\
        --data /path/to/imagenet
    accelerate launch finetune/run.py --config configs/finetune/convnextv2_base_224.yaml \\
        --from-fcmae convnextv2_base_1k_224_fcmae.pt --data /path/to/imagenet --output-dir outputs/ft_base
    python finetune/run.py --linear-probe --from-fcmae outputs/pretrain --data /path/to/images
    python finetune/run.py --eval-only --checkpoint outputs/finetune/best.safetensors --data /path/to/images
    python finetune/run.py --help                      # every field; any of them is a flag

--data: a folder with train/ and val/ (or validation/) class sub-folders, or split parquet files;
--dataset-name OWNER/NAME: a Hub dataset with a label column (--label-column, --image-column,
--train-split, --val-split). --from-fcmae: a pretraining output directory (its encoder.safetensors),
encoder.safetensors, fcmae.safetensors, a checkpoint directory, the official MinkowskiEngine training
checkpoint or released *_fcmae.pt, a timm or transformers export, or hf-hub:owner/name.
lr = blr x effective batch / 256 unless --lr is given.

Precedence: defaults < linear-probe preset (with --linear-probe) < --config YAML < flags.
Outputs in --output-dir: config.yaml, labels.txt, log.jsonl (per epoch: train_loss, lr, acc1, acc5,
ema_acc1, ema_acc5), best.safetensors, best_ema.safetensors (with --model-ema), last.safetensors,
checkpoints/step_N (resume with --resume auto), final.yaml.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repo root, not finetune/, first on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from fcmae.tasks.classify import main as run  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    run(argv, description=__doc__)


if __name__ == "__main__":
    main()
