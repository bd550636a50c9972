"""Showing and saving detections: boxes, class names, scores and translucent masks drawn with
torchvision's ``draw_bounding_boxes`` / ``draw_segmentation_masks``, and JSON files of detections."""
from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed, well-separated colour per class (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_detections(image: Image.Image, boxes: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor,
                    masks: torch.Tensor | None = None, class_names: list[str] | None = None,
                    score_thresh: float = 0.5, mask_thresh: float = 0.5, alpha: float = 0.5,
                    width: int = 2) -> Image.Image:
    """The image with every detection scoring at least ``score_thresh``: its mask (N, H, W) or
    (N, 1, H, W) above ``mask_thresh`` blended in with ``alpha``, its box (xyxy, pixels) and
    "name score" in the class colour. Returns a new RGB image."""
    keep = scores.detach().cpu() >= score_thresh
    boxes, labels, scores = boxes.detach().cpu()[keep], labels.detach().cpu()[keep], scores.detach().cpu()[keep]
    canvas = pil_to_tensor(image.convert("RGB"))
    colors = [class_color(int(label)) for label in labels]
    if masks is not None and len(labels):
        masks = masks.detach().cpu()[keep]
        masks = masks[:, 0] if masks.ndim == 4 else masks
        canvas = draw_segmentation_masks(canvas, masks > mask_thresh, alpha=alpha, colors=colors)
    if len(labels):
        names = [class_names[int(label)] if class_names else str(int(label)) for label in labels]
        text = [f"{n} {s:.2f}" for n, s in zip(names, scores.tolist())]
        canvas = draw_bounding_boxes(canvas, boxes, labels=text, colors=colors, width=width)
    return to_pil_image(canvas)


def detection_records(output: dict, class_names: list[str] | None = None, label_to_cat: dict[int, int] | None = None,
                      score_thresh: float = 0.0) -> list[dict]:
    """One image's detections as plain dicts: box [x1, y1, x2, y2] in pixels, score, label, and
    where given the class name and the dataset's category id. Masks are not included (see
    ``fcmae.data.detection.coco_results`` for RLE masks)."""
    records = []
    for box, label, score in zip(output["boxes"].tolist(), output["labels"].tolist(), output["scores"].tolist()):
        if score < score_thresh:
            continue
        rec = {"box": [round(v, 2) for v in box], "score": round(score, 4), "label": int(label)}
        if class_names:
            rec["name"] = class_names[int(label)]
        if label_to_cat:
            rec["category_id"] = label_to_cat[int(label)]
        records.append(rec)
    return records


def write_detections(path, records) -> Path:
    """Write a JSON list (COCO results or ``detection_records``) atomically: a reader never sees a
    half-written file, and an interrupted run leaves the previous one in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(records))
    os.replace(tmp, path)
    return path
