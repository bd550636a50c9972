"""Segmentation inference (mmseg's whole / slide / multi-scale + flip modes), scoring (confusion
matrix -> mIoU, mAcc, aAcc as mmseg's IoUMetric), drawing predictions (palette PNG, overlay), and
the prediction command.

Usage:
    python finetune/segment.py predict street.jpg more/ --checkpoint outputs/seg_base --out-dir preds
    python -m fcmae.tasks.segment_predict street.jpg --checkpoint outputs/seg_base/last.safetensors --ms-flip

For each image: ``<out-dir>/<stem>.png``, the label map as a palette PNG (pixel value = class index,
the classes present and their colours in its text metadata), and ``<stem>_overlay.png``, the image with
the classes blended in. Folders are read for their images. The model, class names and input size come
from the checkpoint (a segmentation run directory, or its best/last.safetensors). Every readable image
is predicted; each unreadable one is named with its reason on stderr, and the command then exits 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..data import IMAGE_EXTENSIONS, decode_rgb
from ..data.segmentation import eval_transform
from ..training.config import exit_on_user_error
from .segment_model import load_segmenter

IGNORE_INDEX = 255
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's ADE20K multi-scale test


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=tuple(size), mode="bilinear",
                                                                      align_corners=False)


def slide_logits(segmenter, imgs: torch.Tensor, crop, stride) -> torch.Tensor:
    """mmseg's slide_inference: crops of ``crop`` every ``stride`` (the last one flush with the border),
    each crop's logits added at its place and divided by how many crops cover each pixel."""
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    n, _, h, w = imgs.shape
    rows, cols = max(h - ch + sh - 1, 0) // sh + 1, max(w - cw + sw - 1, 0) // sw + 1
    total = count = None
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits = segmenter(pixel_values=imgs[:, :, y1:y2, x1:x2]).logits
            if total is None:  # float32 sums, whatever precision autocast gives the logits
                total = logits.new_zeros(n, logits.shape[1], h, w, dtype=torch.float32)
                count = logits.new_zeros(1, 1, h, w, dtype=torch.float32)
            total[:, :, y1:y2, x1:x2] += logits.float()
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def predict_logits(segmenter, imgs: torch.Tensor, mode: str = "whole", crop=None, stride=None, ms_ratios=None,
                   flip: bool = False, out_size=None, num_classes: int | None = None) -> torch.Tensor:
    """Class scores (N, K, H, W) for normalised images ``imgs`` (N, 3, h, w), at ``out_size`` (default
    the input size; pass the original label size to score as mmseg does).

    ``mode``: ``whole`` (one forward) or ``slide`` (``crop``, default 512, and ``stride``, default
    2/3 of the crop: mmseg's 341 at 512). Single scale without flip returns logits. With ``ms_ratios``
    (e.g. ``MS_RATIOS``) and/or ``flip``, each view (the input resized by a ratio, optionally mirrored)
    is predicted, its logits resized to ``out_size``, turned into probabilities and mirrored back, and
    the probabilities are averaged, as mmseg's aug_test does. mmseg resizes the original image per ratio;
    here the given input is resized, so views are a resampled resample."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"eval mode must be whole or slide; got {mode!r}.")
    h, w = imgs.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (h, w)
    crop = _pair(crop or 512)
    stride = _pair(stride) if stride is not None else (crop[0] * 2 // 3, crop[1] * 2 // 3)

    def single(x):
        return segmenter(pixel_values=x).logits if mode == "whole" else slide_logits(segmenter, x, crop, stride)

    if ms_ratios is None and not flip:
        scores = _resize(single(imgs), out_size)
    else:
        scores, views = 0, 0
        for r in ms_ratios or (1.0,):
            x = _resize(imgs, (int(h * r + 0.5), int(w * r + 0.5)))
            for mirrored in (False, True) if flip else (False,):
                s = _resize(single(x.flip(-1) if mirrored else x), out_size).softmax(1)
                scores, views = scores + (s.flip(-1) if mirrored else s), views + 1
        scores = scores / views
    if num_classes is not None and scores.shape[1] != num_classes:
        raise ValueError(f"The model predicts {scores.shape[1]} classes, not {num_classes}.")
    return scores


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows ground truth, columns prediction, on the inputs' device. Pixels labelled
    ``ignore_index`` count nowhere. A scatter-add into a fixed K*K + 1 bins (the last one for ignored
    pixels) instead of torch.bincount, which reads the input's min and max on the host (a device sync)."""
    k = num_classes
    label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
    index = torch.where(label == ignore_index, k * k, label * k + pred)
    counts = torch.zeros(k * k + 1, dtype=torch.long, device=pred.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:-1].view(k, k)


