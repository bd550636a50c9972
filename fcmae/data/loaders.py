"""Loaders: batches in an order that is a pure function of (seed, epoch), sharded across processes.

What the training loop does:
- Count bad images in the main process. Worker counters never reach it (fcmae.data.samples).
  Each step, add `(~ok).sum()` and `ok.numel()` to device tensors; now and then reduce them and call
  `check_bad_fraction` (no per-step host sync), or feed `BadImageCounter.update(accelerator.gather(ok))`.
- `loader.set_epoch(epoch)` before each epoch, on this loader or on the one returned by
  `accelerator.prepare`. Order and augmentation are pure functions of (seed, epoch, index): they
  depend neither on num_workers nor on the process. Keep persistent_workers off.
- Resume mid-epoch: `loader.set_epoch(epoch)`, then `accelerator.skip_first_batches(loader, k)`.
  The batches that follow are bitwise identical to those of the interrupted run. A sharded stream
  (`fcmae.data.stream.StreamLoader`, below) resumes without reading the first k batches:
  `loader.start_at(epoch, k)`, and `loader.state_dict(epoch, k)` / `load_state_dict(state)` carry
  its position through the checkpoint (skip_first_batches still works on it, reading what it skips).
- Map-style: `accelerator.prepare(loader)` shards it. Streaming: the loader already holds this
  rank's share, so do not prepare it (that would shard it twice); move batches to the device.

Streaming (`DataConfig.streaming`): parquet or webdataset shards (a folder written by `fcmae data
pack`, with its manifest; .parquet / .tar files or globs, local or at any fsspec URL; a Hub
dataset stored as parquet) go through fcmae.data.stream: each shard read once per epoch, an order
that depends on neither workers nor processes. Other sources (image folders, .arrow files, Hub
datasets in other formats) are streamed with datasets' IterableDataset as before.
"""

from __future__ import annotations

import os
import warnings

import torch
from datasets.distributed import split_dataset_by_node

from .arrays import Reader
from .config import DataConfig
from .samples import PretrainImages, StreamingPretrainImages, sample_seed
from .shards import ShardSet, discover, hub_shards, is_url
from .sources import DEMO_DIR, is_local, load_source
from .stream import StreamLoader, build_stream_loader
from .transforms import by_input

DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


def resolve_workers(num_workers: int | None) -> int:
    """``--num-workers``, else, inside a Slurm allocation, the CPUs Slurm gave the task
    (``SLURM_CPUS_PER_TASK``) divided among its processes (torchrun's ``LOCAL_WORLD_SIZE``) less one
    for the process itself (at least 1), else 4 (at most the machine's CPUs)."""
    if num_workers is not None:
        return num_workers
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():
        return max(1, int(cpus) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or 1)) - 1)
    return DEFAULT_WORKERS


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of range(n) that depends only on (seed, epoch). It yields (index, epoch), so
    workers need no epoch state. Accelerate's sharded batch sampler passes these keys through."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # accelerate's prepared loader calls this one
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
        return iter([(i, self.epoch) for i in torch.randperm(self.n, generator=g).tolist()])


class EpochLoader(torch.utils.data.DataLoader):
    """A DataLoader whose `set_epoch` reaches its sampler and its dataset."""

    def set_epoch(self, epoch: int) -> None:
        for part in (getattr(self.batch_sampler, "sampler", None), self.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)


PretrainLoader = EpochLoader  # the name fcmae.data has always exported


def epoch_loader(
    dataset, batch_size: int, num_workers: int = 0, seed: int = 0, pin_memory: bool = False, collate_fn=None
) -> EpochLoader:
    """Full batches of a map-style dataset (keys (index, epoch)), in `EpochSampler` order.
    ``collate_fn``: e.g. lists for detection targets (default: stacked tensors)."""
    generator = torch.Generator().manual_seed(seed)  # DataLoader's base-seed draw, not the global RNG
    return EpochLoader(
        dataset,
        sampler=EpochSampler(len(dataset), seed),
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=True,
        generator=generator,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
    )


def stream_shards(cfg: DataConfig) -> ShardSet | None:
    """The shards a streamed source is made of (fcmae.data.shards), or None for a source that
    datasets' IterableDataset streams (image folders, .arrow files, Hub datasets not in parquet)."""
    source = os.fspath(cfg.dataset_name or cfg.data or DEMO_DIR)
    if cfg.dataset_name is None and (is_url(source) or is_local(source)):
        return discover(source, cfg.train_split, cfg.image_column)
    try:  # needs the network; without it, the datasets stream below says what went wrong
        return hub_shards(source, cfg.dataset_config_name, cfg.train_split, cfg.image_column, cfg.cache_dir)
    except Exception:  # noqa: BLE001
        return None


