"""Detection data in COCO format: checked annotations, targets for torchvision's Mask R-CNN, seeded
scale jitter and flips, and a Hub adapter (COCO evaluation is the detection task's:
fcmae.tasks.detect.evaluation).

Conventions:
- Category ids in a file may be sparse (COCO's 80 of 1..90); the model sees labels 1..K in id
  order, 0 being torchvision's background. ``CategoryMap`` holds the mapping; results are written
  with the file's own ids.
- A training target leaves out crowd annotations (Mask R-CNN has no ignore regions; COCOeval
  handles them from the original file), clips boxes to the image and drops boxes under 1 px wide
  or high after clipping (as mmdetection's CocoDataset); the drops are counted in ``dropped``,
  the same numbers in every process. Images without annotations stay, with empty targets.
- A sample is ``(image, target)``: image (3, H, W) float in [0, 1] (the detector normalises);
  target {boxes (N, 4) xyxy float, labels (N,) int64, masks (N, H, W) uint8, image_id int}.
  Training images arrive jittered and flipped, a pure function of (seed, epoch, index);
  evaluation images at their original size (the detector resizes, and maps results back).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from .decode import decode_rgb
from .samples import sample_seed

log = logging.getLogger(__name__)

MIN_BOX = 1.0  # px, after clipping (mmdetection's CocoDataset skips w < 1 or h < 1)
MIN_AUG_BOX = 1e-2  # px, after jitter and crop (mmdetection's FilterAnnotations in its ConvNeXt-V2 config)
JITTERS = ("multiscale", "lsj", "fixed")


@dataclass
class CategoryMap:
    """Contiguous labels 1..K <-> the file's category ids (sorted), with names; 0 is background."""

    cat_ids: list[int]
    names: list[str]

    @classmethod
    def from_categories(cls, categories: list[dict]) -> CategoryMap:
        cats = sorted(categories, key=lambda c: c["id"])
        return cls([int(c["id"]) for c in cats], [str(c.get("name", c["id"])) for c in cats])

    @property
    def num_classes(self) -> int:  # torchvision's count, background included
        return len(self.cat_ids) + 1

    @property
    def label_to_cat(self) -> dict[int, int]:
        return {i + 1: c for i, c in enumerate(self.cat_ids)}

    @property
    def cat_to_label(self) -> dict[int, int]:
        return {c: i + 1 for i, c in enumerate(self.cat_ids)}

    @property
    def class_names(self) -> list[str]:  # indexed by label
        return ["__background__", *self.names]

    def to_dict(self) -> dict:
        pairs = enumerate(zip(self.cat_ids, self.names))
        return {"categories": [{"label": i + 1, "id": c, "name": n} for i, (c, n) in pairs]}


# ----------------------------------------------------------------------------- loading and checking


def load_coco(source) -> dict:
    """A checked COCO dict from a path or a dict. Raises FileNotFoundError for a missing file and
    ValueError naming the first bad image or annotation."""
    if isinstance(source, dict):
        coco, name = source, "the annotations"
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(
                f"Annotation file {path} does not exist; expected a COCO-format JSON "
                "(e.g. annotations/instances_train2017.json)."
            )
        try:
            coco = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); expected a COCO-format annotation file.") from None
        name = str(path)
    missing = [k for k in ("images", "categories") if k not in coco] if isinstance(coco, dict) else ["an object"]
    if missing:
        raise ValueError(
            f"{name} lacks {', '.join(missing)}; a COCO file is an object with 'images', "
            "'annotations' and 'categories'."
        )
    coco.setdefault("annotations", [])
    images = {}
    for im in coco["images"]:
        size = (im.get("width"), im.get("height"))
        if not all(isinstance(v, (int, float)) and v > 0 for v in size):
            raise ValueError(
                f"{name}: image {im.get('id')} ({im.get('file_name')}) has width x height "
                f"{im.get('width')} x {im.get('height')}; both must be positive."
            )
        images[im["id"]] = im
    cat_ids = {c["id"] for c in coco["categories"]}
    for a in coco["annotations"]:
        what = f"{name}: annotation {a.get('id')}"
        if a.get("image_id") not in images:
            raise ValueError(f"{what} refers to image_id {a.get('image_id')}, which is not in 'images'.")
        if a.get("category_id") not in cat_ids:
            raise ValueError(
                f"{what} has category_id {a.get('category_id')}, not among the categories {sorted(cat_ids)}."
            )
        box = a.get("bbox")
        if not isinstance(box, (list, tuple)) or len(box) != 4 or box[2] < 0 or box[3] < 0:
            raise ValueError(
                f"{what} (image {a['image_id']}) has bbox {box}; expected [x, y, width, height] "
                "with width and height >= 0."
            )
    return coco


