"""Pretraining data: sources -> RGB images -> augmentation -> loaders, with bad-image accounting.

A sample is `(image, ok)`: a normalised float tensor (3, S, S), and False where the image at that
index could not be decoded. The tensor is then a stand-in (the next decodable image; in streaming,
another image of the same batch), so batches keep their shape: `(images (B, 3, S, S), ok (B,))`.

What the training loop does:
- Count bad images in the main process. Worker counters never reach it.
  `counter = BadImageCounter(cfg.max_bad_fraction)`, then each step
  `counter.update(accelerator.gather(ok))`, which raises on every rank at the same step. Workers
  also warn, naming the first bad files, and apply the same limit to their own counts.
- `loader.set_epoch(epoch)` before each epoch, on this loader or on the one returned by
  `accelerator.prepare`. Order and augmentation are pure functions of (seed, epoch, index): they
  depend neither on num_workers nor on the process. Keep persistent_workers off.
- Resume mid-epoch: `loader.set_epoch(epoch)`, then `accelerator.skip_first_batches(loader, k)`.
  The batches that follow are bitwise identical to those of the interrupted run.
- Map-style: `accelerator.prepare(loader)` shards it. Streaming: the loader already holds this
  rank's share, so do not prepare it (that would shard it twice); move batches to the device.
"""
import contextlib
import glob
import io
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Image as ImageFeature
from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
from datasets.distributed import split_dataset_by_node
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from datasets.utils.file_utils import xopen
from PIL import Image, ImageOps
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

DEMO_DIR = Path(__file__).parents[1] / "assets" / "demo"
IMAGE_EXTENSIONS = tuple(sorted(ImageFolder.EXTENSIONS))
TABLE_EXTENSIONS = (".parquet", ".arrow")
MIN_SEEN, ALL_BAD_AFTER, MAX_NAMED = 100, 20, 20


@dataclass
class DataConfig:
    data: str | None = None  # image folder, .parquet/.arrow file, folder or glob of them, or Hub id
    dataset_name: str | None = None  # Hub dataset id (run_mae.py style); same as a Hub id in `data`
    dataset_config_name: str | None = None
    split: str = "train"
    image_column: str | None = None  # None: first column of Image type, else 'image' or 'img'
    streaming: bool = False
    input_size: int = 224
    max_bad_fraction: float = 0.01
    cache_dir: str | None = None
    num_examples: int | None = None  # streaming only, when the source cannot tell its own size
    shuffle_buffer_size: int = 1000  # streaming only: examples held in each worker's buffer


# ----------------------------------------------------------------------------- sources

def load_images(cfg: DataConfig) -> datasets.Dataset | datasets.IterableDataset:
    """The source as a datasets Dataset (IterableDataset if cfg.streaming) with a single column
    'image' of type Image(decode=False): {'bytes', 'path'} dicts, decoded later by `decode_rgb`."""
    return _load(cfg)[0]


def _load(cfg):
    """(dataset, number of examples or None)."""
    if cfg.data is not None and cfg.dataset_name is not None:
        raise ValueError("Give either data (a path or Hub id) or dataset_name, not both.")
    source = os.fspath(cfg.dataset_name or cfg.data or DEMO_DIR)
    # A Hub id is 'name' or 'owner/name'; anything else that names a path is a (missing) path.
    local = (os.path.exists(source) or glob.has_magic(source) or source.count("/") > 1
             or source.startswith(("/", ".", "~")) or source.lower().endswith(TABLE_EXTENSIONS))
    if cfg.dataset_name is None and local:
        builder, files = _local_files(source, cfg.split)
        ds = datasets.load_dataset(builder, data_files={cfg.split: files}, split=cfg.split,
                                   streaming=cfg.streaming and builder != "imagefolder",
                                   cache_dir=cfg.cache_dir)
        num = _count_rows(builder, files) if cfg.streaming else len(ds)
        if cfg.streaming and builder == "imagefolder":
            ds = ds.to_iterable_dataset()  # a folder's file list is cheap to index first
    else:
        ds = _load_hub(source, cfg)
        split_info = (ds.info.splits or {}).get(cfg.split)
        num = len(ds) if not cfg.streaming else split_info.num_examples if split_info else None
    if cfg.streaming and cfg.num_examples is not None:
        num = cfg.num_examples
    if num == 0:
        raise ValueError(f"The dataset {source!r} (split {cfg.split!r}) has no rows.")
    return _image_column(ds, cfg.image_column, source), num


