"""An ONNX-ready copy of a segmenter (transformers ``UperNetForSemanticSegmentation``): torch.onnx's
dynamo exporter, dynamic in batch, height and width, then computes the same logits at every size.

Why the stock network does not export correctly
-----------------------------------------------
UPerHead's pyramid pooling (PPM) runs ``nn.AdaptiveAvgPool2d(k)``, k = 1, 2, 3, 6, on the stride-32
feature map. ``torch.export`` keeps it as ``aten.adaptive_avg_pool2d`` with symbolic sizes, but the ONNX
exporter's decomposition (``torch._decomp.decompositions.adaptive_avg_pool2d``) rewrites it, when the
example's map side is divisible by k, into ``avg_pool2d(kernel=side // k, stride=side // k)``, and the
kernel, symbolic in the program, is written into the ONNX ``AveragePool`` attributes as the example's
number (no guard, no error). Exported at 384 px (12 x 12 map) the k = 2, 3, 6 branches become
AveragePool kernels 6, 4, 2: right at 384, wrong at every other size (k = 1 becomes a ReduceMean and
is fine). Swapping the pooling module with ``setattr`` does not help: ``UperNetPyramidPoolingBlock``
runs its layers from a plain Python list ``self.layers``, which still holds the original
AdaptiveAvgPool2d; ``prepare_for_onnx`` replaces it there too.

The fix keeps PyTorch's adaptive-pooling definition exactly (bin i of n cells over k bins covers cells
[floor(i n / k), ceil((i + 1) n / k)), the bins overlap when k does not divide n) but computes it as
weighted sums with averaging matrices built from the runtime size (Range / comparisons / Mul /
ReduceSum on the input's Shape), so nothing in the graph depends on the example's size. Every image
size the PyTorch network takes is then exported exactly: any batch >= 1, any height and width >= 32
px (not only multiples of 32 or 192). Below 32 px the stride-32 map is empty and PyTorch and ORT both
fail (their Conv raises); the export refuses that size.

Everything else in the head already exports correctly: the PPM / FPN / final ``interpolate(size=...)``
become Resize (linear, half_pixel, ``sizes`` computed from Shape), BatchNorm (eval: running
statistics) has no shape in it, the auxiliary head is dead code for the logits output.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

MIN_SIDE = 32  # the stride-32 feature map has floor(side / 32) cells: PyTorch itself fails below 32 px


def _averaging_matrix(n, k: int, like: torch.Tensor) -> torch.Tensor:
    """(k, n) matrix whose row i averages cells [floor(i n / k), ceil((i + 1) n / k)): the bins of
    ``adaptive_avg_pool`` (PyTorch's start_index / end_index). ``n`` may be symbolic."""
    i = torch.arange(k, device=like.device, dtype=torch.int64)
    start = torch.div(i * n, k, rounding_mode="floor")
    end = torch.div((i + 1) * n + (k - 1), k, rounding_mode="floor")
    cells = torch.arange(n, device=like.device, dtype=torch.int64)
    inside = (cells >= start.unsqueeze(1)) & (cells < end.unsqueeze(1))
    return inside.to(like.dtype) / (end - start).unsqueeze(1).to(like.dtype)


class ExportableAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` for any input size, as ``P_h @ x @ P_w^T`` with averaging matrices built
    from the input's runtime size: the same bins and means as PyTorch's kernel (only the float summation
    order differs, ~1e-7 relative), exported by torch.onnx as Range / Less / Mul / ReduceSum on the
    input's shape instead of an AveragePool whose kernel is frozen to the example's size. (The bin
    bounds go through float32 in ONNX (Div + Floor): exact for map sides < 2**24 / 6.)"""

    def __init__(self, output_size):
        super().__init__()
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
        if any(s is None for s in size):
            raise ValueError(f"output_size {output_size!r}: None (keep the input size) is not supported.")
        self.output_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph = _averaging_matrix(h, self.output_size[0], x)  # (kh, h)
        pw = _averaging_matrix(w, self.output_size[1], x)  # (kw, w)
        # Weighted sums by broadcasting rather than matmul: torch's matmul decides between its fold and
        # batched paths by asking whether the map side is 1, which torch.export records as a guard
        # (side != 1, i.e. images >= 64 px). The products are small: the map is the stride-32 one.
        y = (x.unsqueeze(-2) * pw).sum(-1)  # (..., h, 1, w) * (kw, w) -> (..., h, kw)
        return (y.unsqueeze(-3) * ph.unsqueeze(-1)).sum(-2)  # (..., 1, h, kw) * (kh, h, 1) -> (..., kh, kw)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


def _replace_child(parent: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    setattr(parent, name, new)
    # transformers' UperNetPyramidPoolingBlock runs ``self.layers``, a plain list next to the registered
    # children: setattr alone leaves the old module in the forward path. Replace it in any such container.
    for attr, value in list(vars(parent).items()):
        if isinstance(value, (list, tuple)) and any(v is old for v in value):
            replaced = [new if v is old else v for v in value]
            object.__setattr__(parent, attr, type(value)(replaced))


def prepare_for_onnx(segmenter: nn.Module) -> nn.Module:
    """An export-ready copy of ``segmenter`` (a transformers UperNet, e.g. ``build_segmenter(...)``) in
    eval mode: same weights, same logits.

    What changes: every ``nn.AdaptiveAvgPool2d`` (UPerHead's pyramid pooling, output sizes 1, 2, 3, 6 on
    the stride-32 map) becomes ``ExportableAdaptiveAvgPool2d``, the same bins and means computed as
    matrix products built from the runtime size, swapped both as registered child and inside the Python
    list (``UperNetPyramidPoolingBlock.layers``) the forward iterates. Why: torch.onnx's dynamo exporter
    lowers AdaptiveAvgPool2d to an ONNX AveragePool whose kernel and stride are the example's map size
    // k, so an export is only right at the example's image size. Nothing else is changed: the
    top-down and final ``interpolate(size=...)`` export as Resize (linear, half_pixel, sizes read from
    the runtime shapes) and match, BatchNorm is in eval mode (running statistics), the auxiliary head is
    computed but not part of the output. The original module is left untouched."""
    net = copy.deepcopy(segmenter).eval()
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.AdaptiveAvgPool2d):
                _replace_child(parent, name, child, ExportableAdaptiveAvgPool2d(child.output_size))
    return net
