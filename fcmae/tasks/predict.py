"""Classify images with a fine-tuned checkpoint: the top-5 classes with names and probabilities.

Usage:
    python -m fcmae.predict cat.jpg dog.png --checkpoint outputs/finetune/best.safetensors
    python -m fcmae.predict img.jpg --checkpoint outputs/finetune            # best.safetensors in the run
    python -m fcmae.predict img.jpg --checkpoint model.safetensors --model convnextv2_tiny --labels names.txt

The model name, class names and input size come from the checkpoint's metadata (fine-tuning writes
them), so --model and --labels are needed only for checkpoints from elsewhere. Class names are
looked for in: --labels, the checkpoint's metadata, the run's labels.txt; else "class i".
Every readable image is predicted; each unreadable one is named with its reason on stderr, and the
command then exits with status 1.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from ..data import Reader, by_input, decode_rgb
from ..training.config import exit_on_user_error
from .classifier import load_classifier


def read_images(paths: list[str], reader=decode_rgb):
    """(decoded images (or arrays) with their paths, [(path, reason)] for those that could not be read)."""
    good, failed = [], []
    for path in paths:
        try:
            good.append((path, reader(path)))
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
            failed.append((path, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__))
    return good, failed


@torch.no_grad()
def predict(model, images, input_size: int, crop_pct: float | None = None, topk: int = 5, batch_size: int = 32,
            mean=None, std=None):
    """[(path, [(class index, probability), ...])] for each (path, PIL image or array), best first."""
    tf = by_input("eval", input_size, mean, std, crop_pct=crop_pct)
    results = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        probs = model(torch.stack([tf(im) for _, im in chunk])).float().softmax(dim=1)
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        results += [(p, list(zip(j.tolist(), v.tolist()))) for (p, _), j, v in zip(chunk, top.indices, top.values)]
    return results


def run(args) -> int:
    model, meta, names = load_classifier(args.checkpoint, args.model, args.labels)
    size = args.input_size or int(meta.get("input_size", 224))
    crop = float(meta["crop_pct"]) if "crop_pct" in meta else None
    mean, std = (json.loads(meta[k]) if k in meta else None for k in ("mean", "std"))  # N-channel runs record them
    reader = Reader(model.in_chans, meta.get("channel_axis", "last"))
    images, failed = read_images(args.images, reader)
    for path, top in predict(model, images, size, crop, args.topk, mean=mean, std=std):
        print(path)
        width = max(len(names[i]) for i, _ in top)
        for rank, (i, p) in enumerate(top, 1):
            print(f"  {rank}. {names[i]:<{width}}  {p:.4f}")
    sys.stdout.flush()
    for path, reason in failed:
        print(f"error: cannot read {path}: {reason}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(args.images)} images could not be read.", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fcmae.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="fine-tuned weights (or a fine-tuning output directory)")
    parser.add_argument("--model", help="model name (default: from the checkpoint)")
    parser.add_argument("--labels", help="class names: a text file, one per line, or a JSON list")
    parser.add_argument("--input-size", type=int, help="default: the checkpoint's fine-tuning size, else 224")
    parser.add_argument("--topk", type=int, default=5)
    sys.exit(exit_on_user_error(run, parser.parse_args(argv)))
