"""Semantic segmentation data: image + label-map pairs -> mmseg's ADE20K pipeline -> loaders.

Sources: an ADE20K-layout folder (``images/{training,validation}/*.jpg`` paired by file stem with
``annotations/{training,validation}/*.png``), parquet/arrow split files, or a Hub dataset with an
image column and a label-map column (``scene_parse_150``: ``image``, ``annotation``).
Label maps hold one class index per pixel. ADE20K stores classes as 1..N and 0 as "other";
``reduce_zero_label`` (mmseg) maps k -> k - 1 and 0 -> 255, the ignored index.

Training samples are ``(image (3, S, S), label (S, S) long, ok)``, augmented as a pure function of
(seed, epoch, index); an unreadable image is counted and replaced by the next readable sample.
Evaluation samples are ``(image (3, h, w), label (H, W) long at the original size, ok)``: mmseg scores
the prediction resized back to the original label map. An unreadable evaluation image comes back with an
all-ignored label (it scores nothing) and ``ok`` False. A label map that does not fit its image, or
holds a value above the class count, is a user error (``LabelMapError``, a ValueError).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from datasets import Image as ImageFeature
from datasets.utils.file_utils import xopen
from PIL import Image

from .decode import path_of
from .listing import IMAGE_EXTENSIONS, local_files
from .loaders import EpochLoader, epoch_loader
from .samples import ImageSamples, sample_seed
from .sources import is_local, load_hub
from .transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

IGNORE_INDEX = 255
CAT_MAX_RATIO, CROP_TRIES = 0.75, 10  # mmseg RandomCrop(cat_max_ratio=0.75): up to 10 redraws
RATIO_RANGE = (0.5, 2.0)  # mmseg RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)
LABEL_COLUMNS = ("annotation", "label", "label_map", "segmentation", "mask")
_ADE_SPLIT = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


class LabelMapError(ValueError):
    """A label map that does not fit its image or the class count. A DataLoader worker re-raises an
    exception in the main process as ``type(msg)`` with the worker's whole traceback as ``msg``; this
    class keeps only its own message from it, so the user reads one line."""

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if "Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def class_names(num_classes: int, path: str | os.PathLike | None = None) -> list[str]:
    """Names from ``path`` (one per line, blank lines skipped), else ``class 0`` .. ``class N-1``
    (the indices the model predicts, after reduce_zero_label)."""
    if path is None:
        return [f"class {i}" for i in range(num_classes)]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--class-names file {path} does not exist.")
    names = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    if len(names) != num_classes:
        raise ValueError(
            f"{path} names {len(names)} classes but --num-classes is {num_classes}; give one name per "
            "line, in class order (the first line is label 1 in an ADE20K-style map)."
        )
    return names


# ----------------------------------------------------------------------------- sources


def load_split(
    data: str,
    split: str,
    *,
    image_column: str | None = None,
    label_column: str | None = None,
    dataset_config_name: str | None = None,
) -> datasets.Dataset:
    """One split as a Dataset with columns ``image`` and ``label`` (both Image(decode=False)).
    ``data``: an ADE20K-layout folder, parquet/arrow files (a folder of split files, a file, a glob),
    or a Hub dataset id. ``split``: train or validation (ADE folders: training / validation)."""
    path = Path(os.path.expanduser(data))
    if (path / "images").is_dir() and (path / "annotations").is_dir():
        return ade20k_split(path, split)
    split = {"training": "train", "val": "validation"}.get(split, split)  # datasets' split names
    if is_local(data):
        builder, files = local_files(str(path), split)
        if builder == "imagefolder":
            raise ValueError(
                f"{data!r} holds loose images but no images/ and annotations/ folders: lay it out as "
                "ADE20K (images/training/x.jpg + annotations/training/x.png) or give parquet files."
            )
        ds = datasets.load_dataset(builder, data_files={split: files}, split=split)
    else:
        ds = load_hub(data, dataset_config_name, split)
    return _image_and_label(ds, image_column, label_column, data)


def ade20k_split(root: Path, split: str) -> datasets.Dataset:
    """Pairs ``images/<split>/*.jpg`` with ``annotations/<split>/<stem>.png``; image and label sizes
    are compared from the file headers (nothing is decoded)."""
    folder = _ADE_SPLIT.get(split, split)
    image_dir, label_dir = root / "images" / folder, root / "annotations" / folder
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"No {image_dir}: an ADE20K-layout folder has images/{folder}/ and annotations/{folder}/."
        )
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"No images in {image_dir}.")
    labels = {p.stem: p for p in label_dir.glob("*.png")} if label_dir.is_dir() else {}
    pairs = []
    for image in images:
        if image.stem not in labels:
            raise ValueError(f"{image} has no label map: expected {label_dir / (image.stem + '.png')}.")
        pairs.append((str(image), str(labels[image.stem])))
        check_same_size(*pairs[-1])
    ds = datasets.Dataset.from_dict({"image": [a for a, _ in pairs], "label": [b for _, b in pairs]})
    return ds.cast_column("image", ImageFeature(decode=False)).cast_column("label", ImageFeature(decode=False))


def check_same_size(image_path: str, label_path: str) -> None:
    with Image.open(image_path) as im, Image.open(label_path) as lab:  # headers only
        if im.size != lab.size:
            raise LabelMapError(
                f"{label_path} is {lab.size[0]}x{lab.size[1]} but its image {image_path} is "
                f"{im.size[0]}x{im.size[1]}: a label map must have its image's size."
            )


def header_size(value) -> tuple[int, int] | None:
    """(width, height) from an image's header ({'bytes', 'path'} dict or path), None if unreadable."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
    try:
        if data is None:
            with xopen(path, "rb") as f, Image.open(f) as im:
                return im.size
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError...: decoding will say
        return None


def _image_and_label(ds, image_column, label_column, source) -> datasets.Dataset:
    columns = list(ds.features)
    typed = [c for c, f in ds.features.items() if isinstance(f, ImageFeature)]
    label = label_column or next((c for c in LABEL_COLUMNS if c in columns), typed[1] if len(typed) > 1 else None)
    image = image_column or next((c for c in typed + ["image", "img"] if c in columns and c != label), None)
    for what, name, flag in (("image", image, "--image-column"), ("label-map", label, "--label-column")):
        if name not in columns:
            raise ValueError(
                f"{source!r} has no {what} column{f' {name!r}' if name else ''}. Available columns: "
                f"{columns}. Name it with {flag}."
            )
    ds = ds.select_columns([image, label]).rename_columns({image: "_image", label: "_label"})
    ds = ds.rename_columns({"_image": "image", "_label": "label"})
    return ds.cast_column("image", ImageFeature(decode=False)).cast_column("label", ImageFeature(decode=False))


def decode_label(value, num_classes: int, reduce_zero_label: bool, where: str) -> np.ndarray:
    """(H, W) uint8 training indices 0..N-1, 255 ignored, from a single-channel PNG (mode L, P or 16-bit)."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, value)
    if data is None:
        with xopen(path, "rb") as f:
            data = f.read()
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise LabelMapError(
                f"{where}: a label map holds one class index per pixel (a mode L or P PNG); this "
                f"one has mode {im.mode}. Convert colour-coded maps to indices first."
            )
        raw = np.asarray(im).astype(np.int64)
    top = num_classes if reduce_zero_label else num_classes - 1
    bad = (raw > top) & (raw != IGNORE_INDEX)
    if bad.any():
        first, ignored = ("1", "0 and 255 are") if reduce_zero_label else ("0", "255 is")
        raise LabelMapError(
            f"{where}: label value {raw[bad].max()} is above the {num_classes} classes (values "
            f"{first}..{top} are classes, {ignored} ignored). Fix the file or pass the right "
            "--num-classes."
        )
    if reduce_zero_label:  # mmseg LoadAnnotations(reduce_zero_label=True)
        raw = np.where((raw == 0) | (raw == IGNORE_INDEX), IGNORE_INDEX, raw - 1)
    return raw.astype(np.uint8)


# ----------------------------------------------------------------------------- transforms (mmseg's ADE20K pipeline)


def rescale_size(h: int, w: int, long_max: float, short_max: float) -> tuple[int, int]:
    """mmcv.imrescale: the largest size keeping aspect with long side <= long_max, short <= short_max."""
    scale = min(long_max / max(h, w), short_max / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
    """Bilinear for the image (uint8 out, as OpenCV's INTER_LINEAR, which mmcv uses), nearest for the
    label with half-pixel centres ('nearest-exact'), so label and image stay aligned. This departs from
    mmcv, whose OpenCV INTER_NEAREST samples source pixel floor(dst * scale): up to one source pixel
    off the bilinear image."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # a copy: PIL's arrays are read-only
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    image = x[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    if label is not None:
        y = torch.from_numpy(label)[None, None].float()
        label = F.interpolate(y, size=size, mode="nearest-exact")[0, 0].to(torch.uint8).numpy()
    return image, label


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _hsv_apply(image: np.ndarray, fn) -> np.ndarray:
    hsv = np.array(Image.fromarray(image).convert("HSV"))
    fn(hsv)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def photometric_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion: each step with probability 0.5; brightness +-32, contrast and
    saturation x0.5..1.5, hue +-18 (OpenCV's 0..180 hue scale); contrast first or last at random.
    HSV comes from PIL (hue 0..255 for a full turn), so the hue shift is rescaled by 256 / 180."""
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-32, 32))
    contrast_last = rng.integers(2) == 0

    def contrast(img):
        return _convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    if not contrast_last:
        image = contrast(image)
    if rng.integers(2):
        alpha = rng.uniform(0.5, 1.5)
        image = _hsv_apply(image, lambda hsv: hsv.__setitem__((..., 1), _convert(hsv[..., 1], alpha)))
    if rng.integers(2):
        shift = round(int(rng.integers(-18, 18)) * 256 / 180)
        image = _hsv_apply(image, lambda hsv: hsv.__setitem__((..., 0), (hsv[..., 0].astype(np.int64) + shift) % 256))
    return contrast(image) if contrast_last else image


def _normalise(image: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(255)  # a copy: PIL arrays are read-only
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (x - mean) / std


def train_transform(
    image: np.ndarray,
    label: np.ndarray,
    size: int,
    rng: np.random.Generator,
    photometric: bool = True,
    ratio_range: tuple[float, float] = RATIO_RANGE,
):
    """(H, W, 3) uint8 image and (H, W) uint8 label -> ((3, S, S) float, (S, S) long), mmseg's ADE20K
    training pipeline at crop S: RandomResize(scale (4S, S), ratio 0.5..2.0, keep aspect), RandomCrop
    (S, cat_max_ratio 0.75), RandomFlip(0.5), PhotoMetricDistortion, normalise, pad (image 0 after
    normalisation, as mmseg's SegDataPreProcessor; label 255), bottom and right. ``ratio_range`` and
    ``photometric`` set the rescale ratio's range and turn the distortion off (the small-data preset)."""
    ratio = rng.uniform(*ratio_range)
    h, w = rescale_size(*label.shape, int(4 * size * ratio), int(size * ratio))
    image, label = _resize(image, label, (h, w))

    def corner():
        return int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))

    y, x = corner()
    for _ in range(CROP_TRIES):  # redraw crops where one class covers 75 % or more of the labelled pixels
        values, counts = np.unique(label[y : y + size, x : x + size], return_counts=True)
        counts = counts[values != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
            break
        y, x = corner()
    image, label = image[y : y + size, x : x + size], label[y : y + size, x : x + size]
    if rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    image = np.ascontiguousarray(image)
    image = _normalise(photometric_distortion(image, rng) if photometric else image)
    out_image = torch.zeros(3, size, size)
    out_label = torch.full((size, size), IGNORE_INDEX, dtype=torch.long)
    out_image[:, : image.shape[1], : image.shape[2]] = image
    out_label[: label.shape[0], : label.shape[1]] = torch.from_numpy(np.ascontiguousarray(label)).long()
    return out_image, out_label


def eval_transform(image: np.ndarray, size: int) -> torch.Tensor:
    """mmseg's test pipeline: Resize(scale (4S, S), keep aspect), normalise. The label stays as it is."""
    return _normalise(_resize(image, None, rescale_size(*image.shape[:2], 4 * size, size))[0])


# ----------------------------------------------------------------------------- dataset and loaders


class SegmentationImages(ImageSamples, torch.utils.data.Dataset):
    """``ds[(index, epoch)]`` or ``ds[index]``; see the module docstring for what a sample holds."""

    def __init__(
        self,
        hf: datasets.Dataset,
        num_classes: int,
        input_size: int,
        train: bool,
        seed: int = 0,
        reduce_zero_label: bool = True,
        max_bad_fraction: float = 0.01,
        source: str = "data",
        photometric: bool = True,
        ratio_range: tuple[float, float] = RATIO_RANGE,
    ):
        super().__init__(hf, None, seed, max_bad_fraction)
        self.photometric, self.ratio_range = photometric, tuple(ratio_range)  # train_transform's
        if not 1 < num_classes < IGNORE_INDEX:
            raise ValueError(f"--num-classes must be 2..254 (label maps are 8-bit, 255 is ignored); got {num_classes}.")
        self.num_classes, self.input_size, self.train = num_classes, input_size, train
        self.reduce_zero_label, self.source = reduce_zero_label, source

    def __len__(self):
        return len(self.hf)

    def label(self, index: int, size: tuple[int, int] | None = None) -> np.ndarray:
        """Row ``index``'s label map, checked against its image's (width, height) when given."""
        row = self.hf[index]
        where = path_of(row["label"]) or f"{self.source} row {index}"
        label = decode_label(row["label"], self.num_classes, self.reduce_zero_label, where)
        if size is not None and tuple(size) != label.shape[::-1]:
            raise LabelMapError(
                f"{where} is {label.shape[1]}x{label.shape[0]} but its image "
                f"{path_of(row['image']) or ''} is {size[0]}x{size[1]}: a label "
                "map must have its image's size."
            )
        return label

    def check_labels(self, indices=None) -> None:
        """Decode the label maps of rows ``indices`` (default: all) and compare each with its image's
        size from the file header: a bad one raises ``LabelMapError`` now, naming its file, rather than
        at the first evaluation hours into training. An unreadable image is left to the loop."""
        for index in range(len(self)) if indices is None else indices:
            self.label(index, header_size(self.hf[index]["image"]))

    def __getitem__(self, key):
        index, epoch = self.key(key)
        if not self.train:  # an unreadable image scores nothing; a stand-in would change the metric
            image, _, ok = self.read(index, stand_in=False)
            label = torch.from_numpy(self.label(index, image.size if image else None)).long()
            if image is None:
                return torch.zeros(3, self.input_size, self.input_size), torch.full_like(label, IGNORE_INDEX), False
            return eval_transform(np.asarray(image), self.input_size), label, True
        image, source_index, ok = self.read(index)  # unreadable: the next readable row stands in
        label = self.label(source_index, image.size)
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        sample = train_transform(np.asarray(image), label, self.input_size, rng, self.photometric, self.ratio_range)
        return (*sample, ok)


def build_train_loader(
    ds: SegmentationImages,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> EpochLoader:
    """(images (B, 3, S, S), labels (B, S, S) long, ok (B,)) batches in ``EpochSampler`` order, full
    batches only; call ``set_epoch``; ``accelerator.prepare`` shards it."""
    if len(ds) // world_size // batch_size == 0:
        raise ValueError(
            f"{len(ds)} training images are too few for batch size {batch_size} on {world_size} "
            "process(es) (batches are full, the incomplete last one is dropped). Lower --batch-size."
        )
    return epoch_loader(ds, batch_size, num_workers, seed, pin_memory)


def eval_collate(batch):
    """(list of images (3, h, w), list of labels (H, W), ok (B,)): sizes differ from image to image."""
    images, labels, ok = zip(*batch)
    return list(images), list(labels), torch.tensor(ok)


def build_val_loader(
    ds: SegmentationImages, rank: int = 0, world_size: int = 1, batch_size: int = 1, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """This process's share of the validation set, every image exactly once over all processes (indices
    rank, rank + world_size, ...; no padding). Do not pass it to ``accelerator.prepare``: sum the
    confusion matrices over processes instead (``accelerator.reduce(conf, 'sum')``)."""
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=list(range(rank, len(ds), world_size)),
        num_workers=num_workers,
        collate_fn=eval_collate,
    )