def _local_files(source, split):
    """('parquet' | 'arrow' | 'imagefolder', files of the requested split)."""
    accepted = (f"image files ({' '.join(IMAGE_EXTENSIONS)}), flat or in class sub-folders, "
                f"or {' / '.join(TABLE_EXTENSIONS)} files")
    path = os.path.expanduser(source)
    if glob.has_magic(path):
        files = sorted(glob.glob(path, recursive=True))
        if not files:
            raise FileNotFoundError(f"No file matches {source!r}; expected {accepted}.")
    elif os.path.isdir(path):
        try:
            by_split = DataFilesDict.from_patterns(get_data_patterns(path), base_path=path)
        except EmptyDatasetError:
            by_split = {}
        if by_split and split not in by_split:
            raise ValueError(f"{source!r} has no split {split!r} (split folders/files found: "
                             f"{sorted(map(str, by_split))}); choose one with DataConfig.split (--split).")
        files = list(by_split.get(split, []))
    elif os.path.isfile(path):
        files = [path]
    else:
        raise FileNotFoundError(f"Data path {source!r} does not exist; expected a folder of {accepted}.")
    for builder, exts in (("parquet", (".parquet",)), ("arrow", (".arrow",)), ("imagefolder", IMAGE_EXTENSIONS)):
        chosen = [f for f in files if os.path.splitext(f)[1].lower() in exts]
        if chosen:
            return builder, chosen
    raise FileNotFoundError(f"No images found in {source!r} (split {split!r}); expected {accepted}.")


def _count_rows(builder, files):
    if builder == "imagefolder":
        return len(files)
    if builder == "parquet":  # from the footers: nothing is decoded
        return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return sum(b.num_rows for f in files for b in pa.ipc.open_stream(pa.memory_map(f)))  # datasets' format


def _load_hub(name, cfg):
    try:
        return datasets.load_dataset(name, cfg.dataset_config_name, split=cfg.split,
                                     streaming=cfg.streaming, cache_dir=cfg.cache_dir)
    except (ConnectionError, FileNotFoundError) as e:
        hint = ("Offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not in the local "
                "cache: it needs network access, or a local copy" if datasets.config.HF_HUB_OFFLINE
                else "Check the name, or use a local copy")
        raise RuntimeError(
            f"{name!r} is not a local path, so it was looked up as a Hugging Face Hub dataset, and "
            f"that failed ({type(e).__name__}: {e}). {hint}: an image folder or .parquet/.arrow files "
            "given as data (--data).") from None


def _image_column(ds, requested, source):
    features = ds.features or {}
    columns = list(features) or list(next(iter(ds)))  # a stream may not declare its features
    if requested is not None:
        column = requested if requested in columns else None
    else:
        typed = [c for c, f in features.items() if isinstance(f, ImageFeature)]
        column = (typed + [c for c in ("image", "img") if c in columns] + [None])[0]
    if column is None:
        wanted = f"column {requested!r}" if requested else "a column of datasets Image type or named 'image'/'img'"
        raise ValueError(f"{source!r} has no {wanted}. Available columns: {columns}. "
                         "Name the image column with DataConfig.image_column (--image-column).")
    ds = ds.select_columns([column])
    if column != "image":
        ds = ds.rename_column(column, "image")
    return ds.cast_column("image", ImageFeature(decode=False))


# ----------------------------------------------------------------------------- decoding

def decode_rgb(value) -> Image.Image:
    """A decoded RGB PIL image from a {'bytes', 'path'} dict, bytes or a path. Raises on anything
    unreadable (the datasets below catch it and count the image as bad)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = (value, None) if isinstance(value, (bytes, bytearray)) else (None, value)
    if data is None:
        if path is None:
            raise ValueError("the sample has neither bytes nor a path")
        with xopen(path, "rb") as f:  # local or remote (hf://, https://)
            data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated or corrupt file fails here, not inside a transform
    if 0 in image.size:
        raise ValueError(f"empty image of size {image.size}")
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8-bit values. Alpha is dropped, as in torchvision's and timm's loaders. 16-bit
    gray (I;16*, and I, which PIL uses for 16-bit files) is rescaled to 8 bits:
    PIL's own conversion would clip everything above 255 to white."""
    with contextlib.suppress(Exception):  # EXIF orientation, if readable: photos the right way up
        image = ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning for palette transparency
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:  # modes without a direct route (e.g. La) go through RGBA
        return image.convert("RGBA").convert("RGB")


