"""Sparse runners: ways of evaluating a dense ConvNeXt encoder on the visible patches only.
A backend is a function ``forward_encoder(encoder, imgs, mask, grid, num_visible=None) -> (N, C4, h, w)``
(``num_visible``: patches kept per sample, when the caller knows it); none owns
parameters, so every backend computes with the dense model's own weights."""

from __future__ import annotations

from .masking import count_visible, gen_random_mask, keep_indices, keep_map, num_keep, patchify, unpatchify

BACKENDS = ("dense", "gather", "minkowski")


def get_backend(name: str):
    if name == "dense":
        from .dense import forward_encoder
    elif name == "gather":
        from .gather import forward_encoder
    elif name == "minkowski":
        from .minkowski import forward_encoder
    else:
        raise ValueError(f"Unknown sparse backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    return forward_encoder


__all__ = [
    "BACKENDS",
    "count_visible",
    "gen_random_mask",
    "get_backend",
    "keep_indices",
    "keep_map",
    "num_keep",
    "patchify",
    "unpatchify",
]
