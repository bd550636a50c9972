"""Tiny datasets for the wheel check (.ci/check_wheel.sh): class folders, an ADE20K-layout folder and
a COCO-layout folder of coloured shapes, written under the folder given."""

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def shape_image(rng, size=72):
    """An image with one filled rectangle (class 1) or ellipse (class 2) on noise: (image, label map, box, kind)."""
    image = Image.fromarray(rng.integers(0, 80, (size, size, 3), dtype=np.uint8))
    label = Image.new("L", (size, size), 0)
    kind = int(rng.integers(1, 3))
    x0, y0 = (int(v) for v in rng.integers(4, size // 2, 2))
    x1, y1 = x0 + int(rng.integers(16, size // 2)), y0 + int(rng.integers(16, size // 2))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    for draw, fill in ((ImageDraw.Draw(image), colour), (ImageDraw.Draw(label), kind)):
        (draw.rectangle if kind == 1 else draw.ellipse)([x0, y0, x1, y1], fill=fill)
    return image, label, [x0, y0, x1 - x0 + 1, y1 - y0 + 1], kind


def main(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in ("a", "b"):
            (root / "cls" / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape_image(rng)[0].save(root / "cls" / split / c / f"{i}.png")
    for split, ade, coco in (("train", "training", "train2017"), ("val", "validation", "val2017")):
        for sub in (root / "ade" / "images" / ade, root / "ade" / "annotations" / ade, root / "coco" / coco):
            sub.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(8 if split == "train" else 4):
            image, label, (x, y, w, h), kind = shape_image(rng)
            image.save(root / "ade" / "images" / ade / f"{i}.jpg")
            label.save(root / "ade" / "annotations" / ade / f"{i}.png")
            image.save(root / "coco" / coco / f"{i}.png")
            images.append({"id": i + 1, "file_name": f"{i}.png", "width": 72, "height": 72})
            polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
            anns.append(
                {
                    "id": i + 1,
                    "image_id": i + 1,
                    "category_id": kind,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [polygon],
                }
            )
        (root / "coco" / "annotations").mkdir(exist_ok=True)
        cats = [{"id": 1, "name": "box"}, {"id": 2, "name": "ball"}]
        (root / "coco" / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
