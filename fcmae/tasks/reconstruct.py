"""Reconstruction panels: original | masked | prediction | prediction pasted into the masked
patches of the original (visible patches kept), one row per image."""
from __future__ import annotations

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


@torch.no_grad()
def reconstruction_panel(forward, model, imgs: torch.Tensor, mask: torch.Tensor) -> Image.Image:
    """imgs (N, 3, H, W) normalised; mask (N, L) 0 keep / 1 remove. ``forward`` runs the model (the
    Accelerate-wrapped one, so sharded models work too), ``model`` is the unwrapped FCMAE.
    Returns one PIL image."""
    _, pred, _ = forward(imgs, mask)
    grid = model.grid(imgs)
    pred = pred.float()
    if model.norm_pix_loss:  # predictions are per-patch normalised: undo with the true patch statistics
        target = model.patchify(imgs.float())
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    pred = model.unpatchify(pred, grid)
    p = model.patch_size
    pix = mask.float().reshape(-1, 1, grid[0], 1, grid[1], 1).expand(-1, 1, grid[0], p, grid[1], p)
    pix = pix.reshape(-1, 1, imgs.shape[-2], imgs.shape[-1])
    imgs = imgs.float()
    rows = torch.cat([imgs, imgs * (1 - pix), pred, imgs * (1 - pix) + pred * pix], dim=-1)  # side by side
    panel = torch.cat(list(rows), dim=-2)  # images stacked vertically
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    panel = ((panel.cpu() * std + mean).clamp(0, 1) * 255).round().byte()
    return Image.fromarray(panel.permute(1, 2, 0).numpy())
