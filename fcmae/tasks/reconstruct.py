"""Reconstruction panels: original | masked | prediction | prediction pasted into the masked
patches of the original (visible patches kept), one row per image."""
from __future__ import annotations

import torch
from PIL import Image


@torch.no_grad()
def reconstruction_panel(forward, model, imgs: torch.Tensor, mask: torch.Tensor, mean, std,
                         channels=(0, 1, 2)) -> Image.Image:
    """imgs (N, C, H, W) normalised with ``mean``/``std``; mask (N, L) 0 keep / 1 remove. ``forward``
    runs the model (the Accelerate-wrapped one, so sharded models work too), ``model`` is the
    unwrapped FCMAE. ``channels``: the three (or one, shown gray) channels drawn as RGB.
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
    panel = panel.cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    panel = (panel[list(channels)].clamp(0, 1) * 255).round().byte()
    return Image.fromarray(panel.expand(3, -1, -1).permute(1, 2, 0).numpy())