def coco_from_hub(ds) -> dict:
    """A COCO dict from a ``datasets.Dataset`` in the usual Hub detection schema: an ``image``
    column, optional ``image_id``, ``width``, ``height``, and ``objects`` with ``bbox`` (x, y, w, h),
    ``category`` (names from its ClassLabel), optional ``segmentation``, ``area``, ``iscrowd``, ``id``.
    Each image records its ``row``; pass the dataset as ``hf`` to ``DetectionDataset``."""
    feat = ds.features["objects"]
    feat = getattr(feat, "feature", feat)  # List({...}) or a dict of Lists
    cat = feat["category"]
    cat = getattr(cat, "feature", cat)
    names = list(getattr(cat, "names", None) or [])
    rows = ds.select_columns([c for c in ("image_id", "width", "height", "objects") if c in ds.column_names])
    raw = (
        None
        if {"width", "height"} <= set(ds.column_names)
        else ds.select_columns(["image"]).cast_column("image", type(ds.features["image"])(decode=False))
    )
    images, anns, seen = [], [], set()
    for row_index, row in enumerate(rows):
        objs = row["objects"]
        if isinstance(objs, dict):  # a dict of lists -> a list of dicts
            objs = [dict(zip(objs, vals)) for vals in zip(*objs.values())]
        if raw is None:
            w, h = row["width"], row["height"]
        else:  # the header is enough: PIL reads the size without decoding the pixels
            value = raw[row_index]["image"]
            with Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]) as im:
                w, h = im.size
        image_id = row.get("image_id", row_index)
        images.append({"id": image_id, "width": w, "height": h, "row": row_index})
        for o in objs:
            x, y, bw, bh = o["bbox"]
            seen.add(o["category"])
            ann = {
                "id": o.get("id", len(anns) + 1),
                "image_id": image_id,
                "category_id": o["category"],
                "bbox": [x, y, bw, bh],
                "area": o.get("area", bw * bh),
                "iscrowd": int(o.get("iscrowd", 0)),
            }
            if o.get("segmentation") is not None:
                ann["segmentation"] = o["segmentation"]
            anns.append(ann)
    ids = range(len(names)) if names else sorted(seen)
    cats = [{"id": i, "name": names[i] if names else str(i)} for i in ids]
    return load_coco({"images": images, "annotations": anns, "categories": cats})


def ann_to_mask(segm, height: int, width: int) -> np.ndarray:
    """(H, W) uint8 from polygons, an uncompressed RLE (counts as a list) or a compressed one."""
    if isinstance(segm, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(segm, height, width)))
    if isinstance(segm["counts"], list):
        return mask_utils.decode(mask_utils.frPyObjects(segm, height, width))
    return mask_utils.decode(segm)


def _valid_segmentation(segm):
    """The annotation's mask source, or None. Polygons need an even count of at least 6 numbers
    (pycocotools reads 4 as a box); as detectron2, parts that are not are left out."""
    if isinstance(segm, dict) and "counts" in segm:
        return segm
    if isinstance(segm, list):
        polys = [p for p in segm if len(p) >= 6 and len(p) % 2 == 0]
        return polys or None
    return None