def seg_metrics(conf: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mmseg's IoUMetric from a summed confusion matrix, in percent: IoU = TP / (TP + FP + FN) and
    Acc = TP / (TP + FN) per class; a class with an empty denominator is NaN (IoU: absent from ground
    truth and prediction; Acc: absent from ground truth) and left out of the mean (np.nanmean).
    aAcc = all TP / all labelled pixels. Returns mIoU, mAcc, aAcc (floats) and per-class IoU, Acc
    (lists, NaN where undefined), with class names when given."""
    conf = conf.detach().double().cpu()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = (tp / (gt + pred - tp)).numpy() * 100
        acc = (tp / gt).numpy() * 100
        out = {"mIoU": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
               "mAcc": float(np.nanmean(acc)) if not np.isnan(acc).all() else float("nan"),
               "aAcc": float(tp.sum() / gt.sum() * 100) if gt.sum() > 0 else float("nan"),
               "IoU": iou.tolist(), "Acc": acc.tolist()}
    if class_names is not None:
        out["class_names"] = list(class_names)
    return out


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


def save_prediction(image: Image.Image, label_map, out_dir: str | Path, stem: str, class_names: list[str],
                    alpha: float = 0.5) -> tuple[Path, Path]:
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

def image_paths(items: list[str]) -> list[Path]:
    """The files given, and the images in the folders given (sorted)."""
    paths = []
    for item in map(Path, items):
        paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS) if item.is_dir() else [item]
    return paths


@torch.no_grad()
def predict(args) -> int:
    net, meta = load_segmenter(args.checkpoint)
    names, size = json.loads(meta["class_names"]), args.input_size or int(meta["input_size"])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net.to(device)
    failed, paths = [], image_paths(args.images)
    for path in paths:
        try:
            image = decode_rgb(str(path))
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
            failed.append((path, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__))
            continue
        x = eval_transform(np.asarray(image), size)[None].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
            scores = predict_logits(net, x, args.mode, crop=size, ms_ratios=MS_RATIOS if args.ms_flip else None,
                                    flip=args.ms_flip, out_size=(image.height, image.width))
        mask, overlay = save_prediction(image, scores.argmax(1)[0], args.out_dir, path.stem, names, args.alpha)
        print(f"{path} -> {mask} {overlay}", flush=True)
    for path, reason in failed:
        print(f"error: cannot read {path}: {reason}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(paths)} images could not be read.", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None, prog: str = "python -m fcmae.tasks.segment_predict") -> None:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, help="segmentation run directory or its best/last.safetensors")
    parser.add_argument("--out-dir", default="predictions")
    parser.add_argument("--mode", choices=("whole", "slide"), default="slide",
                        help="slide: windows of the input size, stride 2/3 of it (mmseg's ADE20K test)")
    parser.add_argument("--ms-flip", action="store_true", help="average scales 0.5..1.75 and their mirror images")
    parser.add_argument("--input-size", type=int, help="short side to resize to (default: the checkpoint's)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the class colours")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    sys.exit(exit_on_user_error(predict, parser.parse_args(argv)))


if __name__ == "__main__":
    main()
