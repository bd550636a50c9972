"""Optimizer parameter groups, the learning-rate schedule (set by hand every step), and the
micro-batch / optimizer step both training loops share."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

NO_DECAY_NAMES = ("mask_token", "gamma", ".grn.weight", ".grn.bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and exempt ones (1-D parameters, biases, GRN, mask token,
    layer scale)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float = 0.0, kind: str = "cosine",
          milestones: tuple[int, ...] = ()) -> float:
    """Linear warmup per iteration, then a decay from ``lr`` to ``min_lr``: half-cycle cosine (MAE,
    ConvNeXt), ``poly`` with power 1, a straight line (mmsegmentation's PolyLR in the ConvNeXt
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


def optimizer_step(accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                   clip_grad: float | None = None) -> None:
    if clip_grad:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
