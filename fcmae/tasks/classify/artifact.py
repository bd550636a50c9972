"""What classification saves and how it comes back: ``best.safetensors``, ``best_ema.safetensors``
and ``last.safetensors`` (the classifier with its model name, class names, input size and, for
N-channel runs, the channels and normalisation in the metadata) and ``labels.txt``. The
``classifier`` artifact kind is a ConvNeXt (registered with its exports in fcmae.weights.hub);
this task attaches its prediction and its features (timm's pre-logits) to it."""

from __future__ import annotations

import json
from pathlib import Path

from ...models import create_model
from ...weights import load_checkpoint, open_weights
from ...weights.adapt import stem_channels
from ...weights.card import read_label_names
from ...weights.hub import PreLogits
from ...weights.source import DIR_FILES

FORMAT = "fcmae-classifier"
RUN_FILES = ("best.safetensors", "best_ema.safetensors", "last.safetensors")  # a fine-tuning run's weights


def classifier_metadata(cfg, class_names: list[str], **extra) -> dict[str, str]:
    """safetensors metadata of a fine-tuned classifier: what prediction needs to use it."""
    meta = {
        "format": FORMAT,
        "model": cfg.model,
        "num_classes": str(len(class_names)),
        "class_names": json.dumps(class_names),
        "input_size": str(cfg.input_size),
    }
    if cfg.crop_pct is not None:
        meta["crop_pct"] = str(cfg.crop_pct)
    if cfg.in_chans != 3 or cfg.mean is not None:  # what prediction needs to read and normalise the inputs
        meta.update(
            in_chans=str(cfg.in_chans),
            channel_axis=cfg.channel_axis,
            mean=json.dumps(cfg.mean),
            std=json.dumps(cfg.std),
        )
    return {**meta, **{k: str(v) for k, v in extra.items()}}


def class_names(meta: dict, checkpoint: Path, num_classes: int, labels: str | None = None) -> list[str]:
    """--labels, else the checkpoint's metadata, else the run's labels.txt, else "class i"."""
    if labels:
        names = read_label_names(labels)
    elif "class_names" in meta:
        names = json.loads(meta["class_names"])
    else:  # labels.txt of the run: beside best.safetensors, or two levels above checkpoints/step_N
        found = [d / "labels.txt" for d in Path(checkpoint).parents[:3] if (d / "labels.txt").is_file()]
        names = read_label_names(found[0]) if found else [f"class {i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(
            f"{len(names)} class names for a classifier of {num_classes} classes ({labels or checkpoint})."
        )
    return names


def load_classifier(checkpoint, model_name: str | None = None, labels: str | None = None):
    """(model in eval mode, checkpoint metadata, class names). Loads strictly, head included."""
    weights = open_weights(checkpoint, names=RUN_FILES + DIR_FILES)
    if "head.fc.weight" not in weights.state_dict:
        raise ValueError(f"{checkpoint} holds no classifier (no head): fine-tune it first (fcmae finetune).")
    num_classes = weights.state_dict["head.fc.weight"].shape[0]
    model = create_model(
        model_name or weights.model_name(str(checkpoint)),
        num_classes=num_classes,
        in_chans=stem_channels(weights.state_dict) or 3,
    )
    load_checkpoint(model, weights)
    return model.eval(), weights.metadata, class_names(weights.metadata, weights.path, num_classes, labels)


def features(source):
    """For ``fcmae embed``: (pre-logits module, eval transform, {model, dim})."""
    from ...data import by_input

    model, meta, _ = load_classifier(source)
    size = int(meta.get("input_size", 224))
    crop = float(meta["crop_pct"]) if "crop_pct" in meta else None
    mean, std = (json.loads(meta[k]) if k in meta else None for k in ("mean", "std"))
    transform = by_input("eval", size, mean, std, crop_pct=crop)
    return (
        PreLogits(model).eval(),
        transform,
        dict(
            model=model.name,
            dim=model.num_features,
            in_chans=model.in_chans,
            channel_axis=meta.get("channel_axis", "last"),
            input_size=size,
        ),
    )
