"""Labelled data for fine-tuning: sources -> (image, label) -> timm transforms -> loaders.

N-channel data (``cfg.in_chans`` not 3: .npy or multi-band TIFF files, fcmae.data.arrays) gets the
geometric part of the recipe only: RandomResizedCrop, flip, RandomErasing (``--reprob``). RandAugment
(``--aa``) and colour jitter are defined on RGB values: for arrays they are skipped, with a warning.
Every function reads a ``DataConfig`` (the same one every task and the k-NN monitor use).

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

import warnings

import datasets
import torch
from datasets import ClassLabel

from .arrays import Reader
from .config import DataConfig
from .listing import class_labels, local_files
from .loaders import EpochLoader, epoch_loader, resolve_workers
from .samples import ImageSamples
from .sources import folder_dataset, image_column, is_local, load_hub
from .transforms import by_input, eval_transform  # noqa: F401 - eval_transform: imported from here too

# ----------------------------------------------------------------------------- sources


def _split_name(split: str) -> str:
    return "validation" if split == "val" else split  # datasets names a val/ folder 'validation'


def load_splits(cfg: DataConfig, with_train: bool = True) -> tuple[datasets.Dataset | None, datasets.Dataset, str]:
    """(train, val, source description) from ``cfg.data`` / ``cfg.dataset_name``. ``with_train=False``
    (evaluation only) reads the validation split alone; train is then None."""
    if bool(cfg.data) == bool(cfg.dataset_name):
        raise ValueError(
            "Give the labelled data: --data FOLDER (train/ and val/ class folders, or split parquet "
            "files) or --dataset-name OWNER/NAME (a Hub dataset with a label column), not both."
        )
    source = cfg.dataset_name or cfg.data
    if cfg.dataset_name is None and is_local(source):
        splits = (_split_name(cfg.train_split), _split_name(cfg.val_split))
        found = {split: local_files(source, split) for split in (splits if with_train else splits[1:])}
        builders = sorted({builder for builder, _ in found.values()})
        if len(builders) > 1:
            raise ValueError(
                f"{source!r}: the splits hold different kinds of files ({', '.join(builders)}); "
                "give every split as image folders, or every split as parquet/arrow files."
            )
        files = {split: split_files for split, (_, split_files) in found.items()}
        if builders[0] == "imagefolder":  # classes named from the folders of both splits, as datasets does
            names, labels = class_labels(files) or (None, {})  # None: no labels (one folder, or mixed depths)
            both = {split: folder_dataset(fs, labels.get(split), names) for split, fs in files.items()}
        else:
            both = datasets.load_dataset(builders[0], data_files=files)
        return both[splits[0]] if with_train else None, both[splits[1]], source
    hub = [
        load_hub(source, cfg.dataset_config_name, s) if with_train or s == cfg.val_split else None
        for s in (cfg.train_split, cfg.val_split)
    ]
    return hub[0], hub[1], source


def _label_column(ds: datasets.Dataset, requested: str | None, source: str) -> str:
    columns = list(ds.features)
    if requested:
        if requested not in columns:
            raise ValueError(
                f"{source!r} has no label column {requested!r}. Available columns: {columns}. "
                "Name it with --label-column."
            )
        return requested
    typed = [c for c, f in ds.features.items() if isinstance(f, ClassLabel)]
    found = (typed + [c for c in ("label", "labels", "target", "cls") if c in columns] + [None])[0]  # cls: webdataset
    if found is None:
        raise ValueError(
            f"{source!r} has no ClassLabel column and no column named label/labels/target/cls. "
            f"Available columns: {columns}. Name the label column with --label-column."
        )
    return found


def labels_and_names(train: datasets.Dataset, val: datasets.Dataset, column: str, source: str):
    """(train labels, val labels, class names): integer labels 0..K-1 and their K names."""
    feature = train.features[column]
    raw_train, raw_val = list(train[column]), list(val[column])
    if isinstance(feature, ClassLabel):
        names = list(feature.names)
        val_feature = val.features[column]
        if isinstance(val_feature, ClassLabel) and list(val_feature.names) != names:
            raise ValueError(
                f"{source!r}: the train and val splits name their classes differently "
                f"({names[:5]}... vs {list(val_feature.names)[:5]}...)."
            )
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
    raise ValueError(
        f"{source!r}: label column {column!r} must hold class names or non-negative integers; "
        f"found e.g. {raw_train[:3]}."
    )


# ----------------------------------------------------------------------------- datasets and loaders


class LabelledImages(ImageSamples, torch.utils.data.Dataset):
    """``ds[(index, epoch)]`` or ``ds[index]`` -> (image (C, S, S), label, ok); C is the reader's
    channel count (3 for images). Training samples with ``with_index``: (image, label, ok, index), the
    index keying the sample's drop path."""

    with_index = False

    def __init__(
        self,
        hf,
        labels,
        transform,
        seed=0,
        max_bad_fraction=0.01,
        train=True,
        input_size=224,
        reader: Reader | None = None,
    ):
        super().__init__(hf, transform, seed, max_bad_fraction, reader)
        self.labels, self.train, self.input_size = labels, train, input_size

    def __len__(self):
        return len(self.hf)

    def __getitem__(self, key):
        index, epoch = self.key(key)
        image, source, ok = self.read(index, stand_in=self.train)  # a stand-in brings its own label
        if image is None:  # validation: left out of the metric, never replaced
            return torch.zeros(self.reader.in_chans, self.input_size, self.input_size), self.labels[index], False
        if not self.train:
            return self.transform(image), self.labels[source], ok
        out = self.augment(image, epoch, index), self.labels[source], ok
        return (*out, index) if self.with_index else out


