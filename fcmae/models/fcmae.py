"""FCMAE: a ConvNeXt V2 encoder run with sparse semantics on the visible patches of a masked image,
a light ConvNeXt decoder, and a reconstruction loss on the masked patches (ConvNeXt V2, section 3).

Mask convention everywhere: (N, L) over the patch grid, 0 = keep (visible), 1 = remove (masked).
Images have the encoder's ``in_chans`` channels (C below; 3 for RGB): the decoder predicts p*p*C
values per patch and the loss runs over all C channels.
"""

from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from torch import nn

from ..sparse import count_visible, gen_random_mask, get_backend, num_keep, patchify, unpatchify
from .convnext import Block, ConvNeXt
from .registry import create_model, list_models


class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder around a dense ``ConvNeXt`` encoder (no head).

    ``forward(imgs, mask=None) -> (loss, pred, mask)`` with imgs (N, C, H, W), pred (N, L, p*p*C) in
    patchified (row, col, channel) order and mask (N, L); C is ``encoder.in_chans``.
    """

    def __init__(
        self,
        encoder: ConvNeXt,
        mask_ratio: float = 0.6,
        patch_size: int = 32,
        decoder_dim: int = 512,
        decoder_depth: int = 1,
        norm_pix_loss: bool = True,
        backend: str = "dense",
    ):
        super().__init__()
        if patch_size != encoder.total_stride:
            raise ValueError(
                f"patch_size must equal the encoder's total stride ({encoder.total_stride}) so that "
                f"masks align with every stage; got {patch_size}."
            )
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}.")
        self.encoder = encoder
        self.in_chans = encoder.in_chans
        self.mask_ratio, self.patch_size, self.norm_pix_loss = mask_ratio, patch_size, norm_pix_loss
        self.backend = backend
        get_backend(backend)  # fail now, not at the first step, on an unknown or missing backend
        self.proj = nn.Conv2d(encoder.num_features, decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(
            *[Block(decoder_dim, grn=True, ls_init_value=None, drop_path=0.0) for _ in range(decoder_depth)]
        )
        self.pred = nn.Conv2d(decoder_dim, patch_size**2 * self.in_chans, kernel_size=1)
        # std 0.02 everywhere: the official code re-initialises with std 1.0, a likely cause of NaNs
        for m in (self.proj, self.decoder, self.pred):
            m.apply(_init_weights)
        trunc_normal_(self.mask_token, std=0.02)

    def grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        p, c = self.patch_size, self.in_chans
        if imgs.ndim == 4 and imgs.shape[1] != c:
            raise ValueError(
                f"This FCMAE was built for {c}-channel images; got shape {tuple(imgs.shape)}. Create it "
                f"with in_chans={imgs.shape[1]}, or give it {c}-channel input."
            )
        if imgs.ndim != 4 or imgs.shape[-2] % p or imgs.shape[-1] % p:
            raise ValueError(
                f"FCMAE takes (N, {c}, H, W) images with H and W multiples of {p}; got "
                f"{tuple(imgs.shape)}. Resize or crop to a multiple of {p} (e.g. --input-size 224)."
            )
        return imgs.shape[-2] // p, imgs.shape[-1] // p

    def gen_random_mask(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, L) float mask, 0 keep / 1 remove, ``int(L * (1 - ratio))`` kept in every sample; from
        torch's RNG, or from each sample's key (``keys`` (N,), fcmae.sparse.masking.keyed_hash)."""
        h, w = self.grid(imgs)
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        return gen_random_mask(
            imgs.shape[0], h * w, ratio, device=imgs.device, keys=None if keys is None else keys.to(imgs.device)
        )

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C)."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); ``grid`` (h, w) defaults to square."""
        if grid is None:
            side = int(x.shape[1] ** 0.5)
            grid = (side, side)
        return unpatchify(x, self.patch_size, grid, self.in_chans)

    def forward_encoder(
        self, imgs: torch.Tensor, mask: torch.Tensor, num_visible: int | None = None, keys: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, C, H, W), mask (N, L) -> (N, C4, H/32, W/32); masked sites are zero, and visible ones
        depend on visible pixels only (submanifold sparse semantics, whatever the backend).
        ``num_visible``: patches kept per sample if known; else counted (and checked) from the mask.
        ``keys`` (N,): per-sample keys for drop path (None: torch's RNG)."""
        grid = self.grid(imgs)
        if mask.shape != (imgs.shape[0], grid[0] * grid[1]):
            raise ValueError(f"mask must be (N, L) = ({imgs.shape[0]}, {grid[0] * grid[1]}); got {tuple(mask.shape)}.")
        if num_visible is None and self.backend != "dense":
            num_visible = count_visible(mask)
        scales = self.encoder.drop_path_scales(keys, imgs)
        return get_backend(self.backend)(
            self.encoder, imgs, mask.to(imgs.dtype), grid, num_visible=num_visible, scales=scales
        )

    def forward_decoder(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, C4, h, w) -> (N, p*p*C, h, w): masked sites become the mask token before the decoder."""
        x = self.proj(x)
        n, _, h, w = x.shape
        m = mask.reshape(n, 1, h, w).to(x.dtype)
        x = x * (1 - m) + self.mask_token.to(x.dtype) * m
        return self.pred(self.decoder(x))

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch (over its p*p*C values), averaged over masked patches only.
        imgs (N, C, H, W); pred (N, L, p*p*C) or (N, p*p*C, h, w); mask (N, L)."""
        if pred.ndim == 4:
            pred = pred.flatten(2).transpose(1, 2)
        dtype = torch.promote_types(pred.dtype, torch.float32)  # the loss in fp32 (or wider) under autocast
        pred, target = pred.to(dtype), self.patchify(imgs).to(dtype)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)  # per patch, over all its pixels and channels
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp(min=1)  # ratio 0: nothing to reconstruct, loss 0

    def forward(
        self,
        imgs: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        keys: torch.Tensor | None = None,
    ):
        """imgs (N, C, H, W) -> (loss, pred (N, L, p*p*C), mask (N, L) 0 keep / 1 remove). ``keys`` (N,):
        each sample's key (a function of (seed, epoch, sample index)): its mask and drop path are drawn
        from it, the same however the batch is split over processes; None: torch's RNG."""
        num_visible = None
        if mask is None:
            mask = self.gen_random_mask(imgs, mask_ratio, keys)
            h, w = self.grid(imgs)
            num_visible = num_keep(h * w, self.mask_ratio if mask_ratio is None else mask_ratio)
        latent = self.forward_encoder(imgs, mask, num_visible, keys)
        pred = self.forward_decoder(latent, mask).flatten(2).transpose(1, 2)  # (N, L, p*p*C)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def create_fcmae(
    name: str,
    mask_ratio: float = 0.6,
    patch_size: int = 32,
    decoder_dim: int = 512,
    decoder_depth: int = 1,
    norm_pix_loss: bool = True,
    backend: str = "dense",
    drop_path_rate: float = 0.0,
    in_chans: int = 3,
) -> FCMAE:
    """FCMAE around ``create_model(name, in_chans=in_chans)`` without its head, for every ``convnextv2_*``
    name. ``in_chans``: image channels (3 for RGB); the decoder then predicts p*p*in_chans per patch."""
    if not name.startswith("convnextv2_"):
        raise ValueError(
            f"FCMAE pretrains ConvNeXt V2 models (GRN); got {name!r}. "
            f"Choose one of {', '.join(list_models('convnextv2_*'))}."
        )
    encoder = create_model(name, num_classes=0, drop_path_rate=drop_path_rate, in_chans=in_chans)
    encoder.head = nn.Identity()  # the encoder's state dict is create_model(name)'s minus head.*
    return FCMAE(encoder, mask_ratio, patch_size, decoder_dim, decoder_depth, norm_pix_loss, backend)
