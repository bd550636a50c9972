"""Classification fine-tuning's config: its own fields, the recipe, and the linear-probe preset."""

from __future__ import annotations

from dataclasses import dataclass

from ...training.config import Config, help_field


@dataclass
class ClassifyTask:
    head_init_scale: float = help_field(
        "scale of the fresh head's initial weights (ConvNeXt V2: 0.001; timm: 1.0)", 0.001
    )
    linear_probe: bool = help_field("frozen encoder, trained head (final norm + classifier)", False)
    # augmentation: timm's, with the official ConvNeXt V2 fine-tuning recipe's defaults
    aa: str | None = help_field("RandAugment policy (timm's); none to switch off", "rand-m9-mstd0.5-inc1")
    color_jitter: float | None = help_field(
        "colour jitter, used only without --aa (timm turns it off under RandAugment)", 0.4
    )
    reprob: float = help_field("RandomErasing probability, pixel mode", 0.25)
    mixup: float = help_field("Mixup alpha (0: off)", 0.0)
    cutmix: float = help_field("CutMix alpha (0: off)", 0.0)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = help_field("label smoothing", 0.1)
    crop_pct: float | None = help_field("evaluation crop (default: 0.875 below 384 px, none from 384)")
    eval_batch_size: int | None = help_field("evaluation batch per process (default: --batch-size)")
    model_ema: bool = help_field("keep timm's EMA of the weights and evaluate it too", False)
    model_ema_decay: float = 0.9999


class FinetuneConfig(Config):
    """Classification fine-tuning (and linear probing). The defaults are the official ConvNeXt V2
    fine-tuning recipe's common part (AdamW, min lr 1e-6, RandAugment, RandomErasing 0.25, label
    smoothing 0.1, head init 0.001); the per-size values (lr, epochs, warmup, layer decay, drop path,
    Mixup/CutMix, EMA) are the presets ``configs/finetune/convnextv2_*.yaml``."""

    TASK = ClassifyTask
    DEFAULTS = dict(warmup_epochs=5.0, blr=5e-4, min_lr=1e-6, output_dir="outputs/finetune")
    UNUSED = frozenset(
        {"eval_every", "lr_milestones", "warmup_cap", "streaming", "num_examples", "stream_window", "stream_partitions"}
    )
    HELP = {
        "data": "folder with train/ and val/ class folders (or split parquet files, or a packed folder)",
        "dataset_name": "Hub dataset id with a label column",
        "layer_decay_type": "single (every block a layer: atto..tiny) | group (12 groups: base and larger), as "
        "the official code",
        "save_every": "also checkpoint every N optimizer steps (always at each epoch end)",
        "checkpoint": "classifier weights for --eval-only (e.g. best.safetensors)",
    }

    def check(self) -> None:
        if self.layer_decay_type not in ("single", "group"):
            raise ValueError(f"--layer-decay-type must be single or group; got {self.layer_decay_type!r}.")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(
                f"Mixup/CutMix pair each image with another in the batch: --batch-size must be even; "
                f"got {self.batch_size}."
            )

    def elastic_blocker(self) -> str | None:
        if self.mixup > 0 or self.cutmix > 0:
            return (
                "Mixup/CutMix pair images within each process's batch, so the pairs (and the run) change with "
                "the number of processes"
            )
        return None


# Linear probing (a quick read-out of pretraining): no augmentation beyond crop and flip, no
# regularisation; MAE's 90-epoch schedule. AdamW replaces MAE's LARS (one linear layer: any works).
LINEAR_PROBE = dict(
    aa=None,
    color_jitter=None,
    reprob=0.0,
    mixup=0.0,
    cutmix=0.0,
    smoothing=0.0,
    drop_path=0.0,
    layer_decay=1.0,
    weight_decay=0.0,
    blr=1e-3,
    epochs=90,
    warmup_epochs=10.0,
)


def choose_preset(flags: dict, file_values: dict) -> dict:
    return LINEAR_PROBE if {**file_values, **flags}.get("linear_probe") else {}