def build_pretrain_loader(
    cfg: DataConfig,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    transform=None,
    pin_memory: bool = False,
    with_index: bool = False,
) -> EpochLoader | StreamLoader:
    """A loader of (images (B, C, S, S), ok (B,)) batches with drop_last, set to `epoch`. C is
    cfg.in_chans; images are normalised with cfg.mean / cfg.std (ImageNet's if None). ``with_index``:
    batches also hold each sample's global index (B,), the key of its masks and drop path.

    Streaming sharded data (parquet / webdataset shards, `stream_shards`): a `StreamLoader`
    (fcmae.data.stream), each shard read once per epoch by one (rank, worker), the order a function
    of (seed, epoch) only. Every rank yields num_examples // (batch_size x world_size) batches.
    Otherwise:

    Map-style: every rank builds the same loader, and `accelerator.prepare` shards it. rank and
    world_size only check that each rank gets a batch. Streaming: the stream is shuffled (seed +
    epoch) and split with split_dataset_by_node(strategy="examples"), so rank r takes every
    world_size-th example. Every rank yields num_examples // world_size // batch_size batches.
    The remainder (fewer than batch_size * world_size examples, a different part each epoch)
    is dropped. "examples" rather than "shards": ranks hold equal counts (to within 1), whatever
    the shard sizes, at the price of every rank reading the whole stream."""
    transform = transform or by_input("pretrain", cfg.input_size, cfg.mean, cfg.std)
    reader = Reader(cfg.in_chans, cfg.channel_axis)
    shards = stream_shards(cfg) if cfg.streaming else None
    if shards is not None:
        if cfg.num_examples is not None and cfg.num_examples != shards.num_rows:
            warnings.warn(
                f"--num-examples {cfg.num_examples} ignored: the shards of {shards.source!r} hold "
                f"{shards.num_rows} rows.",
                stacklevel=2,
            )
        place = (batch_size, num_workers, seed, epoch, rank, world_size)
        window = (cfg.input_size, cfg.stream_partitions, cfg.stream_window, cfg.max_bad_fraction)
        return build_stream_loader(shards, transform, *place, *window, reader, cfg.mean, pin_memory, with_index)
    hf, num = load_source(cfg)
    _check_count(cfg, num, batch_size, world_size)
    if cfg.streaming:
        args = (cfg, hf, num, transform, batch_size, num_workers, seed, rank, world_size, reader, pin_memory)
        loader = _datasets_stream_loader(*args, with_index=with_index)
    else:
        dataset = PretrainImages(hf, transform, seed, cfg.max_bad_fraction, reader)
        dataset.with_index = with_index
        loader = epoch_loader(dataset, batch_size, num_workers, seed, pin_memory)
    loader.set_epoch(epoch)
    return loader


def _check_count(cfg: DataConfig, num: int | None, batch_size: int, world_size: int) -> None:
    """Raise when the number of examples is unknown or gives no full batch per process."""
    if num is None:
        raise ValueError(
            f"The number of examples of the streamed dataset {cfg.dataset_name or cfg.data!r} "
            "is unknown, and every rank needs the same number of batches: set "
            "DataConfig.num_examples (--num-examples)."
        )
    if num // world_size // batch_size == 0:
        raise ValueError(
            f"{num} images are too few for batch size {batch_size} on {world_size} process(es) "
            "(batches are full, and the incomplete last one is dropped). Lower the batch size."
        )


def _datasets_stream_loader(
    cfg, hf, num, transform, batch_size, num_workers, seed, rank, world_size, reader, pin_memory, with_index
) -> EpochLoader:
    """The loader of a stream that datasets' IterableDataset reads: shuffled (seed + epoch), rank r
    taking every world_size-th example."""
    hf = split_dataset_by_node(
        hf.shuffle(seed=seed, buffer_size=cfg.stream_window), rank=rank, world_size=world_size, strategy="examples"
    )
    batches = num // world_size // batch_size
    dataset = StreamingPretrainImages(
        hf,
        transform,
        batch_size,
        batches,
        cfg.input_size,
        seed,
        rank,
        world_size,
        cfg.max_bad_fraction,
        reader,
        cfg.mean,
    )
    dataset.with_index = with_index
    generator = torch.Generator().manual_seed(seed)
    return EpochLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=True,
        generator=generator,
        pin_memory=pin_memory,
    )


def recon_images(cfg: DataConfig, n: int) -> torch.Tensor:
    """(up to n, C, S, S): the first n decodable images (or arrays) of the source, resized (short
    side S) and centre-cropped, not augmented, normalised as in training: the fixed batch whose
    reconstructions pretraining shows. Unreadable files and files with another channel count are
    skipped; a local folder is listed once per run (fcmae.data.listing)."""
    if n <= 0:
        return torch.empty(0, cfg.in_chans, cfg.input_size, cfg.input_size)
    shards = stream_shards(cfg) if cfg.streaming else None
    rows = _first_rows(shards, n * 4) if shards is not None else None
    if rows is None:
        hf, _ = load_source(cfg)
        rows = (row["image"] for row in (hf.take(n * 4) if cfg.streaming else hf.select(range(min(len(hf), n * 4)))))
    tf = by_input("eval", cfg.input_size, cfg.mean, cfg.std, crop_pct=1.0)
    reader = Reader(cfg.in_chans, cfg.channel_axis)
    images = []
    for value in rows:
        try:
            images.append(tf(reader(value)))
        except Exception:  # noqa: BLE001 - a bad image is simply not shown
            continue
        if len(images) == n:
            break
    if not images:
        raise ValueError(f"None of the first {n * 4} images of {cfg.dataset_name or cfg.data!r} could be decoded.")
    return torch.stack(images)


def _first_rows(shards: ShardSet, n: int):
    """The first n rows of the shards, in stored order (the first shards' only)."""
    for i, shard in enumerate(shards.shards):
        reader = shards.reader(i)
        try:
            yield from reader.rows(0, min(n, shard.num_rows))
        except Exception:  # noqa: BLE001 - an unreadable shard: the next one
            continue
        finally:
            reader.close()
        n -= shard.num_rows
        if n <= 0:
            return