def load_labelled(cfg: DataConfig, with_train: bool = True):
    """(train, train labels, val, val labels, class names); the datasets hold one column, 'image'.
    With ``with_train=False`` train may be None (see ``load_splits``)."""
    train, val, source = load_splits(cfg, with_train)
    column = _label_column(train if train is not None else val, cfg.label_column, source)
    train_labels, val_labels, names = labels_and_names(train if train is not None else val, val, column, source)
    train = image_column(train, cfg.image_column, source) if train is not None else None
    val = image_column(val, cfg.image_column, source)
    if len(val) == 0:
        raise ValueError(f"{source!r}: the validation split {cfg.val_split!r} is empty.")
    return train, train_labels, val, val_labels, names


def _reader(cfg: DataConfig) -> Reader:
    return Reader(cfg.in_chans, cfg.channel_axis)


def build_train_loader(
    cfg: DataConfig,
    train,
    labels,
    batch_size: int,
    seed: int = 0,
    aa: str | None = None,
    reprob: float = 0.0,
    color_jitter: float | None = None,
    world_size: int = 1,
    pin_memory: bool = False,
    with_index: bool = False,
) -> EpochLoader:
    """An ``EpochLoader`` over an ``EpochSampler`` (call ``set_epoch``), full batches only, with timm's
    training transform (``aa``: RandAugment, ``reprob``: RandomErasing, ``color_jitter`` without aa).
    ``with_index``: batches also hold each sample's index (the key of its drop path)."""
    if len(train) // world_size // batch_size == 0:
        raise ValueError(
            f"{len(train)} training images are too few for batch size {batch_size} on {world_size} "
            "process(es) (batches are full, the incomplete last one is dropped). Lower --batch-size."
        )
    reader = _reader(cfg)
    if reader.arrays and (aa or color_jitter):
        warnings.warn(
            f"--in-chans {reader.in_chans}: --aa {aa} and --color-jitter {color_jitter} apply to RGB "
            "images only; arrays get RandomResizedCrop, flip and RandomErasing (--reprob).",
            stacklevel=2,
        )
    tf = by_input("train", cfg.input_size, cfg.mean, cfg.std, aa=aa, reprob=reprob, color_jitter=color_jitter)
    ds = LabelledImages(train, labels, tf, seed, cfg.max_bad_fraction, True, cfg.input_size, reader)
    ds.with_index = with_index
    return epoch_loader(ds, batch_size, resolve_workers(cfg.num_workers), seed, pin_memory)


def build_val_loader(
    cfg: DataConfig, val, labels, batch_size: int, crop_pct: float | None = None, pin_memory: bool = False
):
    """Every sample once, in order (``accelerator.prepare`` shards it; ``gather_for_metrics`` drops
    the padding), with the evaluation transform."""
    tf = by_input("eval", cfg.input_size, cfg.mean, cfg.std, crop_pct=crop_pct)
    ds = LabelledImages(val, labels, tf, 0, cfg.max_bad_fraction, False, cfg.input_size, _reader(cfg))
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, num_workers=resolve_workers(cfg.num_workers), shuffle=False, pin_memory=pin_memory
    )
