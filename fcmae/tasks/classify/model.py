"""The classifier: a ConvNeXt built from a pretrained encoder (``--from-fcmae``) with a fresh head,
its layer-wise lr decay, and its loss (timm's Mixup/CutMix, label smoothing)."""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from ...models import create_model
from ...training.layer_decay import lr_scale_fn
from ...weights import LoadReport, load_encoder, open_pretrained


def build_classifier(cfg, num_classes: int) -> tuple[torch.nn.Module, LoadReport | None]:
    """``cfg.model`` (or the source's), its encoder from ``cfg.from_fcmae``, a fresh head."""
    weights, name = open_pretrained(cfg.from_fcmae, cfg.model)
    model = create_model(
        name,
        num_classes=num_classes,
        drop_path_rate=cfg.drop_path,
        head_init_scale=cfg.head_init_scale,
        in_chans=cfg.in_chans,
    )
    report = load_encoder(model, weights, f"--from-fcmae {cfg.from_fcmae}") if weights is not None else None
    if cfg.linear_probe:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("head."))
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, report


def lr_scale(model, layer_decay: float, decay_type: str = "single"):
    """The official fine-tuning's layer-wise decay (``single`` or ``group``) over the classifier's names."""
    return lr_scale_fn(model.cfg.depths, layer_decay, decay_type)


def criterion(cfg, mixup_active: bool) -> torch.nn.Module:
    if mixup_active:  # smoothing is folded into Mixup's soft targets
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss()


def mixup_fn(cfg, num_classes: int):
    if not (cfg.mixup > 0 or cfg.cutmix > 0):
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mixup_prob,
        switch_prob=cfg.mixup_switch_prob,
        mode=cfg.mixup_mode,
        label_smoothing=cfg.smoothing,
        num_classes=num_classes,
    )
