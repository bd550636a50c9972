"""Detection's config: its own fields, the recipe, and the deprecated names of its sizes."""

from __future__ import annotations

from dataclasses import dataclass

from ...data import detection as det
from ...training.config import Alias, Config, help_field
from .model import HEAD_INITS


@dataclass
class DetectTask:
    jitter: str = help_field(
        "multiscale (ConvNeXt 3x) | lsj (large-scale jitter, ConvNeXt-V2 mmdet config) | fixed (flips only, "
        "at the evaluation resize of --train-short-side)",
        "multiscale",
    )
    train_short_side: int = help_field(
        "multiscale: the largest training short side S; short sides S x (480..800)/800, long sides <= S x 1333/800", 800
    )
    crop_size: int = help_field("lsj: the square training crop (images fit in it x 0.1..2, then cropped)", 1024)
    eval_short_side: int | None = help_field(
        "evaluation short side, long side <= x 1333/800 (default: --train-short-side)"
    )
    masks: bool = help_field("Mask R-CNN; --no-masks: Faster R-CNN (boxes only)", True)
    head_init: str = help_field(
        "small (mask logits from N(0, 0.001), as detectron2) | torchvision (kaiming fan_out: with few classes "
        "the first mask loss is ~3, the largest part of the loss)",
        "small",
    )
    train_ann: str | None = help_field("COCO annotation JSON of the training images (overrides --data)")
    train_images: str | None = help_field("folder of the training images")
    val_ann: str | None = help_field("COCO annotation JSON of the validation images")
    val_images: str | None = help_field("folder of the validation images")

    @property
    def train_scale(self) -> int:
        """The size the training jitter works at: the short side (multiscale) or the crop (lsj)."""
        return self.crop_size if self.jitter == "lsj" else self.train_short_side

    @property
    def eval_size(self) -> int:
        return self.eval_short_side or self.train_short_side


def _old_input_size(value, given: dict) -> dict:
    """``--input-size S`` as it meant in detection: the multiscale short side (or the LSJ crop), and the
    evaluation short side unless one is given."""
    target = "crop_size" if given.get("jitter") == "lsj" else "train_short_side"
    return {target: value, "eval_short_side": given.get("eval_short_side") or given.get("eval_size") or value}


class DetectConfig(Config):
    """Mask R-CNN (or Faster R-CNN, ``--no-masks``) object detection. The defaults are the ConvNeXt
    Mask R-CNN 3x recipe (facebookresearch/ConvNeXt object_detection configs; mmdetection's ConvNeXt-V2
    project keeps the optimiser): AdamW lr 1e-4 (absolute), weight decay 0.05, mmdetection's
    'layer_wise' layer decay 0.95, 36 epochs with the lr x 0.1 at epochs 27 and 33 after a linear
    warmup of 500 iterations, 2 images per GPU on 8 GPUs, multi-scale training (short side 480..800,
    long side <= 1333), evaluation at 800 x 1333. Departures: the warmup starts at lr 0 instead of
    lr x 0.001 (one warmup rule for every task), mixed precision is bf16 rather than fp16, and
    ``--lr-milestones`` are read as fractions of ``--epochs`` so a run shortened with ``--max-steps``
    keeps the schedule's shape. Per-size presets: ``configs/detect/``."""

    TASK = DetectTask
    DEFAULTS = dict(
        batch_size=2,
        epochs=36,
        lr=1e-4,
        warmup_epochs=None,
        warmup_cap=500,
        decay="step",
        lr_milestones=[27, 33],
        layer_decay=0.95,
        layer_decay_type="layer_wise",
        drop_path=0.1,
        mixed_precision="auto",
        save_every=5000,
        log_every=50,
        output_dir="outputs/detect",
    )
    UNUSED = frozenset(
        {
            "input_size",
            "image_column",
            "label_column",
            "streaming",
            "num_examples",
            "stream_window",
            "stream_partitions",
        }
    )
    ALIASES = {
        "input_size": Alias(
            "train_short_side",
            "use --train-short-side (multiscale), --crop-size (lsj) and --eval-short-side",
            _old_input_size,
        ),
        "eval_size": Alias("eval_short_side"),
    }
    HELP = {
        "data": "COCO 2017 layout: annotations/instances_{train,val}2017.json, {train,val}2017/",
        "dataset_name": "Hub dataset id in the usual detection schema (image, objects.bbox/category)",
        "from_fcmae": "pretrained encoder: any source fcmae finetune takes (a pretraining run, "
        "encoder/fcmae.safetensors, official/timm/transformers, hf-hub:); none: from scratch",
        "layer_decay_type": "layer_wise (mmdet's ConvNeXt rule) | single (one id per block)",
        "batch_size": "images per process (ConvNeXt 3x: 2 x 8 GPUs = 16)",
        "checkpoint": "--eval-only: a detection run dir or its best/last.safetensors",
    }

    def check(self) -> None:
        if self.jitter not in det.JITTERS:
            raise ValueError(f"--jitter must be one of {', '.join(det.JITTERS)}; got {self.jitter!r}.")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"--head-init must be one of {', '.join(HEAD_INITS)}; got {self.head_init!r}.")
        if self.layer_decay_type not in ("layer_wise", "single"):
            raise ValueError(f"--layer-decay-type must be layer_wise or single; got {self.layer_decay_type!r}.")
        for name in ("train_short_side", "crop_size", "eval_short_side"):
            value = getattr(self, name)
            if value is not None and value < 32:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 32; got {value}.")
        if self.in_chans != 3 or self.mean is not None or self.std is not None:
            raise ValueError(
                "Detection reads RGB images normalised with ImageNet's statistics: --in-chans, --mean "
                "and --std are not supported here."
            )
        need = ("val",) if self.eval_only else ("train", "val")
        for split in need:
            ann, images = getattr(self, f"{split}_ann"), getattr(self, f"{split}_images")
            if not (self.data or self.dataset_name or (ann and images)):
                raise ValueError(
                    f"Give the data: --data COCO_DIR, --dataset-name ID, or --{split}-ann JSON with "
                    f"--{split}-images DIR."
                )

    def elastic_blocker(self) -> str | None:
        return (
            "torchvision's RPN and RoI heads sample their training boxes with each process's random stream, "
            "which changes with the number of processes"
        )