# ----------------------------------------------------------------------------- augmentation

def pretrain_transform(input_size: int = 224):
    """FCMAE augmentation: RandomResizedCrop(scale 0.2..1, bicubic), flip, ImageNet normalisation."""
    if input_size <= 0 or input_size % 32:
        raise ValueError(f"input_size must be a positive multiple of 32 (the encoder's total stride "
                         f"and the mask patch size), got {input_size}.")
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def sample_seed(*words: int) -> int:
    """A 32-bit seed mixed from non-negative integers, e.g. (seed, epoch, index)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0])


@contextlib.contextmanager
def _seeded(seed):
    """Seed torch, random and numpy for one sample, then restore their states. The restore
    means that with num_workers=0 the main process's RNG (used for the masks) is left untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ----------------------------------------------------------------------------- bad-image accounting

def check_bad_fraction(num_bad: int, num_seen: int, max_bad_fraction: float) -> None:
    """Raise once more than max_bad_fraction of the images seen have failed. The check starts
    after MIN_SEEN images, or after ALL_BAD_AFTER if none has worked yet."""
    if num_bad and ((num_seen >= MIN_SEEN and num_bad > max_bad_fraction * num_seen)
                    or (num_bad == num_seen and num_seen > ALL_BAD_AFTER)):
        raise RuntimeError(
            f"{num_bad} of {num_seen} images ({num_bad / num_seen:.1%}) could not be decoded, more than "
            f"the allowed {max_bad_fraction:.1%}. The warnings above name the first bad files. Fix or "
            "remove them, or raise DataConfig.max_bad_fraction (--max-bad-fraction).")


class BadImageCounter:
    """Main-process count of bad images, fed with the `ok` flags of each batch."""

    def __init__(self, max_bad_fraction: float = 0.01):
        self.max_bad_fraction, self.num_bad, self.num_seen = max_bad_fraction, 0, 0

    def update(self, ok: torch.Tensor) -> None:
        self.num_seen += ok.numel()
        self.num_bad += int((~ok.bool()).sum())
        check_bad_fraction(self.num_bad, self.num_seen, self.max_bad_fraction)


def _path(value):
    return value.get("path") if isinstance(value, dict) else None


# ----------------------------------------------------------------------------- datasets and loaders

class _Images:
    """What both datasets share: per-sample seeding, and this process's bad-image counters
    `num_seen`, `num_bad` and `bad_files` (the first MAX_NAMED names)."""

    def __init__(self, hf, transform, seed=0, max_bad_fraction=0.01):
        self.hf, self.transform, self.seed, self.epoch = hf, transform, seed, 0
        self.max_bad_fraction, self.num_seen, self.num_bad, self.bad_files = max_bad_fraction, 0, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _decode(self, value, index):
        self.num_seen += 1
        try:
            image = decode_rgb(value)
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
            image, self.num_bad = None, self.num_bad + 1
            if len(self.bad_files) < MAX_NAMED:
                self.bad_files.append(_path(value) or f"#{index}")
                more = " (further bad images are counted, not named)" if len(self.bad_files) == MAX_NAMED else ""
                warnings.warn(f"Skipping unreadable image {self.bad_files[-1]}: {type(e).__name__}: {e}{more}")
        check_bad_fraction(self.num_bad, self.num_seen, self.max_bad_fraction)
        return image

    def _augment(self, image, epoch, index):
        with _seeded(sample_seed(self.seed, epoch, index)):
            return self.transform(image)


class PretrainImages(_Images, torch.utils.data.Dataset):
    """Map-style: `ds[i]` or `ds[(i, epoch)]` -> (image, ok), augmented with seed (seed, epoch, i)."""

    def __len__(self):
        return len(self.hf)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        image = self._decode(self.hf[index]["image"], index)
        ok = image is not None
        for step in range(1, min(len(self), MIN_SEEN + 1)):  # stand-in: the next decodable index
            if image is not None:
                break
            with contextlib.suppress(Exception):
                image = decode_rgb(self.hf[(index + step) % len(self)]["image"])
        if image is None:
            raise RuntimeError(f"Image {index} and the {MIN_SEEN} after it could not be decoded.")
        return self._augment(image, epoch, index), ok


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


