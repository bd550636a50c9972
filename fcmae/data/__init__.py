"""Data: sources -> decoded images -> transforms -> loaders, with bad-file accounting.

Modules, each with one job (lower ones never import upper ones):
  config      DataConfig: the one data config of every task and of the k-NN monitor
  listing     a local folder walked once (links followed), its files sorted into splits and labels
  sources     folder / parquet / arrow / Hub / streaming -> a datasets object with an 'image' column
  decode      file or bytes -> 8-bit RGB PIL image
  arrays      .npy / multi-band TIFF -> float32 (H, W, N) arrays, their transforms and statistics;
              Reader: which files are arrays and which RGB images
  transforms  pretraining, fine-tuning (timm RandAugment) and evaluation transforms; by_input pairs
              each with its array version
  samples     decode with bad-image accounting, stand-ins, augmentation seeded by (seed, epoch, index)
  shards      sharded datasets (manifest, parquet footers, webdataset tars) at any fsspec URL, read with retries
  stream      shard-aware streaming: an epoch plan of (seed, epoch), each shard read once, resume by position
  loaders     epoch order, loaders with set_epoch, the pretraining loader, the reconstruction batch
  pack        an image folder -> parquet / webdataset shards + manifest.json (`fcmae data pack`)
  labelled    classification: labels and class names, its datasets and loaders

N channels: DataConfig.in_chans / mean / std / channel_axis (classification reads the same fields
of its config, with RGB defaults).

Tasks import from here, not from the modules inside."""

from .arrays import Reader, channel_stats, read_array
from .config import DataConfig, help_field
from .decode import decode_rgb, image_paths, path_of, read_images, report_unreadable, to_rgb
from .labelled import LabelledImages, build_train_loader, build_val_loader, load_labelled
from .listing import IMAGE_EXTENSIONS, SAMPLE_EXTENSIONS, TABLE_EXTENSIONS, class_labels, list_files, local_files
from .loaders import (
    EpochLoader,
    EpochSampler,
    PretrainLoader,
    build_pretrain_loader,
    epoch_loader,
    recon_images,
    resolve_workers,
    stream_shards,
)
from .samples import (
    BadImageCounter,
    ImageSamples,
    PretrainImages,
    StreamingPretrainImages,
    TooManyBadFiles,
    check_bad_fraction,
    sample_seed,
    seeded,
)
from .shards import ShardSet, discover
from .sources import DEMO_DIR, folder_dataset, image_column, is_local, load_hub, load_images, load_source
from .stream import StreamLoader, build_stream_loader
from .transforms import (
    EVAL_CROP_PCT,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    by_input,
    eval_transform,
    posterize,
    pretrain_transform,
    train_transform,
)

__all__ = [
    "DEMO_DIR",
    "EVAL_CROP_PCT",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGE_EXTENSIONS",
    "SAMPLE_EXTENSIONS",
    "TABLE_EXTENSIONS",
    "BadImageCounter",
    "DataConfig",
    "EpochLoader",
    "EpochSampler",
    "ImageSamples",
    "LabelledImages",
    "PretrainImages",
    "PretrainLoader",
    "Reader",
    "ShardSet",
    "StreamLoader",
    "StreamingPretrainImages",
    "TooManyBadFiles",
    "build_pretrain_loader",
    "build_stream_loader",
    "build_train_loader",
    "build_val_loader",
    "by_input",
    "channel_stats",
    "check_bad_fraction",
    "class_labels",
    "decode_rgb",
    "discover",
    "epoch_loader",
    "eval_transform",
    "folder_dataset",
    "help_field",
    "image_column",
    "image_paths",
    "is_local",
    "list_files",
    "load_hub",
    "load_images",
    "load_labelled",
    "load_source",
    "local_files",
    "path_of",
    "posterize",
    "pretrain_transform",
    "read_array",
    "read_images",
    "recon_images",
    "report_unreadable",
    "resolve_workers",
    "sample_seed",
    "seeded",
    "stream_shards",
    "to_rgb",
    "train_transform",
]
