"""Classification's evaluation: top-1 / top-5 over a validation loader, and ``--eval-only``."""

from __future__ import annotations

import torch


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
