"""``minkowski`` backend: the encoder on real MinkowskiEngine sparse tensors, as the official FCMAE
code runs it, but with the dense model's own parameters and per-sample GRN statistics.

Layout. A site is one pixel of a stage's feature map; ME coordinates are ``(batch, row, col)`` in
input pixels (the image's first axis, H, is ME's first spatial axis), with tensor stride 4 after
the stem and 8, 16, 32 after the downsamples. ME enumerates kernel offsets with its first spatial
axis fastest, so a dense weight ``w[..., kh, kw]`` sits at kernel row ``kh + k * kw``
(``tests/test_minkowski.py`` checks this against ``F.conv2d``).

- Stem: the dense 4x4 stride-4 conv (non-overlapping, so gathering its visible sites afterwards is
  exact), then the stem LayerNorm per site.
- Block: 7x7 depthwise conv with ``MinkowskiChannelwiseConvolution`` (upstream; the official fork's
  CUDA-only ``MinkowskiDepthwiseConvolution`` when it exists and the input is on CUDA) + bias;
  LayerNorm, Linear, GELU per site with the dense modules on the (M, C) feature matrix; GRN with
  L2 norms over each sample's own active sites (the official code pools over the whole batch, an
  open upstream bug); layer scale; drop path drawn exactly as timm's ``DropPath`` draws it for an
  (N, C, H, W) map, so a seeded run drops the same samples as the ``dense`` backend; residual.
- Downsample: LayerNorm per site, then a 2x2 stride-2 ``MinkowskiConvolution`` + bias.
- Output: scattered into a zero (N, C4, h, w) map.

The ME modules own no parameters: their kernels are reshapes of the dense weights, set per call, so
gradients flow to the dense model's parameters and nothing has to be copied or kept in sync. Each
forward builds its own ME coordinate manager with torch's thread count (ME's default resets the
OpenMP thread count to the number of cores on every construction). MinkowskiEngine is imported on
first use, never by ``import fcmae``.
"""

from __future__ import annotations

import collections
import collections.abc
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masking import keep_map

INSTALL_HINT = (
    "The 'minkowski' backend needs MinkowskiEngine 0.5.4, an optional dependency built from source. "
    "Install it into the active virtual environment with `bash .ci/install_minkowski.sh` (needs a C++ "
    "compiler and libopenblas-dev; see docs/minkowski.md), or use backend='gather' (fastest) or 'dense' "
    "(reference), which compute the same thing."
)

_ME = None
_MODULES: dict = {}


def import_minkowski():
    """Import MinkowskiEngine, aliasing the ``collections`` ABCs that ME 0.5.4 still imports from
    ``collections`` (removed in Python 3.10). Raises ImportError with install steps if missing."""
    global _ME
    if _ME is None:
        for name in ("Sequence", "Mapping", "MutableMapping", "Iterable"):
            if not hasattr(collections, name):
                setattr(collections, name, getattr(collections.abc, name))
        try:
            with warnings.catch_warnings():  # a CPU-only build says so on every import
                warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
                import MinkowskiEngine as ME
        except ImportError as e:  # also catches a broken build (undefined symbols, ABI mismatch)
            raise ImportError(f"{INSTALL_HINT} (import failed: {e})") from e
        _ME = ME
    return _ME


def _module(kind: str, *args):
    """A cached ME conv module with its ``kernel`` parameter removed (the kernel is set per call).
    Built under a forked RNG: ME's constructors draw random kernels, and the global RNG stream must
    stay as the dense backend sees it (drop path draws)."""
    key = (kind, *args)
    mod = _MODULES.get(key)
    if mod is None:
        ME = import_minkowski()
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*should not be instantiated.*")  # ME 0.5.4 vs torch 2.x
            if kind == "depthwise":
                mod = ME.MinkowskiDepthwiseConvolution(args[0], kernel_size=7, bias=False, dimension=2)
            elif kind == "channelwise":
                mod = ME.MinkowskiChannelwiseConvolution(args[0], kernel_size=7, bias=False, dimension=2)
            else:  # "down": 2x2 stride 2
                mod = ME.MinkowskiConvolution(args[0], args[1], kernel_size=2, stride=2, bias=False, dimension=2)
        del mod.kernel  # drop the Parameter; a plain attribute takes its place per call
        mod.kernel = None
        _MODULES[key] = mod
    return mod


def _conv(mod, x, kernel: torch.Tensor, native: bool = True):
    """``mod(x)`` with ``kernel`` (a reshape of a dense weight, so autograd reaches that weight).
    ``native``: the op runs in ME's C++/CUDA code, which takes fp32/fp64 only (upcast otherwise,
    e.g. under bf16 autocast); the channelwise conv is plain torch and runs in any dtype."""
    if native and x.F.dtype not in (torch.float32, torch.float64):
        x = _with_features(import_minkowski(), x, x.F.float())
    mod.kernel = kernel.to(x.F.dtype).contiguous()
    try:
        return mod(x)
    finally:
        mod.kernel = None  # do not keep the graph alive between calls


def depthwise_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Dense depthwise weight (C, 1, k, k) -> ME channelwise kernel (k*k, C), row kh + k*kw."""
    c, _, k, _ = weight.shape
    return weight[:, 0].permute(2, 1, 0).reshape(k * k, c)


def conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Dense conv weight (Cout, Cin, k, k) -> ME kernel (k*k, Cin, Cout), row kh + k*kw."""
    o, i, k, _ = weight.shape
    return weight.permute(3, 2, 1, 0).reshape(k * k, i, o)


