"""Optimizer parameter groups (one builder for every task), the learning-rate schedule (set by hand
every step), and the micro-batch / optimizer step every training loop shares."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

NO_DECAY_NAMES = ("mask_token", "gamma", ".grn.weight", ".grn.bias")


def exempt_from_weight_decay(name: str, p: torch.Tensor) -> bool:
    """1-D parameters, biases, GRN, layer scale and the FCMAE mask token are not decayed. The official
    ConvNeXt V2 fine-tuning exempts GRN too; its pretraining (timm's add_weight_decay) decays GRN and
    the mask token, which are 2-D / 4-D there: fcmae exempts them in both."""
    return p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in NO_DECAY_NAMES)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
    exempt: Callable[[str, torch.Tensor], bool] = exempt_from_weight_decay,
) -> list[dict]:
    """AdamW groups keyed by (lr scale, decayed or not), in the order parameters first appear, each
    with ``lr_scale`` (``lr_scale(name)``, 1 without it; ``set_lr`` applies it) and ``weight_decay``
    (0 for ``exempt`` parameters). Frozen parameters are left out."""
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale, no_decay = (lr_scale(name) if lr_scale else 1.0), exempt(name, p)
        group = groups.setdefault(
            (scale, no_decay), {"params": [], "lr_scale": scale, "weight_decay": 0.0 if no_decay else weight_decay}
        )
        group["params"].append(p)
    return list(groups.values())


def adamw(model: nn.Module, cfg, lr_scale: Callable[[str], float] | None = None) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` with the config's weight decay and betas (the lr is set every step)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, lr_scale), lr=0.0, betas=(cfg.beta1, cfg.beta2))


def lr_at(
    step: int,
    total_steps: int,
    warmup_steps: int,
    lr: float,
    min_lr: float = 0.0,
    kind: str = "cosine",
    milestones: tuple[int, ...] = (),
) -> float:
    """Linear warmup per iteration from 0, then a decay from ``lr`` to ``min_lr``: half-cycle cosine
    (MAE, ConvNeXt), ``poly`` with power 1, a straight line (mmsegmentation's PolyLR in the ConvNeXt
    UPerNet configs), or ``step``: x0.1 at each of ``milestones`` (steps; the Mask R-CNN 1x/3x
    schedules of Detectron and mmdetection)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    if kind == "step":
        return lr * 0.1 ** sum(step >= m for m in milestones)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "poly":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def backward_micro_batch(accelerator, model: nn.Module, loss_fn, accumulate: int, sync: bool) -> torch.Tensor:
    """Forward + backward of one micro-batch, its loss scaled by 1 / ``accumulate``. Gradients are
    all-reduced across processes only when ``sync`` (the last micro-batch of an optimizer step).
    Returns the unscaled loss, detached, still on the device."""
    with contextlib.nullcontext() if sync else accelerator.no_sync(model):
        loss = loss_fn()
        accelerator.backward(loss / accumulate)
    return loss.detach()


def optimizer_step(
    accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float | None = None
) -> None:
    if clip_grad:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
