"""Detection prediction: boxes, class names, scores and translucent masks drawn with torchvision's
``draw_bounding_boxes`` / ``draw_segmentation_masks``, and JSON files of the detections.

Usage:
    fcmae predict photo.jpg photos/ --checkpoint outputs/detect --out-dir preds    # <stem>.png + <stem>.json

Every readable image is predicted; each unreadable one is named with its reason on stderr, and the
command then exits 1.
"""

from __future__ import annotations

import colorsys
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.transforms.v2.functional import to_dtype
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from ...data import image_paths, read_images, report_unreadable
from ...training.config import images_parser


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed, well-separated colour per class (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_detections(
    image: Image.Image,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    scores: torch.Tensor,
    masks: torch.Tensor | None = None,
    class_names: list[str] | None = None,
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    alpha: float = 0.5,
    width: int = 2,
) -> Image.Image:
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


def detection_records(
    output: dict,
    class_names: list[str] | None = None,
    label_to_cat: dict[int, int] | None = None,
    score_thresh: float = 0.0,
) -> list[dict]:
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


@torch.no_grad()
def predict(args) -> int:
    from .artifact import load_detector

    net = load_detector(args.checkpoint)
    cats, out = net.categories, Path(args.out_dir)
    paths = image_paths(args.images)
    images, failed = read_images(paths)
    out.mkdir(parents=True, exist_ok=True)
    for path, image in images:
        det = net([to_dtype(pil_to_tensor(image), torch.float32, scale=True)])[0]
        records = detection_records(det, cats.class_names, cats.label_to_cat, args.score_thresh)
        write_detections(out / f"{Path(path).stem}.json", records)
        draw_detections(
            image, det["boxes"], det["labels"], det["scores"], det.get("masks"), cats.class_names, args.score_thresh
        ).save(out / f"{Path(path).stem}.png")
    status = report_unreadable(failed, len(paths))
    print(f"predicted {len(images)} of {len(paths)} images into {out}", file=sys.stderr if failed else sys.stdout)
    return status


def main(argv: list[str] | None = None, prog: str = "fcmae predict") -> int:
    """Draw and list the detections of each image: OUT_DIR/<stem>.png and <stem>.json."""
    p = images_parser(prog, __doc__, "a detection run dir, its best/last.safetensors, or an export", "predictions")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw and list detections scoring at least this")
    return predict(p.parse_args(argv))
