"""Data: sources -> decoded images -> transforms -> loaders, with bad-file accounting.

Modules, each with one job (lower ones never import upper ones):
  listing     a local folder walked once (links followed), its files sorted into splits and labels
  sources     folder / parquet / arrow / Hub / streaming -> a datasets object with an 'image' column
  decode      file or bytes -> 8-bit RGB PIL image
  arrays      .npy / multi-band TIFF -> float32 (H, W, N) arrays, their transforms and statistics;
              Reader: which files are arrays and which RGB images
  transforms  pretraining, fine-tuning (timm RandAugment) and evaluation transforms; by_input pairs
              each with its array version
  samples     decode with bad-image accounting, stand-ins, augmentation seeded by (seed, epoch, index)
  loaders     epoch order, loaders with set_epoch, the pretraining loader, the reconstruction batch
  labelled    classification: labels and class names, its datasets and loaders

N channels: DataConfig.in_chans / mean / std / channel_axis (classification reads the same fields
of its config, with RGB defaults).

Tasks import from here, not from the modules inside."""
from .arrays import Reader, channel_stats, read_array
from .decode import decode_rgb, path_of, to_rgb
from .labelled import LabelledImages, build_train_loader, build_val_loader, load_labelled
from .listing import IMAGE_EXTENSIONS, SAMPLE_EXTENSIONS, TABLE_EXTENSIONS, class_labels, list_files, local_files
from .loaders import (EpochLoader, EpochSampler, PretrainLoader, build_pretrain_loader, epoch_loader,
                      recon_images)
from .samples import (BadImageCounter, ImageSamples, PretrainImages, StreamingPretrainImages, TooManyBadFiles,
                      check_bad_fraction, sample_seed, seeded)
from .sources import DEMO_DIR, DataConfig, folder_dataset, image_column, is_local, load_hub, load_images, load_source
from .transforms import (EVAL_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, by_input, eval_transform,
                         posterize, pretrain_transform, train_transform)

__all__ = ["DEMO_DIR", "EVAL_CROP_PCT", "IMAGE_EXTENSIONS", "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD",
           "BadImageCounter", "DataConfig", "Reader", "SAMPLE_EXTENSIONS", "TooManyBadFiles", "by_input",
           "channel_stats", "read_array", "EpochLoader", "EpochSampler", "ImageSamples", "LabelledImages",
           "PretrainImages", "PretrainLoader", "StreamingPretrainImages", "TABLE_EXTENSIONS", "build_pretrain_loader",
           "build_train_loader", "build_val_loader", "check_bad_fraction", "class_labels", "decode_rgb",
           "epoch_loader", "eval_transform", "folder_dataset", "image_column", "is_local", "list_files",
           "load_hub", "load_images", "load_labelled", "load_source", "local_files", "path_of", "posterize",
           "pretrain_transform", "recon_images", "sample_seed", "seeded", "to_rgb", "train_transform"]
