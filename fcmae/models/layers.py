"""Small layers shared by every ConvNeXt variant: GRN, channels-first LayerNorm, the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # ConvNeXt uses 1e-6 everywhere (transformers' 1e-12 default is a known trap)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an (N, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = LN_EPS):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def grn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dims, eps: float = 1e-6) -> torch.Tensor:
    """Global Response Normalisation on a channels-last tensor.

    ``dims`` are the spatial axes the L2 norm runs over: (1, 2) for an (N, H, W, C) map, 1 for an
    (N, T, C) set of visible tokens. Sites that must not count (masked ones) have to be zero in the
    norm's input; callers pass them zeroed.
    """
    gx = torch.linalg.vector_norm(x, ord=2, dim=dims, keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    # gamma * (x * nx) + beta + x, written as x * (1 + gamma * nx) + beta: the factor is per (sample,
    # channel), so the full-size tensor is read and written once instead of three times
    return torch.addcmul(bias, x, 1 + weight * nx)


class GRN(nn.Module):
    """Global Response Normalisation (ConvNeXt V2), parameters stored 1-D as in timm."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grn(x, self.weight, self.bias, dims=tuple(range(1, x.ndim - 1)), eps=self.eps)


class Mlp(nn.Module):
    """Linear -> GELU -> (GRN) -> Linear on channels-last input; Linear weights in every size."""

    def __init__(self, dim: int, hidden: int, use_grn: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden) if use_grn else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.grn(self.act(self.fc1(x))))
