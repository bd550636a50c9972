"""A hard generated set for detection and segmentation: three classes that differ by outline only.

Circles, squares and triangles (squares and triangles rotated at random) in random colours on noisy
random backgrounds (a random two-colour gradient, a few random straight strokes that belong to no
object, Gaussian pixel noise). Colour, size and position carry no class information: only the outline
does. A pure function of its arguments, so a benchmark and a test see the same images.

    make_detection(out, n_train, n_val, size, seed)     # COCO 2017 layout (polygons as segmentation)
    make_segmentation(out, n_train, n_val, size, seed)  # ADE20K layout
    python benchmarks/shapes_data.py OUT --size 128 --train 200 --val 50 [--task detect|segment|both]

Objects: 1..``max_objects`` an image (default 3), not overlapping (so the polygons are the true masks),
of side (diameter) ``min_side``..``max_side`` of the image (default 1/4..1/2: at 128 px that is 32..64
px, the sizes of torchvision's two finest anchors, 32 and 64). The previous default, 1/8..3/8 with up
to 4 objects, left 150-step fine-tunes at 128 px near chance (AP50 0.03..0.09 for every recipe, the
ranking changing with the seed): a benchmark that cannot tell recipes apart.

Detection (``--data OUT`` for ``fcmae detect``): annotations/instances_{train,val}2017.json,
train2017/*.jpg, val2017/*.jpg; categories 1 circle, 2 square, 3 triangle.
Segmentation (``--data OUT --num-classes 4`` for ``fcmae segment``, ADE20K's reduce_zero_label):
images/{training,validation}/*.jpg and annotations/{training,validation}/*.png, value 1 background,
2 circle, 3 square, 4 triangle; 0 (ADE20K's "other", ignored) is not used. Background is a class, so
the model has to find the outlines, not only name the shape of pixels known to be an object.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "triangle"}]
SEG_CLASSES = ["background", "circle", "square", "triangle"]  # label values 1..4 (0 unused, ignored)
SHAPES = dict(min_side=0.25, max_side=0.5, max_objects=3)  # the defaults of scene()


def background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random gradient between two random colours, faint random strokes, Gaussian noise (sigma 12..30)."""
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    im = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):  # distractor strokes: straight edges that belong to no object
        pts = [tuple(rng.uniform(0, size, 2)) for _ in range(2)]
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        draw.line(pts, fill=colour, width=int(rng.integers(1, max(2, size // 64) + 1)))
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, rng.uniform(12, 30), (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def outline(rng: np.random.Generator, cat: int, cx: float, cy: float, r: float) -> list[float]:
    """The polygon (x0, y0, x1, y1, ...) of a shape of class ``cat`` (1 circle, 2 square, 3 triangle)
    centred at (cx, cy), circumradius ``r`` (circles: radius), rotated at random."""
    if cat == 1:
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    else:
        k = 4 if cat == 2 else 3
        t = rng.uniform(0, 2 * np.pi) + np.arange(k) * 2 * np.pi / k
        r = r if cat == 3 else r * 0.9  # a square of the same circumradius looks larger than a triangle
    return [float(v) for a in t for v in (cx + r * np.cos(a), cy + r * np.sin(a))]


def scene(rng: np.random.Generator, size: int, min_side: float = 0.25, max_side: float = 0.5, max_objects: int = 3):
    """(PIL image, [(cat, polygon)]): 1..max_objects non-overlapping shapes on a noisy background,
    diameters ``min_side``..``max_side`` x ``size``."""
    im = background(rng, size)
    draw = ImageDraw.Draw(im)
    placed, shapes = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(30):
            r = rng.uniform(size * min_side / 2, size * max_side / 2)
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            if all(math.hypot(cx - x, cy - y) > r + q + 2 for x, y, q in placed):
                break
        else:
            continue
        cat = int(rng.integers(1, 4))
        poly = outline(rng, cat, cx, cy, r)
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        draw.polygon(poly, fill=colour)
        placed.append((cx, cy, r))
        shapes.append((cat, poly))
    return im, shapes


def _bbox(poly: list[float]) -> list[float]:
    xs, ys = poly[0::2], poly[1::2]
    x0, y0, x1, y1 = max(min(xs), 0.0), max(min(ys), 0.0), max(xs), max(ys)
    return [x0, y0, x1 - x0, y1 - y0]


def _area(poly: list[float]) -> float:
    xs, ys = np.array(poly[0::2]), np.array(poly[1::2])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


def make_detection(out, n_train: int = 200, n_val: int = 50, size: int = 128, seed: int = 0, **shapes) -> Path:
    """COCO 2017 layout under ``out`` (see the module docstring; ``shapes``: scene()'s keywords); returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng([seed, 1])
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n, start in (("train", n_train, 1), ("val", n_val, 100001)):
        folder = out / f"{split}2017"
        folder.mkdir(exist_ok=True)
        images, anns = [], []
        for i in range(n):
            iid = start + i
            im, drawn = scene(rng, size, **{**SHAPES, **shapes})
            name = f"{iid:06d}.jpg"
            im.save(folder / name, quality=92)
            images.append({"id": iid, "file_name": name, "width": size, "height": size})
            for cat, poly in drawn:
                anns.append(
                    {
                        "id": len(anns) + 1 + start * 10,
                        "image_id": iid,
                        "category_id": cat,
                        "bbox": _bbox(poly),
                        "area": _area(poly),
                        "iscrowd": 0,
                        "segmentation": [poly],
                    }
                )
        (out / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES})
        )
    return out


def make_segmentation(out, n_train: int = 200, n_val: int = 50, size: int = 128, seed: int = 0, **shapes) -> Path:
    """ADE20K layout under ``out`` (see the module docstring; --num-classes 4); returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng([seed, 2])
    for split, n in (("training", n_train), ("validation", n_val)):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            im, drawn = scene(rng, size, **{**SHAPES, **shapes})
            label = Image.new("L", (size, size), 1)
            draw = ImageDraw.Draw(label)
            for cat, poly in drawn:
                draw.polygon(poly, fill=cat + 1)
            im.save(out / "images" / split / f"{i:05d}.jpg", quality=92)
            label.save(out / "annotations" / split / f"{i:05d}.png")
    (out / "class_names.txt").write_text("\n".join(SEG_CLASSES) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--task", choices=("detect", "segment", "both"), default="both")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--val", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-side", type=float, default=SHAPES["min_side"], help="smallest diameter / image side")
    p.add_argument("--max-side", type=float, default=SHAPES["max_side"], help="largest diameter / image side")
    p.add_argument("--max-objects", type=int, default=SHAPES["max_objects"])
    a = p.parse_args(argv)
    out = Path(a.out)
    shapes = dict(min_side=a.min_side, max_side=a.max_side, max_objects=a.max_objects)
    if a.task in ("detect", "both"):
        print(make_detection(out / "detect" if a.task == "both" else out, a.train, a.val, a.size, a.seed, **shapes))
    if a.task in ("segment", "both"):
        print(make_segmentation(out / "segment" if a.task == "both" else out, a.train, a.val, a.size, a.seed, **shapes))


if __name__ == "__main__":
    main()