def coordinate_manager(like: torch.Tensor):
    """A fresh ME coordinate manager for tensors like ``like``. ME's default calls
    ``omp_set_num_threads(min(os.cpu_count(), 20))`` on the calling thread at every construction,
    silently undoing ``torch.set_num_threads``; pass torch's own thread count instead."""
    ME = import_minkowski()
    kind = ME.CoordinateMapType.CUDA if like.is_cuda else ME.CoordinateMapType.CPU
    return ME.CoordinateManager(D=2, num_threads=torch.get_num_threads(), coordinate_map_type=kind)


def _with_features(ME, x, feats: torch.Tensor):
    return ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)


def _layer_norm(norm: nn.LayerNorm, feats: torch.Tensor) -> torch.Tensor:
    # LayerNorm2d expects (N, C, H, W); on (M, C) the plain functional form is the same per-site op
    return F.layer_norm(feats, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _grn(grn: nn.Module, feats: torch.Tensor, batch: torch.Tensor, n: int) -> torch.Tensor:
    """GRN with the L2 norm over each sample's active sites (per sample, not per batch)."""
    if not hasattr(grn, "weight"):
        return grn(feats)  # nn.Identity: a V1 block
    sq = feats.new_zeros(n, feats.shape[1]).index_add(0, batch, feats * feats)
    # the clamp only keeps sqrt's gradient finite at 0, where vector_norm's gradient is 0 as well
    gx = sq.clamp_min(torch.finfo(sq.dtype).tiny).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + grn.eps)
    return torch.addcmul(grn.bias + feats, grn.weight, feats * nx[batch])


def _block(ME, blk, x, n: int, scale=None):
    feats = x.F
    batch = x.C[:, 0].long().to(feats.device)
    kernel = depthwise_kernel(blk.conv_dw.weight)
    c = kernel.shape[1]
    if feats.is_cuda and hasattr(ME, "MinkowskiDepthwiseConvolution"):
        y = _conv(_module("depthwise", c), x, kernel).F
    else:
        y = _conv(_module("channelwise", c), x, kernel, native=False).F
    if blk.conv_dw.bias is not None:
        y = y + blk.conv_dw.bias
    mlp = blk.mlp
    y = mlp.act(mlp.fc1(blk.norm(y)))
    y = mlp.fc2(_grn(mlp.grn, y, batch, n))
    if blk.gamma is not None:
        y = y * blk.gamma
    if scale is None and not isinstance(blk.drop_path, nn.Identity):
        # timm's DropPath on the dense (N, C, H, W) map draws new_empty((N, 1, 1, 1)).bernoulli_(keep)
        # and divides by keep; applying it to ones of that shape makes the very same draw
        scale = blk.drop_path(feats.new_ones(n, 1, 1, 1)).reshape(n)
    if scale is not None:
        y = y * scale.to(y.dtype)[batch].unsqueeze(1)
    return _with_features(ME, x, feats + y)


def __getattr__(name: str):
    # `from .minkowski import forward_encoder` (what `get_backend("minkowski")` does when an FCMAE
    # is built) imports MinkowskiEngine, so a missing install fails at construction with the install
    # steps, not at the first training step; importing this module alone never needs it.
    if name == "forward_encoder":
        import_minkowski()
        return _forward_encoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _forward_encoder(
    encoder,
    imgs: Tensor,
    mask: Tensor,
    grid: tuple[int, int],
    num_visible: int | None = None,
    scales: Tensor | None = None,
) -> Tensor:
    """imgs (N, C, H, W) with any C, mask (N, L) 0 keep / 1 remove over the (h, w) patch grid ->
    (N, C4, h, w), zero at masked patches. ``num_visible`` is accepted for the backend interface and
    not needed: sparse tensors hold any number of sites per sample. ``scales`` (N, blocks): per-sample
    drop-path factors."""
    if encoder.grad_checkpointing:
        raise ValueError(
            "--grad-checkpointing does not run with --backend minkowski (its sparse tensors cannot be "
            "recomputed by torch.utils.checkpoint); use --backend gather, the fast one."
        )
    ME = import_minkowski()
    n = imgs.shape[0]
    h, w = grid
    patch = imgs.shape[-2] // h
    stem = encoder.stem
    dense = stem[0](imgs)  # (N, C1, H/s, W/s); non-overlapping, so exact at the visible sites
    s = imgs.shape[-2] // dense.shape[-2]
    keep = keep_map(mask, grid, dense.shape[-2] // h)[:, 0] > 0
    b, r, c = keep.nonzero(as_tuple=True)
    feats = dense.permute(0, 2, 3, 1)[b, r, c]
    if len(stem) > 1:
        feats = _layer_norm(stem[1], feats)
    coords = torch.stack([b, r * s, c * s], dim=1).int().to(feats.device)
    x = ME.SparseTensor(feats, coordinates=coords, tensor_stride=s, coordinate_manager=coordinate_manager(feats))
    i = 0
    for stage in encoder.stages:
        ds = stage.downsample
        if not isinstance(ds, nn.Identity):
            norm, conv = ds[0], ds[1]
            x = _with_features(ME, x, _layer_norm(norm, x.F))
            x = _conv(_module("down", conv.in_channels, conv.out_channels), x, conv_kernel(conv.weight))
            if conv.bias is not None:
                x = _with_features(ME, x, x.F + conv.bias)
        for blk in stage.blocks:
            x = _block(ME, blk, x, n, None if scales is None else scales[:, i])
            i += 1
    coords = x.C.long().to(imgs.device)
    out = x.F.new_zeros(n, h, w, x.F.shape[1])
    out = out.index_put((coords[:, 0], coords[:, 1] // patch, coords[:, 2] // patch), x.F)
    return out.permute(0, 3, 1, 2).contiguous()