class StreamingPretrainImages(_Images, torch.utils.data.IterableDataset):
    """This rank's stream, cut into `num_batches` groups of `batch_size`. Worker w of W decodes
    the groups g with g % W == w. The DataLoader collects worker batches round-robin, so it
    returns the groups in stream order, whatever W. Each worker reads the whole stream but decodes
    only its own groups."""

    def __init__(self, hf, transform, batch_size, num_batches, input_size, seed=0, rank=0,
                 world_size=1, max_bad_fraction=0.01):
        super().__init__(hf, transform, seed, max_bad_fraction)
        self.batch_size, self.num_batches, self.input_size = batch_size, num_batches, input_size
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.hf.set_epoch(epoch)  # the shuffle's seed is seed + epoch

    def __len__(self):
        return self.num_batches * self.batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # .iter(), not iter(): inside a worker, iter() would split the shards between workers.
        groups, g = self.hf.iter(batch_size=self.batch_size, drop_last_batch=True), -1
        for g, group in zip(range(self.num_batches), groups):
            if g % workers == worker:
                yield from self._group(g * self.batch_size, group["image"])
        if g + 1 < self.num_batches:
            raise RuntimeError(f"Rank {self.rank}'s stream ended after {g + 1} batches, but "
                               f"{self.num_batches} were expected: is DataConfig.num_examples right?")

    def _group(self, first, values):
        images = [self._decode(v, first + k) for k, v in enumerate(values)]
        good = [im for im in images if im is not None]
        if not good:  # a whole batch unreadable: mean-gray stand-ins (zeros after normalisation)
            good = [Image.new("RGB", (self.input_size,) * 2, tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN))]
        for k, image in enumerate(images):
            index = (first + k) * self.world_size + self.rank  # position in the global stream
            yield self._augment(image or good[k % len(good)], self.epoch, index), image is not None


class PretrainLoader(torch.utils.data.DataLoader):
    def set_epoch(self, epoch: int) -> None:
        for part in (getattr(self.batch_sampler, "sampler", None), self.dataset):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)


def build_pretrain_loader(cfg: DataConfig, batch_size: int, num_workers: int = 0, seed: int = 0,
                          epoch: int = 0, rank: int = 0, world_size: int = 1, transform=None,
                          pin_memory: bool = False) -> PretrainLoader:
    """A loader of (images (B, 3, S, S), ok (B,)) batches with drop_last, set to `epoch`.

    Map-style: every rank builds the same loader, and `accelerator.prepare` shards it. rank and
    world_size only check that each rank gets a batch. Streaming: the stream is shuffled (seed +
    epoch) and split with split_dataset_by_node(strategy="examples"), so rank r takes every
    world_size-th example. Every rank yields num_examples // world_size // batch_size batches.
    The remainder (fewer than batch_size * world_size examples, a different part each epoch)
    is dropped. "examples" rather than "shards": ranks hold equal counts (to within 1), whatever
    the shard sizes, at the price of every rank reading the whole stream."""
    transform = transform or pretrain_transform(cfg.input_size)
    hf, num = _load(cfg)
    generator = torch.Generator().manual_seed(seed)  # DataLoader's base-seed draw, not the global RNG
    kw = dict(batch_size=batch_size, num_workers=num_workers, drop_last=True, generator=generator,
              pin_memory=pin_memory)
    if num is None:
        raise ValueError(f"The number of examples of the streamed dataset {cfg.dataset_name or cfg.data!r} "
                         "is unknown, and every rank needs the same number of batches: set "
                         "DataConfig.num_examples (--num-examples).")
    if num // world_size // batch_size == 0:
        raise ValueError(f"{num} images are too few for batch size {batch_size} on {world_size} process(es) "
                         "(batches are full, and the incomplete last one is dropped). Lower the batch size.")
    if cfg.streaming:
        hf = split_dataset_by_node(hf.shuffle(seed=seed, buffer_size=cfg.shuffle_buffer_size),
                                   rank=rank, world_size=world_size, strategy="examples")
        dataset = StreamingPretrainImages(hf, transform, batch_size, num // world_size // batch_size,
                                          cfg.input_size, seed, rank, world_size, cfg.max_bad_fraction)
        loader = PretrainLoader(dataset, **kw)
    else:
        dataset = PretrainImages(hf, transform, seed, cfg.max_bad_fraction)
        loader = PretrainLoader(dataset, sampler=EpochSampler(len(dataset), seed), **kw)
    loader.set_epoch(epoch)
    return loader
