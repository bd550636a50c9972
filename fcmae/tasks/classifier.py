"""The classifier: built from a pretrained encoder (``--from-fcmae``), its loss, its evaluation,
and reading a fine-tuned one back (for ``--eval-only`` and ``fcmae.predict``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ..models import create_model
from ..weights import LoadReport, load_checkpoint, load_encoder, open_pretrained, open_weights
from ..weights.adapt import stem_channels
from ..weights.source import DIR_FILES

RUN_FILES = ("best.safetensors", "best_ema.safetensors", "last.safetensors")  # a fine-tuning run's weights


def build_classifier(cfg, num_classes: int) -> tuple[torch.nn.Module, LoadReport | None]:
    """``cfg.model`` (or the source's), its encoder from ``cfg.from_fcmae``, a fresh head."""
    weights, name = open_pretrained(cfg.from_fcmae, cfg.model)
    model = create_model(name, num_classes=num_classes, drop_path_rate=cfg.drop_path,
                         head_init_scale=cfg.head_init_scale, in_chans=cfg.in_chans)
    report = load_encoder(model, weights, f"--from-fcmae {cfg.from_fcmae}") if weights is not None else None
    if cfg.linear_probe:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("head."))
    return model, report


def criterion(cfg, mixup_active: bool) -> torch.nn.Module:
    if mixup_active:  # smoothing is folded into Mixup's soft targets
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss()


def mixup_fn(cfg, num_classes: int):
    if not (cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                 mode=cfg.mixup_mode, label_smoothing=cfg.smoothing, num_classes=num_classes)


def classifier_metadata(model_name: str, class_names: list[str], cfg, **extra) -> dict[str, str]:
    """safetensors metadata of a fine-tuned classifier: what ``fcmae.predict`` needs to use it."""
    meta = {"format": "fcmae-classifier", "model": model_name, "num_classes": str(len(class_names)),
            "class_names": json.dumps(class_names), "input_size": str(cfg.input_size)}
    if cfg.crop_pct is not None:
        meta["crop_pct"] = str(cfg.crop_pct)
    if cfg.in_chans != 3 or cfg.mean is not None:  # what prediction needs to read and normalise the inputs
        meta.update(in_chans=str(cfg.in_chans), channel_axis=cfg.channel_axis, mean=json.dumps(cfg.mean),
                    std=json.dumps(cfg.std))
    return {**meta, **{k: str(v) for k, v in extra.items()}}


@torch.no_grad()
def evaluate(accelerator, model: torch.nn.Module, loader) -> dict:
    """Top-1 / top-5 accuracy (percent) over the validation loader, each sample counted once across
    processes (``gather_for_metrics`` drops the padding of the last batch). Unreadable images
    (``ok`` False) are left out and counted in ``val_bad``."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.long, device=accelerator.device)  # top-1, top-5, images, bad
    for imgs, targets, ok in loader:
        with accelerator.autocast():
            logits = model(imgs)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit1, hit5 = top[:, 0].eq(targets), top.eq(targets[:, None]).any(dim=1)
        hit1, hit5, ok = accelerator.gather_for_metrics((hit1.long(), hit5.long(), ok.long()))
        counts += torch.stack([(hit1 * ok).sum(), (hit5 * ok).sum(), ok.sum(), (1 - ok).sum()])
    model.train(was_training)
    top1, top5, n, bad = counts.tolist()
    if n == 0:
        raise ValueError("No validation image could be read: check the validation split.")
    return dict(acc1=100.0 * top1 / n, acc5=100.0 * top5 / n, val_samples=n, val_bad=bad)


def read_labels(path: str | Path) -> list[str]:
    """Class names from a JSON list or a text file with one name per line."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return [str(n) for n in json.loads(text)]
    return [line.strip() for line in text.splitlines() if line.strip()]


def class_names(meta: dict, checkpoint: Path, num_classes: int, labels: str | None = None) -> list[str]:
    """--labels, else the checkpoint's metadata, else the run's labels.txt, else "class i"."""
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
    weights = open_weights(checkpoint, names=RUN_FILES + DIR_FILES)
    if "head.fc.weight" not in weights.state_dict:
        raise ValueError(f"{checkpoint} holds no classifier (no head): fine-tune it first (finetune/run.py).")
    num_classes = weights.state_dict["head.fc.weight"].shape[0]
    model = create_model(model_name or weights.model_name(checkpoint), num_classes=num_classes,
                         in_chans=stem_channels(weights.state_dict) or 3)
    load_checkpoint(model, weights)
    return model.eval(), weights.metadata, class_names(weights.metadata, weights.path, num_classes, labels)
