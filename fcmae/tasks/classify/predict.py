"""Classify images with a fine-tuned checkpoint: the top-5 classes with names and probabilities.

Usage:
    fcmae predict cat.jpg dog.png --checkpoint outputs/finetune/best.safetensors
    fcmae predict img.jpg photos/ --checkpoint outputs/finetune            # best.safetensors in the run
    fcmae predict img.jpg --checkpoint model.safetensors --model convnextv2_tiny --labels names.txt

The model name, class names and input size come from the checkpoint's metadata (fine-tuning writes
them), so --model and --labels are needed only for checkpoints from elsewhere. Class names are
looked for in: --labels, the checkpoint's metadata, the run's labels.txt; else "class i".
Every readable image is predicted; each unreadable one is named with its reason on stderr, and the
command then exits with status 1.
"""

from __future__ import annotations

import json
import sys

import torch

from ...data import Reader, by_input, image_paths, read_images, report_unreadable
from ...training.config import images_parser
from .artifact import load_classifier


@torch.no_grad()
def predict(
    model,
    images,
    input_size: int,
    crop_pct: float | None = None,
    topk: int = 5,
    batch_size: int = 32,
    mean=None,
    std=None,
):
    """[(path, [(class index, probability), ...])] for each (path, PIL image or array), best first."""
    tf = by_input("eval", input_size, mean, std, crop_pct=crop_pct)
    results = []
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        probs = model(torch.stack([tf(im) for _, im in chunk])).float().softmax(dim=1)
        top = probs.topk(min(topk, probs.shape[1]), dim=1)
        results += [(p, list(zip(j.tolist(), v.tolist()))) for (p, _), j, v in zip(chunk, top.indices, top.values)]
    return results


def run(args) -> int:
    model, meta, names = load_classifier(args.checkpoint, args.model, args.labels)
    size = args.input_size or int(meta.get("input_size", 224))
    crop = float(meta["crop_pct"]) if "crop_pct" in meta else None
    mean, std = (json.loads(meta[k]) if k in meta else None for k in ("mean", "std"))  # N-channel runs record them
    paths = image_paths(args.images)
    images, failed = read_images(paths, Reader(model.in_chans, meta.get("channel_axis", "last")))
    for path, top in predict(model, images, size, crop, args.topk, mean=mean, std=std):
        print(path)
        width = max(len(names[i]) for i, _ in top)
        for rank, (i, p) in enumerate(top, 1):
            print(f"  {rank}. {names[i]:<{width}}  {p:.4f}")
    sys.stdout.flush()
    return report_unreadable(failed, len(paths))


def main(argv: list[str] | None = None, prog: str = "fcmae predict") -> int:
    parser = images_parser(prog, __doc__, "fine-tuned weights (or a fine-tuning output directory)")
    parser.add_argument("--model", help="model name (default: from the checkpoint)")
    parser.add_argument("--labels", help="class names: a text file, one per line, or a JSON list")
    parser.add_argument("--input-size", type=int, help="default: the checkpoint's fine-tuning size, else 224")
    parser.add_argument("--topk", type=int, default=5)
    return run(parser.parse_args(argv))