def training_targets(coco: dict, cat_to_label: dict[int, int], masks: bool) -> tuple[list, Counter]:
    """Per image (in ``coco['images']`` order): (boxes xyxy clipped, labels, mask sources), and the
    count of annotations left out: ``crowd``, ``degenerate`` (under MIN_BOX after clipping) and
    ``without_mask`` (``masks`` and no usable segmentation)."""
    by_image = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        by_image[a["image_id"]].append(a)
    targets, dropped = [], Counter()
    for im in coco["images"]:
        h, w = im["height"], im["width"]
        boxes, labels, segms = [], [], []
        for a in by_image[im["id"]]:
            x, y, bw, bh = a["bbox"]
            x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
            segm = _valid_segmentation(a.get("segmentation")) if masks else None
            reason = (
                "crowd"
                if a.get("iscrowd", 0)
                else "degenerate"
                if x2 - x1 < MIN_BOX or y2 - y1 < MIN_BOX
                else "without_mask"
                if masks and segm is None
                else None
            )
            if reason:
                dropped[reason] += 1
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(cat_to_label[a["category_id"]])
            segms.append(segm)
        targets.append((boxes, labels, segms))
    return targets, dropped


# ----------------------------------------------------------------------------- dataset


class DetectionDataset(torch.utils.data.Dataset):
    """``ds[i]`` or ``ds[(i, epoch)]`` (fcmae.data.EpochSampler's keys) -> (image, target).

    ``coco``: a dict from ``load_coco`` or ``coco_from_hub``; images are read from
    ``image_dir / file_name`` or, with ``hf``, from row ``row`` of that dataset's ``image`` column.
    ``train``: targets with masks and seeded jitter (``jitter`` 'multiscale', 'lsj' or 'fixed' at ``scale``: the
    largest short side, or the crop); otherwise the original image with boxes and labels only.
    """

    def __init__(
        self,
        coco: dict,
        image_dir=None,
        hf=None,
        train: bool = True,
        scale: int = 800,
        jitter: str = "multiscale",
        masks: bool = True,
        seed: int = 0,
    ):
        if jitter not in JITTERS:
            raise ValueError(f"jitter must be one of {JITTERS}; got {jitter!r}.")
        self.coco, self.train, self.scale, self.jitter, self.masks, self.seed, self.epoch = (
            coco,
            train,
            scale,
            jitter,
            masks,
            seed,
            0,
        )
        self.categories = CategoryMap.from_categories(coco["categories"])
        self.images = list(coco["images"])
        self.image_dir, self.hf = (Path(image_dir) if image_dir is not None else None), hf
        if hf is not None:
            from datasets import Image as ImageFeature

            self.hf = hf.select_columns(["image"]).cast_column("image", ImageFeature(decode=False))
        elif self.image_dir is None:
            raise ValueError("Give image_dir (a folder of the images) or hf (a datasets.Dataset with an image column).")
        else:  # fail now, not hours into training
            for im in self.images:
                if not (self.image_dir / im["file_name"]).is_file():
                    raise FileNotFoundError(
                        f"Image {self.image_dir / im['file_name']} (image id {im['id']}) does "
                        "not exist; check the image folder that goes with the annotations."
                    )
        if masks and coco["annotations"] and not any(a.get("segmentation") for a in coco["annotations"]):
            raise ValueError(
                "The annotations have no 'segmentation': train a box-only detector (masks=False, --no-masks)."
            )
        self.targets, self.dropped = training_targets(coco, self.categories.cat_to_label, masks)
        if self.dropped:
            log.info("detection data: left out of training targets: %s", dict(self.dropped))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def read_image(self, index: int):
        """The RGB PIL image of sample ``index``, checked against the annotated size."""
        im = self.images[index]
        value = self.hf[im["row"]]["image"] if self.hf is not None else str(self.image_dir / im["file_name"])
        name = im.get("file_name") or f"row {im.get('row')}"
        try:
            image = decode_rgb(value)
        except Exception as e:
            raise ValueError(f"Image {name} (image id {im['id']}) could not be decoded: {type(e).__name__}: {e}") from e
        if image.size != (im["width"], im["height"]):
            raise ValueError(
                f"Image {name} (image id {im['id']}) is {image.size[0]} x {image.size[1]} but the "
                f"annotations say {im['width']} x {im['height']}; they do not belong together."
            )
        return image

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, self.epoch)
        im = self.images[index]
        image = F.to_dtype(F.pil_to_tensor(self.read_image(index)), torch.float32, scale=True)
        boxes, labels, segms = self.targets[index]
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": im["id"],
        }
        if not self.train:
            return image, target
        if self.masks:
            h, w = im["height"], im["width"]
            target["masks"] = torch.from_numpy(
                np.stack([ann_to_mask(s, h, w) for s in segms]) if segms else np.zeros((0, h, w), np.uint8)
            )
        rng = np.random.default_rng(sample_seed(self.seed, epoch, index))
        return jitter_and_flip(image, target, rng, self.scale, self.jitter)


