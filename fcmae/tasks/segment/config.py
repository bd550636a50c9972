"""Semantic segmentation's config: its own fields and mmsegmentation's ConvNeXt UPerNet ADE20K recipe."""

from __future__ import annotations

from dataclasses import dataclass

from ...data.segmentation import IGNORE_INDEX, RATIO_RANGE
from ...training.config import Config, help_field


@dataclass
class SegmentTask:
    head_channels: int = help_field("UPerHead channels (mmseg 512)", 512)
    aux_weight: float = help_field("loss weight of the auxiliary FCN head on stage 3 (mmseg 0.4)", 0.4)
    num_classes: int = help_field("classes the model predicts (ADE20K: 150)", 150)
    class_names: str | None = help_field("text file, one class name per line (default: class 0..N-1)")
    reduce_zero_label: bool = help_field("maps store classes as 1..N and 0 = other (ignored), as ADE20K", True)
    eval_mode: str = help_field(
        "whole | slide (windows of --input-size, stride 2/3 of it: mmseg's 341 at 512)", "slide"
    )
    eval_ms_flip: bool = help_field("multi-scale (0.5..1.75) + flip evaluation, as mmseg's aug_test", False)
    ratio_range: list[float] = help_field(
        "training rescale: the train scale (4S, S) times a ratio drawn from LOW,HIGH (mmseg's RandomResize "
        "ratio_range 0.5,2.0); 1,1 keeps the short side at S",
        default_factory=lambda: list(RATIO_RANGE),
    )
    photometric: bool = help_field("mmseg's PhotoMetricDistortion on the training crops", True)


class SegmentConfig(Config):
    """UPerNet semantic segmentation. The defaults are the official ConvNeXt UPerNet ADE20K recipe as
    mmsegmentation runs it (``convnext-*_upernet_8xb2-amp-160k_ade20k-512x512``): AdamW lr 1e-4,
    weight decay 0.05, stage-wise layer decay 0.9, 1500 warmup iterations then poly (power 1) to 0
    over 160k iterations, 2 images per GPU on 8 GPUs, crops of 512 (train scale (2048, 512), ratio
    0.5-2; evaluation at short side 512), an auxiliary FCN head weighted 0.4, sliding-window
    evaluation every 16k. Two departures: the warmup starts at lr 0 instead of lr x 1e-6 (one
    schedule function for every task; the difference is below 1e-10 of the lr), and mixed precision
    is bf16 rather than fp16 (no loss scaling). Per-size presets: ``configs/segment/``; short runs on
    small data: ``configs/segment/small_data.yaml``."""

    TASK = SegmentTask
    DEFAULTS = dict(
        input_size=512,
        batch_size=2,
        max_steps=160000,
        lr=1e-4,
        warmup_epochs=None,
        warmup_cap=1500,
        decay="poly",
        layer_decay=0.9,
        layer_decay_type="stage",
        eval_every=16000,
        mixed_precision="auto",
        save_every=16000,
        log_every=50,
        output_dir="outputs/segment",
    )
    UNUSED = frozenset({"streaming", "num_examples", "stream_window", "stream_partitions"})
    HELP = {
        "data": "ADE20K-layout folder (images/ and annotations/, training/ and validation/), or split "
        "parquet/arrow files",
        "dataset_name": "Hub dataset id with image and label-map columns (e.g. scene_parse_150)",
        "label_column": "column holding the label maps (default: annotation/label/... or the second Image column)",
        "input_size": "training crop S (train scale (4S, S), as mmseg's (2048, 512)); evaluation short side S",
        "layer_decay_type": "stage (mmseg's stage_wise for ConvNeXt) | single | group",
        "checkpoint": "--eval-only: a segmentation run dir or its best/last.safetensors",
    }

    def check(self) -> None:
        if self.layer_decay_type not in ("stage", "single", "group"):
            raise ValueError(f"--layer-decay-type must be stage, single or group; got {self.layer_decay_type!r}.")
        if len(self.ratio_range) != 2 or not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"--ratio-range takes LOW,HIGH, 0 < LOW <= HIGH (e.g. 0.5,2.0); got {self.ratio_range}.")
        if self.eval_mode not in ("whole", "slide"):
            raise ValueError(f"--eval-mode must be whole or slide; got {self.eval_mode!r}.")
        if not (self.data or self.dataset_name):
            raise ValueError("Give the data: --data DIR (ADE20K layout or split parquet files) or --dataset-name ID.")
        if not 1 < self.num_classes < IGNORE_INDEX:
            raise ValueError(
                f"--num-classes must be 2..254 (label maps are 8-bit, 255 is ignored); got {self.num_classes}."
            )
        if self.in_chans != 3 or self.mean is not None or self.std is not None:
            raise ValueError(
                "Segmentation reads RGB images normalised with ImageNet's mean and std (the encoders' "
                "pretraining statistics): --in-chans, --mean and --std are not supported here."
            )

    def elastic_blocker(self) -> str | None:
        return (
            "the UPerNet head's BatchNorm normalises each process's batch (SyncBatchNorm across GPUs), so its "
            "statistics change with the number of processes"
        )
