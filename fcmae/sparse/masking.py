"""Patch masks and the per-stage views of them. Convention everywhere: 0 = keep, 1 = remove.

Per-sample randomness keyed by the sample: ``keyed_hash(keys, n, stream)`` gives every sample n
pseudo-random integers that depend only on its key (a function of (seed, epoch, global sample
index), computed by the data layer) and the stream (masks, drop path). A sample then gets the same
mask and drop path however the batch is split over processes: what makes a checkpoint resumable on
another number of processes with the same samples and draws at every step.
"""

from __future__ import annotations

import torch
from einops import rearrange

_MOD = 2**31 - 1  # hash arithmetic modulo a Mersenne prime: every product of two residues fits in int64
_ROUNDS = ((48271, 12345), (69621, 98765), (16807, 55555), (39373, 24680))  # Park-Miller-family multipliers
STREAM_MASK, STREAM_DROP_PATH = 1, 2


def keyed_hash(keys: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """(N, n) int64 in [0, 2^31 - 1): a counter-based hash of (key, stream, j) for each sample key
    (N,) and j < n. Integer arithmetic only, with no overflow: the same values on every device, eager
    or compiled, and no host sync."""
    j = torch.arange(n, device=keys.device, dtype=torch.int64)
    h = (keys.to(torch.int64).remainder(_MOD)[:, None] * 1_000_003 + stream * 7_919 + j[None] * 104_729) % _MOD
    for a, c in _ROUNDS:
        h = (h * a + c) % _MOD
        h = h ^ (h >> 16)
    return h


def sample_keys(seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """(N,) int64 keys of the samples with global indices ``index`` (N,) in ``epoch`` of a run seeded
    ``seed``: the key ``keyed_hash`` draws each sample's masks and drop path from."""
    index = torch.as_tensor(index, dtype=torch.int64)
    return (index * 2_147_483_629 + (epoch * 1_000_033 + seed * 999_983) % _MOD) % (2**62)


def keyed_uniform(keys: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """(N, n) float64 in [0, 1) from ``keyed_hash``."""
    return keyed_hash(keys, n, stream).double() / _MOD


def num_keep(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample: ``int(L * (1 - ratio))``, the same for every sample."""
    return int(num_patches * (1 - mask_ratio))


def gen_random_mask(
    n: int,
    num_patches: int,
    mask_ratio: float,
    device=None,
    generator: torch.Generator | None = None,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random per-sample mask (N, L), 0 keep / 1 remove, keeping ``int(L * (1 - ratio))`` patches:
    from torch's RNG (or ``generator``), or with ``keys`` (N,) from each sample's own key."""
    keep = num_keep(num_patches, mask_ratio)
    if keep < 1:
        raise ValueError(
            f"mask_ratio {mask_ratio} keeps no patch of {num_patches}; use a lower ratio or larger images."
        )
    if keys is not None:
        noise = keyed_hash(keys, num_patches, STREAM_MASK)
    else:
        noise = torch.rand(n, num_patches, device=device, generator=generator)
    ranks = noise.argsort(dim=1, stable=True).argsort(dim=1)  # each patch's rank; the `keep` smallest are kept
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
    return rearrange(imgs, "n c (h p) (w q) -> n (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], chans: int = 3) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, h*p, w*p), the inverse of ``patchify`` for an (h, w) patch grid."""
    return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid[0], w=grid[1], p=p, q=p, c=chans)
