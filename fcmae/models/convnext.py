"""ConvNeXt V1 and V2: one block, one network, registered timm-style.

Parameter names follow timm's ConvNeXt (``stem.0``, ``stages.i.downsample.1``,
``stages.i.blocks.j.conv_dw``, ``.norm``, ``.mlp.fc1``, ``.mlp.grn.weight``, ``.mlp.fc2``,
``head.norm``, ``head.fc``), with the MLP stored as Linear layers in every size, so timm weights load
by renaming alone. V1 and V2 differ by two flags: layer scale (V1) and GRN (V2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..sparse.masking import STREAM_DROP_PATH, keyed_uniform
from .layers import LN_EPS, LayerNorm2d, Mlp


@dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple[int, ...]
    dims: tuple[int, ...]
    grn: bool = True  # ConvNeXt V2
    ls_init_value: float | None = None  # ConvNeXt V1 layer scale
    stem_patch: int = 4
    stem_norm: bool = True  # the isotropic V1 models patchify without a norm


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> Linear(C, 4C) -> GELU -> [GRN] -> Linear(4C, C) -> [layer scale]
    -> drop path -> residual. Input and output (N, C, H, W)."""

    def __init__(self, dim: int, grn: bool, ls_init_value: float | None, drop_path: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, 4 * dim, use_grn=grn)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init_value)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``scale``: this block's per-sample drop-path factors (``drop_path_scales``); None: timm's
        DropPath draws them from torch's RNG."""
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x * self.gamma
        return shortcut + self.drop(x.permute(0, 3, 1, 2), scale)

    def drop(self, y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """Stochastic depth on the residual branch ``y`` (N, ...): per-sample ``scale`` factors (0 or
        1 / keep probability), or timm's DropPath."""
        if scale is None:
            return self.drop_path(y)
        return y * scale.to(y.dtype).view(-1, *([1] * (y.ndim - 1)))

    @property
    def drop_prob(self) -> float:
        return getattr(self.drop_path, "drop_prob", 0.0)

    def run(self, fn, *args):
        """``fn(self, *args)``. The sparse FCMAE backends evaluate a block's submodules through free
        functions instead of ``forward``; calling them through this method lets a sharding wrapper
        treat it as a forward: FSDP2 all-gathers a block's parameters only around ``forward`` and
        the methods given to ``torch.distributed.fsdp.register_fsdp_forward_method``."""
        return fn(self, *args)


class Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: list[float], cfg: ConvNeXtConfig, first: bool):
        super().__init__()
        if first:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, dim, kernel_size=2, stride=2))
        self.blocks = nn.Sequential(*[Block(dim, cfg.grn, cfg.ls_init_value, dp) for dp in drop_paths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class Head(nn.Module):
    """Global average pool -> LayerNorm -> dropout -> Linear."""

    def __init__(self, dim: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean((2, 3)))
        return x if pre_logits else self.fc(self.drop(x))


class ConvNeXt(nn.Module):
    """ConvNeXt V1/V2 classifier on (N, in_chans, H, W) images. ``forward_features`` gives the final map
    (N, C4, H/32, W/32)."""

    def __init__(
        self,
        cfg: ConvNeXtConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
        drop_rate: float = 0.0,
        name: str | None = None,
    ):
        super().__init__()
        self.cfg, self.name = cfg, name
        self.in_chans = in_chans  # image channels the stem takes (3 for RGB; any count, as in timm)
        self.num_classes = num_classes
        self.num_features = cfg.dims[-1]
        p = cfg.stem_patch
        stem = [nn.Conv2d(in_chans, cfg.dims[0], kernel_size=p, stride=p)]
        if cfg.stem_norm:
            stem.append(LayerNorm2d(cfg.dims[0]))
        self.stem = nn.Sequential(*stem)
        # drop path grows linearly from 0 to drop_path_rate over all blocks
        dp = torch.linspace(0, drop_path_rate, sum(cfg.depths), device="cpu").tolist()  # works under a meta device
        stages, start, in_dim = [], 0, cfg.dims[0]
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            stages.append(Stage(in_dim, dim, depth, dp[start : start + depth], cfg, first=i == 0))
            start, in_dim = start + depth, dim
        self.stages = nn.Sequential(*stages)
        self.head = Head(self.num_features, num_classes, drop_rate)
        self.total_stride = p * 2 ** (len(cfg.dims) - 1)
        self.feature_info = [dict(num_chs=d, reduction=p * 2**i, module=f"stages.{i}") for i, d in enumerate(cfg.dims)]
        self.apply(_init_weights)
        if isinstance(self.head.fc, nn.Linear):
            self.head.fc.weight.data.mul_(head_init_scale)
            self.head.fc.bias.data.mul_(head_init_scale)

    def check_input(self, x: torch.Tensor) -> None:
        s, name = self.total_stride, self.name or "ConvNeXt"
        if x.ndim == 4 and x.shape[1] != self.in_chans:
            raise ValueError(
                f"{name} was built for {self.in_chans}-channel images; got shape {tuple(x.shape)}. "
                f"Create the model with in_chans={x.shape[1]}, or give it {self.in_chans}-channel input."
            )
        if x.ndim != 4 or x.shape[-2] % s or x.shape[-1] % s:
            raise ValueError(
                f"{name} takes (N, {self.in_chans}, H, W) images with H and W multiples of {s}; "
                f"got shape {tuple(x.shape)}. Resize or crop the input to a multiple of {s} "
                f"(e.g. {max(s, x.shape[-2] // s * s)}x{max(s, x.shape[-1] // s * s)})."
            )

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's interface: recompute each block's activations in the backward pass instead of
        keeping them (memory for about a third more compute; torch's non-reentrant checkpoint)."""
        self.grad_checkpointing = enable

    def call_block(self, blk: Block, *args, fn=None) -> torch.Tensor:
        """``blk(*args)``, or ``blk.run(fn, *args)`` (a sparse backend's way into the block), under
        activation checkpointing when it is on and gradients are being recorded."""
        call = blk if fn is None else functools.partial(blk.run, fn)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(call, *args, use_reentrant=False)
        return call(*args)

    def drop_path_scales(self, keys: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """(N, blocks) per-sample drop-path factors (0, or 1 / keep probability) drawn from each
        sample's key (fcmae.sparse.masking.keyed_uniform): a sample's draws then do not depend on how
        the batch is split over processes. None without keys, in eval mode, or without drop path."""
        probs = [blk.drop_prob for stage in self.stages for blk in stage.blocks]
        if keys is None or not self.training or not any(probs):
            return None
        keep = 1.0 - torch.tensor(probs, dtype=torch.float64, device=like.device)
        u = keyed_uniform(keys.to(like.device), len(probs), STREAM_DROP_PATH)
        return ((u < keep) / keep).float()

    def _stages(self, x: torch.Tensor, keys: torch.Tensor | None, outs: list | None = None) -> torch.Tensor:
        scales, i = self.drop_path_scales(keys, x), 0
        for stage in self.stages:
            x = stage.downsample(x)
            for blk in stage.blocks:
                x = self.call_block(blk, x, None if scales is None else scales[:, i])
                i += 1
            if outs is not None:
                outs.append(x)
        return x

    def forward_features(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C4, H/32, W/32). ``keys`` (N,): per-sample keys for drop path (None: torch's RNG)."""
        self.check_input(x)
        return self._stages(self.stem(x), keys)

    def forward_intermediates(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The output of every stage (strides 4, 8, 16, 32 for the hierarchical models), for dense
        heads; channels and strides are in ``feature_info``."""
        self.check_input(x)
        outs = []
        self._stages(self.stem(x), keys, outs)
        return outs

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, keys))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head.fc)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
