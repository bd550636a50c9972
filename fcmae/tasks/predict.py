"""Classify images with a fine-tuned checkpoint: the top-5 classes with names and probabilities.

Usage:
    python -m fcmae.predict cat.jpg dog.png --checkpoint outputs/finetune/best.safetensors
    python -m fcmae.predict img.jpg --checkpoint outputs/finetune            # best.safetensors in the run
    python -m fcmae.predict img.jpg --checkpoint model.safetensors --model convnextv2_tiny --labels names.txt

The model name, class names and input size come from the checkpoint's metadata (fine-tuning writes
them), so --model and --labels are needed only for checkpoints from elsewhere. Class names are
looked for in: --labels, the checkpoint's metadata, the run's labels.txt; else "class i".
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

RUN_FILES = ("best.safetensors", "best_ema.safetensors", "last.safetensors")


def resolve_checkpoint(checkpoint: str) -> str:
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for name in RUN_FILES:  # a fine-tuning output directory
            if (path / name).is_file():
                return str(path / name)
    return checkpoint


def read_labels(path: str | Path) -> list[str]:
    """Class names from a JSON list or a text file with one name per line."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return [str(n) for n in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_names(meta: dict, checkpoint: str, num_classes: int, labels: str | None = None) -> list[str]:
    if labels:
        names = read_labels(labels)
    elif "class_names" in meta:
        names = json.loads(meta["class_names"])
    else:  # labels.txt of the run: beside best.safetensors, or two levels above checkpoints/step_N
        found = [d / "labels.txt" for d in Path(checkpoint).parents[:3] if (d / "labels.txt").is_file()]
        names = read_labels(found[0]) if found else [f"class {i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a classifier of {num_classes} classes "
                         f"({labels or checkpoint}).")
    return names


def load_classifier(checkpoint: str, model_name: str | None = None, labels: str | None = None):
    """(model in eval mode, checkpoint metadata, class names). Loads strictly, head included."""
    from ..weights.convert import convert_state_dict, load_checkpoint, read_state_dict
    from .classify_model import infer_model_name, safetensors_metadata
    from ..models import create_model

    path = resolve_checkpoint(checkpoint)
    meta = safetensors_metadata(path)
    state = read_state_dict(path)
    converted = convert_state_dict(state)[1]
    if "head.fc.weight" not in converted:
        raise ValueError(f"{checkpoint} holds no classifier (no head): fine-tune it first (finetune/run.py).")
    num_classes = converted["head.fc.weight"].shape[0]
    model = create_model(model_name or infer_model_name(state, meta, checkpoint), num_classes=num_classes)
    load_checkpoint(model, state)
    return model.eval(), meta, class_names(meta, path, num_classes, labels)


@torch.no_grad()
def predict(model, paths: list[str], input_size: int, crop_pct: float | None = None, topk: int = 5):
    """[(path, [(class index, probability), ...])] for each image, best first."""
    from ..data.sources import decode_rgb
    from ..data.labelled import eval_transform

    tf = eval_transform(input_size, crop_pct)
    batch = torch.stack([tf(decode_rgb(p)) for p in paths])
    probs = model(batch).float().softmax(dim=1)
    top = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [(p, list(zip(i.tolist(), v.tolist()))) for p, i, v in zip(paths, top.indices, top.values)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fcmae.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--checkpoint", required=True, help="fine-tuned weights (or a fine-tuning output directory)")
    parser.add_argument("--model", help="model name (default: from the checkpoint)")
    parser.add_argument("--labels", help="class names: a text file, one per line, or a JSON list")
    parser.add_argument("--input-size", type=int, help="default: the checkpoint's fine-tuning size, else 224")
    parser.add_argument("--topk", type=int, default=5)
    args = parser.parse_args(argv)
    model, meta, names = load_classifier(args.checkpoint, args.model, args.labels)
    size = args.input_size or int(meta.get("input_size", 224))
    crop = float(meta["crop_pct"]) if "crop_pct" in meta else None
    for path, top in predict(model, args.images, size, crop, args.topk):
        print(path)
        width = max(len(names[i]) for i, _ in top)
        for rank, (i, p) in enumerate(top, 1):
            print(f"  {rank}. {names[i]:<{width}}  {p:.4f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
