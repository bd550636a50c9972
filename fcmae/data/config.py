"""The data config: one for every task (pretraining, classification, segmentation, detection) and for
the k-NN monitor. It says where the images are, how they are read and at what size the model sees them.

``input_size`` means one thing everywhere: the side of the square image the model is trained on (the
crop of pretraining, classification and segmentation, the large-scale-jitter crop of detection).
Other sizes have their own names (detection's ``train_short_side`` / ``eval_short_side``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def help_field(text: str, default=None, **kwargs):
    """A dataclass field whose ``--help`` line is ``text`` (``default_factory`` etc. pass through)."""
    if "default_factory" in kwargs:
        return dataclasses.field(metadata={"help": text}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class DataConfig:
    data: str | None = help_field(
        "local data: an image folder, parquet/arrow file(s), a folder packed by `fcmae data pack`, or a Hub dataset id"
    )
    dataset_name: str | None = help_field("Hub dataset id")
    dataset_config_name: str | None = help_field("Hub dataset configuration")
    train_split: str = help_field("the training split (a local train/ folder is 'train')", "train")
    val_split: str = help_field(
        "the validation split (a local val/ or validation/ folder is 'validation')", "validation"
    )
    image_column: str | None = help_field("column holding the images (default: the first Image column)")
    label_column: str | None = help_field(
        "column holding the labels (default: the first ClassLabel column, else label/labels/target)"
    )
    streaming: bool = help_field(
        "stream the shards instead of indexing the dataset (parquet, packed shards, Hub)", False
    )
    num_examples: int | None = help_field("streaming: dataset size when neither a manifest nor the source says")
    stream_window: int = help_field("streaming: rows shuffled together inside each partition (a bounded window)", 1024)
    stream_partitions: int | None = help_field(
        "streaming: partitions of each epoch's shard sequence (default: "
        "processes x workers of the first start); a multiple of every "
        "processes x workers you will resume with"
    )
    input_size: int = help_field("side of the square images the model trains on (a multiple of 32)", 224)
    in_chans: int = help_field("input channels: 3 for images; any N for multi-band arrays (.npy, TIFF)", 3)
    mean: list[float] | None = help_field("per-channel mean (default ImageNet's; required when --in-chans is not 3)")
    std: list[float] | None = help_field("per-channel std (default ImageNet's; required when --in-chans is not 3)")
    channel_axis: str = help_field(".npy / TIFF page stacks: (H, W, N) 'last' or (N, H, W) 'first'", "last")
    max_bad_fraction: float = help_field("stop when more than this fraction of the images cannot be read", 0.01)
    num_workers: int | None = help_field(
        "DataLoader workers per process (default: the CPUs Slurm gave the task divided among its processes, else 4)"
    )
    cache_dir: str | None = help_field("datasets' cache folder for Hub and parquet data")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag and the fix for any inconsistent value."""
        if self.input_size <= 0 or self.input_size % 32:
            raise ValueError(
                f"--input-size must be a positive multiple of 32 (the encoder's total stride); got "
                f"{self.input_size}. Try {max(32, round(self.input_size / 32) * 32)}."
            )
        if self.in_chans < 1:
            raise ValueError(f"--in-chans must be at least 1; got {self.in_chans}.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None and self.in_chans != 3:
                raise ValueError(
                    f"--in-chans {self.in_chans} needs --{name} with one value per channel; compute "
                    "them with: fcmae data stats DIR"
                )
            if value is not None and len(value) != self.in_chans:
                raise ValueError(f"--{name} has {len(value)} values for {self.in_chans} input channels.")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"--std must be positive; got {self.std}.")
        if self.channel_axis not in ("last", "first"):
            raise ValueError(f"--channel-axis must be last or first; got {self.channel_axis!r}.")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num-workers must be 0 or more; got {self.num_workers}.")
        if self.stream_window < 1 or (self.stream_partitions is not None and self.stream_partitions < 1):
            raise ValueError("--stream-window and --stream-partitions must be at least 1.")
        if self.data is not None and self.dataset_name is not None:
            raise ValueError("Give either --data (a path or Hub id) or --dataset-name, not both.")

    @property
    def source(self) -> str | None:
        return self.dataset_name or self.data
