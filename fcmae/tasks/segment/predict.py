"""Segmentation prediction: the label map of each image (mmseg's whole / slide / multi-scale + flip
inference), drawn as a palette PNG and an overlay.

Usage:
    fcmae predict street.jpg more/ --checkpoint outputs/seg_base --out-dir preds
    fcmae predict street.jpg --checkpoint outputs/seg_base/last.safetensors --ms-flip

For each image: ``<out-dir>/<stem>.png``, the label map as a palette PNG (pixel value = class index,
the classes present and their colours in its text metadata), and ``<stem>_overlay.png``, the image with
the classes blended in. Folders are read for their images. The model, class names and input size come
from the checkpoint (a segmentation run directory, or its best/last.safetensors). Every readable image
is predicted; each unreadable one is named with its reason on stderr, and the command then exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ...data import image_paths, read_images, report_unreadable
from ...data.segmentation import eval_transform
from ...training.config import images_parser
from .artifact import load_segmenter
from .evaluation import IGNORE_INDEX, MS_RATIOS, predict_logits

# ----------------------------------------------------------------------------- drawing


def palette(num_colors: int = 256) -> np.ndarray:
    """(256, 3) uint8: the PASCAL VOC colour map (bits of the index spread over R, G, B), shifted by one so
    that class 0 is not black; index 255 (ignored) is black."""
    voc = np.zeros((257, 3), np.uint8)
    for i in range(257):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        voc[i] = (r, g, b)
    out = voc[1:257].copy()
    out[IGNORE_INDEX] = 0
    return out[:num_colors]


def save_prediction(
    image: Image.Image, label_map, out_dir: str | Path, stem: str, class_names: list[str], alpha: float = 0.5
) -> tuple[Path, Path]:
    """``<stem>.png``: the label map as a palette PNG (pixel value = class index, 255 = ignored, black),
    with the classes present and their colours in its text metadata; ``<stem>_overlay.png``: the image
    with each class's colour blended in at ``alpha`` (ignored pixels untouched). Returns both paths."""
    labels = np.asarray(label_map.cpu() if isinstance(label_map, torch.Tensor) else label_map)
    if labels.shape != (image.height, image.width):
        raise ValueError(f"label map {labels.shape} and image {image.height}x{image.width} differ in size.")
    if len(class_names) >= IGNORE_INDEX or labels.min() < 0 or ((labels >= len(class_names)) & (labels != 255)).any():
        raise ValueError(f"label values must be 0..{len(class_names) - 1} or 255, and at most 255 classes.")
    labels = labels.astype(np.uint8)
    colours = palette()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    present = [int(v) for v in np.unique(labels) if v != IGNORE_INDEX]
    info.add_text("classes", json.dumps({class_names[v]: colours[v].tolist() for v in present}))
    mask_path, overlay_path = out / f"{stem}.png", out / f"{stem}_overlay.png"
    mask = Image.frombytes("P", (image.width, image.height), labels.tobytes())
    mask.putpalette(colours.reshape(-1).tolist())
    mask.save(mask_path, pnginfo=info)
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    blend = rgb * (1 - alpha) + colours[labels].astype(np.float32) * alpha
    keep = (labels == IGNORE_INDEX)[..., None]
    Image.fromarray(np.where(keep, rgb, blend).round().astype(np.uint8)).save(overlay_path)
    return mask_path, overlay_path


# ----------------------------------------------------------------------------- the command


@torch.no_grad()
def predict(args) -> int:
    net, meta = load_segmenter(args.checkpoint)
    names, size = json.loads(meta["class_names"]), args.input_size or int(meta["input_size"])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(device)
    paths = image_paths(args.images)
    images, failed = read_images(paths)
    for path, image in images:
        x = eval_transform(np.asarray(image), size)[None].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            scores = predict_logits(
                net,
                x,
                args.mode,
                crop=size,
                ms_ratios=MS_RATIOS if args.ms_flip else None,
                flip=args.ms_flip,
                out_size=(image.height, image.width),
            )
        mask, overlay = save_prediction(image, scores.argmax(1)[0], args.out_dir, Path(path).stem, names, args.alpha)
        print(f"{path} -> {mask} {overlay}", flush=True)
    return report_unreadable(failed, len(paths))


def main(argv: list[str] | None = None, prog: str = "fcmae predict") -> int:
    parser = images_parser(prog, __doc__, "segmentation run directory or its best/last.safetensors", "predictions")
    parser.add_argument(
        "--mode",
        choices=("whole", "slide"),
        default="slide",
        help="slide: windows of the input size, stride 2/3 of it (mmseg's ADE20K test)",
    )
    parser.add_argument("--ms-flip", action="store_true", help="average scales 0.5..1.75 and their mirror images")
    parser.add_argument("--input-size", type=int, help="short side to resize to (default: the checkpoint's)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    return predict(parser.parse_args(argv))
