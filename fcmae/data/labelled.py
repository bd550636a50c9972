"""Labelled data for fine-tuning: sources -> (image, label) -> timm transforms -> loaders.

Sources: a local folder with ``train/`` and ``val/`` (or ``validation/``) class sub-folders, or
parquet/arrow split files with a label column; or a Hugging Face Hub dataset with a label column.
Labels come out as integers with class names: from a ``ClassLabel`` column, from the folder names,
or (string labels) sorted; integer labels without names are named by their value.

A sample is ``(image, label, ok)``. Training follows the pretraining data's rules (fcmae.data):
augmentation is a pure function of (seed, epoch, index), an unreadable image is counted and replaced
by the next readable sample (with its label). In validation, an unreadable image is counted and left
out of the accuracy (``ok`` False), never replaced: a stand-in would change the metric.
"""
from __future__ import annotations

import contextlib
import os

import datasets
import torch
from datasets import ClassLabel
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from . import sources as fdata

EVAL_CROP_PCT = 0.875  # below 384 px: resize to size / 0.875, centre crop (REFERENCE.md section 4)


def train_transform(input_size: int, aa: str | None, reprob: float, remode: str = "pixel", recount: int = 1,
                    color_jitter: float | None = 0.4):
    """timm's ImageNet training transform: RandomResizedCrop (bicubic), flip, RandAugment ``aa``,
    normalisation, RandomErasing (probability ``reprob``, per-pixel noise). ``color_jitter`` applies
    only without ``aa`` (timm switches it off under RandAugment, as the official recipe expects)."""
    return create_transform(input_size, is_training=True, auto_augment=aa or None, interpolation="bicubic",
                            re_prob=reprob, re_mode=remode, re_count=recount, color_jitter=color_jitter,
                            mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def eval_transform(input_size: int, crop_pct: float | None = None):
    """Below 384 px: resize the short side to ``input_size / crop_pct`` then centre crop; at 384 and
    above: resize straight to ``input_size`` x ``input_size`` (no crop). Bicubic, ImageNet mean/std."""
    bicubic = transforms.InterpolationMode.BICUBIC
    if input_size >= 384 and crop_pct is None:
        resize = [transforms.Resize((input_size, input_size), interpolation=bicubic)]
    else:
        resize = [transforms.Resize(int(input_size / (crop_pct or EVAL_CROP_PCT)), interpolation=bicubic),
                  transforms.CenterCrop(input_size)]
    return transforms.Compose([*resize, transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


# ----------------------------------------------------------------------------- sources

def _is_local(source: str) -> bool:
    return os.path.exists(os.path.expanduser(source)) or source.startswith(("/", ".", "~")) or source.count("/") > 1


def _split_name(split: str) -> str:
    return "validation" if split == "val" else split  # datasets names a val/ folder 'validation'


def load_splits(cfg, with_train: bool = True) -> tuple[datasets.Dataset | None, datasets.Dataset, str]:
    """(train, val, source description) from ``cfg.data`` / ``cfg.dataset_name``. ``with_train=False``
    (evaluation only) reads the validation split alone; train is then None."""
    if bool(cfg.data) == bool(cfg.dataset_name):
        raise ValueError("Give the labelled data: --data FOLDER (train/ and val/ class folders, or split parquet "
                         "files) or --dataset-name OWNER/NAME (a Hub dataset with a label column), not both.")
    source = cfg.dataset_name or cfg.data
    splits = (_split_name(cfg.train_split), _split_name(cfg.val_split))
    if cfg.dataset_name is None and _is_local(source):
        files = {}
        for split in splits if with_train else splits[1:]:
            builder, files[split] = fdata._local_files(os.path.expanduser(source), split)
        # one load for both splits: imagefolder then names classes from the folders of both
        both = datasets.load_dataset(builder, data_files=files)
        return both[splits[0]] if with_train else None, both[splits[1]], source
    hub = [fdata._load_hub(source, fdata.DataConfig(dataset_config_name=cfg.dataset_config_name, split=s))
           if with_train or s == cfg.val_split else None for s in (cfg.train_split, cfg.val_split)]
    return hub[0], hub[1], source


def _label_column(ds: datasets.Dataset, requested: str | None, source: str) -> str:
    columns = list(ds.features)
    if requested:
        if requested not in columns:
            raise ValueError(f"{source!r} has no label column {requested!r}. Available columns: {columns}. "
                             "Name it with --label-column.")
        return requested
    typed = [c for c, f in ds.features.items() if isinstance(f, ClassLabel)]
    found = (typed + [c for c in ("label", "labels", "target") if c in columns] + [None])[0]
    if found is None:
        raise ValueError(f"{source!r} has no ClassLabel column and no column named label/labels/target. "
                         f"Available columns: {columns}. Name the label column with --label-column.")
    return found


def labels_and_names(train: datasets.Dataset, val: datasets.Dataset, column: str, source: str):
    """(train labels, val labels, class names): integer labels 0..K-1 and their K names."""
    feature = train.features[column]
    raw_train, raw_val = list(train[column]), list(val[column])
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        val_feature = val.features[column]
        if isinstance(val_feature, ClassLabel) and list(val_feature.names) != names:
            raise ValueError(f"{source!r}: the train and val splits name their classes differently "
                             f"({names[:5]}... vs {list(val_feature.names)[:5]}...).")
        return raw_train, raw_val, names
    if all(isinstance(v, str) for v in raw_train):
        names = sorted(set(raw_train))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({v for v in raw_val if v not in index})
        if unknown:
            raise ValueError(f"{source!r}: the val split has classes the train split lacks: {unknown[:10]}.")
        return [index[v] for v in raw_train], [index[v] for v in raw_val], names
    if all(isinstance(v, int) and v >= 0 for v in raw_train + raw_val):
        return raw_train, raw_val, [str(i) for i in range(max(raw_train + raw_val) + 1)]
    raise ValueError(f"{source!r}: label column {column!r} must hold class names or non-negative integers; "
                     f"found e.g. {raw_train[:3]}.")


# ----------------------------------------------------------------------------- datasets and loaders

class LabelledImages(fdata._Images, torch.utils.data.Dataset):
    """``ds[(index, epoch)]`` or ``ds[index]`` -> (image (3, S, S), label, ok)."""

    def __init__(self, hf, labels, transform, seed=0, max_bad_fraction=0.01, train=True, input_size=224):
        super().__init__(hf, transform, seed, max_bad_fraction)
        self.labels, self.train, self.input_size = labels, train, input_size

    def __len__(self):
        return len(self.hf)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        image = self._decode(self.hf[index]["image"], index)
        if image is None and not self.train:  # left out of the metric, never replaced
            return torch.zeros(3, self.input_size, self.input_size), self.labels[index], False
        ok, label = image is not None, self.labels[index]
        for step in range(1, min(len(self), fdata.MIN_SEEN + 1)):  # stand-in: the next readable sample
            if image is not None:
                break
            with contextlib.suppress(Exception):
                image = fdata.decode_rgb(self.hf[(index + step) % len(self)]["image"])
                label = self.labels[(index + step) % len(self)]
        if image is None:
            raise RuntimeError(f"Image {index} and the {fdata.MIN_SEEN} after it could not be decoded.")
        if not self.train:
            return self.transform(image), label, ok
        return self._augment(image, epoch, index), label, ok


def load_labelled(cfg, with_train: bool = True):
    """(train, train labels, val, val labels, class names); the datasets hold one column, 'image'.
    With ``with_train=False`` train may be None (see ``load_splits``)."""
    train, val, source = load_splits(cfg, with_train)
    column = _label_column(train if train is not None else val, cfg.label_column, source)
    train_labels, val_labels, names = labels_and_names(train if train is not None else val, val, column, source)
    train = fdata._image_column(train, cfg.image_column, source) if train is not None else None
    val = fdata._image_column(val, cfg.image_column, source)
    if len(val) == 0:
        raise ValueError(f"{source!r}: the validation split {cfg.val_split!r} is empty.")
    return train, train_labels, val, val_labels, names


def build_train_loader(cfg, train, labels, world_size: int = 1, pin_memory: bool = False):
    """An ``fcmae.data.PretrainLoader`` over an ``EpochSampler`` (call ``set_epoch``), full batches only."""
    if len(train) // world_size // cfg.batch_size == 0:
        raise ValueError(f"{len(train)} training images are too few for batch size {cfg.batch_size} on {world_size} "
                         "process(es) (batches are full, the incomplete last one is dropped). Lower --batch-size.")
    tf = train_transform(cfg.input_size, cfg.aa, cfg.reprob, color_jitter=cfg.color_jitter)
    ds = LabelledImages(train, labels, tf, cfg.seed, cfg.max_bad_fraction, True, cfg.input_size)
    generator = torch.Generator().manual_seed(cfg.seed)  # DataLoader's base-seed draw, not the global RNG
    return fdata.PretrainLoader(ds, sampler=fdata.EpochSampler(len(ds), cfg.seed), batch_size=cfg.batch_size,
                                num_workers=cfg.num_workers, drop_last=True, generator=generator,
                                pin_memory=pin_memory)


def build_val_loader(cfg, val, labels, pin_memory: bool = False):
    """Every sample once, in order (``accelerator.prepare`` shards it; ``gather_for_metrics`` drops
    the padding)."""
    ds = LabelledImages(val, labels, eval_transform(cfg.input_size, cfg.crop_pct), cfg.seed, cfg.max_bad_fraction,
                        False, cfg.input_size)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.eval_batch_size or cfg.batch_size,
                                       num_workers=cfg.num_workers, shuffle=False, pin_memory=pin_memory)
