"""Patch masks and the per-stage views of them. Convention everywhere: 0 = keep, 1 = remove."""
from __future__ import annotations

import torch


def num_keep(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample: ``int(L * (1 - ratio))``, the same for every sample."""
    return int(num_patches * (1 - mask_ratio))


def gen_random_mask(n: int, num_patches: int, mask_ratio: float, device=None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Random per-sample mask (N, L), 0 keep / 1 remove, keeping ``int(L * (1 - ratio))`` patches."""
    keep = num_keep(num_patches, mask_ratio)
    if keep < 1:
        raise ValueError(f"mask_ratio {mask_ratio} keeps no patch of {num_patches}; use a lower ratio or larger images.")
    noise = torch.rand(n, num_patches, device=device, generator=generator)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise; the `keep` smallest are kept
    return (ranks >= keep).float()


def keep_map(mask: torch.Tensor, grid: tuple[int, int], scale: int) -> torch.Tensor:
    """The mask as a visibility map (N, 1, h*scale, w*scale): 1 where visible, 0 where masked."""
    n = mask.shape[0]
    keep = (1 - mask).reshape(n, 1, grid[0], 1, grid[1], 1)
    return keep.expand(n, 1, grid[0], scale, grid[1], scale).reshape(n, 1, grid[0] * scale, grid[1] * scale)


def count_visible(mask: torch.Tensor) -> int:
    """Visible patches per sample of a mask, checking every sample has the same count (a host sync:
    masks made by ``gen_random_mask`` carry a known count instead)."""
    visible = (mask == 0).sum(1)
    if not bool((visible == visible[0]).all()):
        raise ValueError(f"Every sample must keep the same number of patches; got {visible.tolist()}.")
    return int(visible[0])


def keep_indices(mask: torch.Tensor, num_visible: int | None = None) -> torch.Tensor:
    """Indices (N, V) of the visible patches of each sample, ascending."""
    if num_visible is None:
        num_visible = count_visible(mask)
    return mask.argsort(dim=1, stable=True)[:, :num_visible]


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), each patch flattened in (row, col, channel) order."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], chans: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, h*p, w*p), the inverse of ``patchify`` for an (h, w) patch grid."""
    n, (h, w) = x.shape[0], grid
    x = x.reshape(n, h, w, p, p, chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, chans, h * p, w * p)
