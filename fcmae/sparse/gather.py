"""``gather`` backend: the fast path. Per-site work (norms, MLP, GRN, residual) runs only on the
visible sites, held as tokens (N, V, f, f, C): V visible patches per sample (the same count in every
sample, so no ragged batches), each an f x f block of sites at the current stage (f = 8, 4, 2, 1).
Only the depthwise convolution sees a grid: tokens are scattered into a zero-filled map, convolved,
and gathered back. The stem and the 2x2 downsamples act within a patch, so they run on tokens as
matrix products. Parameters are the dense model's own; nothing is copied."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masking import keep_indices


def _index(ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ids.view(*ids.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])


def to_grid(x: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens (N, V, f, f, C) -> zero-filled map (N, C, h*f, w*f) in channels_last memory."""
    n, _, f, _, c = x.shape
    h, w = grid
    full = x.new_zeros(n, h * w, f, f, c).scatter(1, _index(ids, x), x)
    full = full.view(n, h, w, f, f, c).transpose(2, 3).reshape(n, h * f, w * f, c)
    return full.permute(0, 3, 1, 2)


def from_grid(y: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Map (N, C, h*f, w*f) -> tokens (N, V, f, f, C) at the visible patches."""
    n, c = y.shape[:2]
    h, w = grid
    f = y.shape[-2] // h
    y = y.permute(0, 2, 3, 1).reshape(n, h, f, w, f, c).transpose(2, 3).reshape(n, h * w, f, f, c)
    return y.gather(1, _index(ids, y[:, : ids.shape[1]]))


def _stem(stem, imgs: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Patchify conv (k = stride = s) on the visible 32-px patches only, as one matrix product. Each
    s x s window is flattened in (channel, kh, kw) order, the order of ``conv.weight.flatten(1)``, so
    any channel count works."""
    conv = stem[0]
    s = conv.stride[0]
    n, c, H, _ = imgs.shape
    (h, w), p = grid, H // grid[0]
    f = p // s
    x = imgs.reshape(n, c, h, f, s, w, f, s).permute(0, 2, 5, 3, 6, 1, 4, 7).reshape(n, h * w, f, f, c * s * s)
    x = x.gather(1, _index(ids, x[:, : ids.shape[1]]))
    x = F.linear(x, conv.weight.flatten(1), conv.bias)
    if len(stem) > 1:
        x = F.layer_norm(x, stem[1].normalized_shape, stem[1].weight, stem[1].bias, stem[1].eps)
    return x


def _downsample(ds, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm then a 2x2 stride-2 conv, within each patch: (N, V, f, f, C) -> (N, V, f/2, f/2, C')."""
    norm, conv = ds[0], ds[1]
    x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    n, v, f, _, c = x.shape
    x = x.view(n, v, f // 2, 2, f // 2, 2, c).transpose(3, 4).reshape(n, v, f // 2, f // 2, 4 * c)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (o, i, kh, kw) -> (o, kh kw i)
    return F.linear(x, weight, conv.bias)


def _block(
    blk, x: torch.Tensor, ids: torch.Tensor, grid: tuple[int, int], scale: torch.Tensor | None = None
) -> torch.Tensor:
    y = from_grid(blk.conv_dw(to_grid(x, ids, grid)), ids, grid)
    y = blk.mlp(blk.norm(y))  # GRN's norm runs over the (V, f, f) visible sites of each sample
    if blk.gamma is not None:
        y = y * blk.gamma
    return x + blk.drop(y, scale)


def forward_encoder(
    encoder,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    grid: tuple[int, int],
    num_visible: int | None = None,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """imgs (N, C, H, W) with any C, mask (N, L) 0 keep / 1 remove -> (N, C4, h, w), zero at masked patches.
    ``num_visible``: patches kept per sample when known (avoids a host sync). ``scales`` (N, blocks):
    per-sample drop-path factors."""
    ids = keep_indices(mask, num_visible)
    x, i = _stem(encoder.stem, imgs, ids, grid), 0
    for stage in encoder.stages:
        if not isinstance(stage.downsample, torch.nn.Identity):
            x = _downsample(stage.downsample, x)
        for blk in stage.blocks:  # through Block.run: sharded blocks gather their weights
            x = encoder.call_block(blk, x, ids, grid, None if scales is None else scales[:, i], fn=_block)
            i += 1
    return to_grid(x, ids, grid).contiguous()