def jitter_and_flip(image, target, rng: np.random.Generator, scale: int, jitter: str = "multiscale"):
    """Scale jitter and a horizontal flip on an image (3, H, W) and its target, drawn from ``rng``.

    'multiscale' (ConvNeXt's official Mask R-CNN recipe, scaled to ``scale`` S): short side one
    of S * {480, 512, ..., 800} / 800, long side at most S * 1333 / 800. 'lsj' (large-scale jitter,
    mmdetection's ConvNeXt-V2 config): fit in S x S times a ratio in [0.1, 2.0], then a random
    S x S crop (boxes clipped to it, those cut away dropped). 'fixed': no scale jitter, the
    evaluation resize (short side S, long side at most S * 1333 / 800). Flip with probability 0.5.
    """
    h, w = image.shape[-2:]
    if jitter in ("multiscale", "fixed"):
        short = scale * (rng.choice(np.arange(480, 801, 32)) / 800 if jitter == "multiscale" else 1.0)
        factor = min(short / min(h, w), scale * 1333 / 800 / max(h, w))
    else:
        factor = rng.uniform(0.1, 2.0) * scale / max(h, w)
    size = [max(1, round(h * factor)), max(1, round(w * factor))]
    boxes = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))
    masks = tv_tensors.Mask(target["masks"]) if "masks" in target else None
    image, boxes = F.resize(image, size, antialias=True), F.resize(boxes, size)
    masks = F.resize(masks, size) if masks is not None else None
    if jitter == "lsj" and max(size) > scale:
        top = int(rng.integers(0, max(size[0] - scale, 0) + 1))
        left = int(rng.integers(0, max(size[1] - scale, 0) + 1))
        crop = (top, left, min(size[0], scale), min(size[1], scale))
        image, boxes = F.crop(image, *crop), F.crop(boxes, *crop)  # boxes clamped to the crop
        masks = F.crop(masks, *crop) if masks is not None else None
    if rng.random() < 0.5:
        image, boxes = F.horizontal_flip(image), F.horizontal_flip(boxes)
        masks = F.horizontal_flip(masks) if masks is not None else None
    keep = ((boxes[:, 2] - boxes[:, 0]) > MIN_AUG_BOX) & ((boxes[:, 3] - boxes[:, 1]) > MIN_AUG_BOX)
    out = {**target, "boxes": boxes.as_subclass(torch.Tensor)[keep], "labels": target["labels"][keep]}
    if masks is not None:
        out["masks"] = masks.as_subclass(torch.Tensor)[keep]
    return image.clamp_(0, 1), out


def collate(batch):
    """(list of images, list of targets): torchvision's detection models take lists."""
    return tuple(list(x) for x in zip(*batch)) if batch else ([], [])
