"""Sources: a local image folder, .parquet/.arrow files, or a Hugging Face Hub dataset (map-style or
streamed) -> a datasets object with one column 'image' of type Image(decode=False): {'bytes', 'path'}
dicts, decoded later by fcmae.data.decode.decode_rgb. Local folders are listed by fcmae.data.listing."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import ClassLabel, Features
from datasets import Image as ImageFeature
from datasets.table import InMemoryTable

from .config import DataConfig
from .listing import TABLE_EXTENSIONS, local_files

DEMO_DIR = Path(__file__).parents[1] / "assets" / "demo"


def is_local(source: str) -> bool:
    """A Hub id is 'name' or 'owner/name'; anything else that looks like a path is a (maybe missing) path."""
    source = os.fspath(source)
    return (
        os.path.exists(os.path.expanduser(source))
        or glob.has_magic(source)
        or source.count("/") > 1
        or source.startswith(("/", ".", "~"))
        or source.lower().endswith(TABLE_EXTENSIONS)
    )


def load_images(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """The source as a datasets Dataset (IterableDataset if cfg.streaming) with a single column
    'image' of type Image(decode=False): {'bytes', 'path'} dicts, decoded later by `decode_rgb`."""
    return load_source(cfg)[0]


def load_source(cfg: DataConfig) -> tuple[datasets.Dataset | datasets.IterableDataset, int | None]:
    """(`load_images(cfg)`, its number of examples; None for a stream that cannot tell)."""
    if cfg.data is not None and cfg.dataset_name is not None:
        raise ValueError("Give either data (a path or Hub id) or dataset_name, not both.")
    source = os.fspath(cfg.dataset_name or cfg.data or DEMO_DIR)
    if cfg.dataset_name is None and is_local(source):
        builder, files = local_files(source, cfg.train_split)
        num = count_rows(builder, files) if cfg.streaming else None
        if builder == "imagefolder":
            ds = folder_dataset(files)
            ds = ds.to_iterable_dataset() if cfg.streaming else ds  # the file list is cheap to index first
        else:
            ds = datasets.load_dataset(
                builder,
                data_files={cfg.train_split: files},
                split=cfg.train_split,
                streaming=cfg.streaming,
                cache_dir=cfg.cache_dir,
            )
        num = len(ds) if num is None else num
    else:
        ds = load_hub(source, cfg.dataset_config_name, cfg.train_split, cfg.streaming, cfg.cache_dir)
        split_info = (ds.info.splits or {}).get(cfg.train_split)
        num = len(ds) if not cfg.streaming else split_info.num_examples if split_info else None
    if cfg.streaming and cfg.num_examples is not None:
        num = cfg.num_examples
    if num == 0:
        raise ValueError(f"The dataset {source!r} (split {cfg.train_split!r}) has no rows.")
    return image_column(ds, cfg.image_column, source), num


def folder_dataset(
    files: list[str], labels: list[int] | None = None, names: list[str] | None = None
) -> datasets.Dataset:
    """What datasets' imagefolder builder gives for these files, built in memory (no cache files):
    'image' {'bytes': None, 'path'} and, with labels, 'label' as a ClassLabel of ``names``."""
    paths = pa.array(list(files), pa.string())  # the arrow layout of Image: struct<bytes, path>
    columns = {"image": pa.StructArray.from_arrays([pa.nulls(len(paths), pa.binary()), paths], ["bytes", "path"])}
    features = {"image": ImageFeature(decode=False)}
    if labels is not None:
        columns["label"], features["label"] = pa.array(list(labels), pa.int64()), ClassLabel(names=list(names))
    # built as arrow columns: from_dict + cast would encode 1.28M paths one by one in Python
    return datasets.Dataset(InMemoryTable(pa.table(columns)), info=datasets.DatasetInfo(features=Features(features)))


def count_rows(builder: str, files: list[str]) -> int:
    if builder == "imagefolder":
        return len(files)
    if builder == "parquet":  # from the footers: nothing is decoded
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return sum(b.num_rows for f in files for b in pa.ipc.open_stream(pa.memory_map(f)))  # datasets' format


def load_hub(
    name: str,
    config_name: str | None = None,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """A Hub dataset's split, with an error that says what to do when it cannot be had."""
    try:
        return datasets.load_dataset(name, config_name, split=split, streaming=streaming, cache_dir=cache_dir)
    except (ConnectionError, FileNotFoundError) as e:
        hint = (
            "Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local "
            "cache: it needs network access, or a local copy"
            if datasets.config.HF_HUB_OFFLINE
            else "Check the name, or use a local copy"
        )
        raise RuntimeError(
            f"{name!r} is not a local path, so it was looked up as a Hugging Face Hub dataset, and "
            f"that failed ({type(e).__name__}: {e}). {hint}: an image folder or .parquet/.arrow files "
            "given as data (--data)."
        ) from None


def image_column(ds, requested: str | None, source: str):
    """``ds`` reduced to its image column, renamed 'image' and typed Image(decode=False)."""
    features = ds.features or {}
    columns = list(features) or list(next(iter(ds)))  # a stream may not declare its features
    if requested is not None:
        column = requested if requested in columns else None
    else:
        typed = [c for c, f in features.items() if isinstance(f, ImageFeature)]
        column = (typed + [c for c in ("image", "img") if c in columns] + [None])[0]
    if column is None:
        wanted = f"column {requested!r}" if requested else "a column of datasets Image type or named 'image'/'img'"
        raise ValueError(
            f"{source!r} has no {wanted}. Available columns: {columns}. "
            "Name the image column with DataConfig.image_column (--image-column)."
        )
    ds = ds.select_columns([column])
    if column != "image":
        ds = ds.rename_column(column, "image")
    return ds.cast_column("image", ImageFeature(decode=False))
