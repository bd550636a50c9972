"""``dense`` backend: the readable reference. Every op runs on the full grid; masked sites are zeroed
before each spatial op and excluded from GRN statistics, which is exactly what a submanifold sparse
network computes at the visible sites."""

from __future__ import annotations

from torch import Tensor

from .masking import keep_map

Grid = tuple[int, int]  # the (h, w) patch grid


def _block(blk, x: Tensor, keep: Tensor, scale: Tensor | None = None) -> Tensor:
    """One ConvNeXt block on a map whose masked sites are zero; returns the same."""
    y = blk.conv_dw(x).permute(0, 2, 3, 1)
    y = blk.mlp.act(blk.mlp.fc1(blk.norm(y)))
    # GRN: L2 norms over visible sites only, per sample (the official ME code pools over the batch)
    y = blk.mlp.fc2(blk.mlp.grn(y * keep.permute(0, 2, 3, 1)))
    if blk.gamma is not None:
        y = y * blk.gamma
    return (x + blk.drop(y.permute(0, 3, 1, 2), scale)) * keep


def forward_encoder(
    encoder, imgs: Tensor, mask: Tensor, grid: Grid, num_visible: int | None = None, scales: Tensor | None = None
) -> Tensor:
    """imgs (N, C, H, W) with any C, mask (N, L) 0 keep / 1 remove over the (h, w) patch grid ->
    (N, C4, h, w), zero at masked patches. ``scales`` (N, blocks): per-sample drop-path factors."""
    x, i = encoder.stem(imgs), 0  # non-overlapping: masking its output suffices
    for stage in encoder.stages:
        x = stage.downsample(x)  # patch-aligned 2x2 windows: all-visible or all-masked
        keep = keep_map(mask, grid, x.shape[-2] // grid[0]).to(x.dtype)
        x = x * keep
        for blk in stage.blocks:  # through Block.run: sharded blocks gather their weights
            x = encoder.call_block(blk, x, keep, None if scales is None else scales[:, i], fn=_block)
            i += 1
    return x
