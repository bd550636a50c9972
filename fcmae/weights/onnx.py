"""ONNX exports, through torch.onnx's dynamo exporter (torch.export, then onnxscript), checked
with ONNX Runtime before they are kept: a graph that computes something else than the PyTorch model
on another batch size and another image size is refused, never written.

The ``onnx`` extra holds what this needs: ``pip install "fcmae[onnx]"`` (onnx, onnxruntime, onnxscript).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import torch

from .files import write_atomic_text

TOLERANCE = 1e-4  # max |onnx - torch| / max |torch| on the check inputs


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not _importable(m)]
    if missing:
        raise ValueError(f'ONNX export needs {", ".join(missing)}: pip install "fcmae[onnx]"')


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def parse_size(size, multiple: int = 1, min_side: int = 32) -> tuple[int, int]:
    """``size`` (an int, "H" or "H,W") as (H, W), each at least ``min_side`` and a multiple of ``multiple``."""
    parts = [int(v) for v in str(size).replace("x", ",").split(",") if str(v).strip()]
    h, w = (parts * 2)[:2] if len(parts) in (1, 2) else (0, 0)
    if min(h, w) < min_side or h % multiple or w % multiple:
        rule = f"multiples of {multiple}" if multiple > 1 else f"at least {min_side} px"
        raise ValueError(f"--onnx-size {size}: give H or H,W, {rule} (the sides this model's graph takes).")
    return h, w


def write_onnx(
    module: torch.nn.Module,
    out: Path,
    in_chans: int,
    size,
    config: dict,
    multiple: int = 32,
    min_side: int = 32,
    prepare=None,
) -> Path:
    """``out/model.onnx`` of ``module`` (images (N, in_chans, H, W) -> its output) with a dynamic batch
    and sides of at least ``min_side`` px that are multiples of ``multiple``, and ``out/onnx_config.json``
    (``config`` + the input contract). ``size``: the example's sides. ``prepare(module)`` may return an
    export-friendly copy (same results). Checked with ONNX Runtime on another batch size and another
    image size before it is kept."""
    require_onnx()
    h, w = parse_size(size, multiple, min_side)
    module = (prepare(module) if prepare else module).eval()
    # examples of at least 2 in every dynamic dimension: torch.export specialises sizes 0 and 1
    step = max(multiple, min_side)
    example = torch.randn(2, in_chans, max(h, 2 * step), max(w, 2 * step))
    shapes = {
        "x": {
            0: torch.export.Dim("batch", min=1, max=1024),
            2: _side("height", multiple, min_side),
            3: _side("width", multiple, min_side),
        }
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".model.onnx.tmp{os.getpid()}"
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates every stage
        torch.onnx.export(
            _Input(module).eval(),
            (example,),
            str(tmp),
            dynamo=True,
            dynamic_shapes=shapes,
            opset_version=18,
            external_data=False,
        )
    checks = [example, torch.randn(3, in_chans, h + multiple if multiple > 1 else h + 37, w)]
    errors = _check_or_remove(tmp, module, checks)
    os.replace(tmp, out / "model.onnx")
    sides = f"multiples of {multiple}" if multiple > 1 else f"at least {min_side} px"
    contract = dict(
        input="x",
        input_shape=["batch", in_chans, "height", "width"],
        sizes=f"height and width {sides}",
        opset=18,
        checked_inputs=[list(x.shape) for x in checks],
        checked_relative_error=max(errors),
    )
    write_atomic_text(out / "onnx_config.json", json.dumps({**config, **contract}, indent=2) + "\n")
    return out / "model.onnx"


def _check_or_remove(tmp: Path, module, checks: list) -> list[float]:
    """ONNX Runtime's relative errors against ``module`` on ``checks``; ``tmp`` is removed if they fail."""
    try:
        errors = check_onnx(tmp, module, checks)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    if max(errors) > TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"The ONNX graph differs from the PyTorch model (relative errors {errors}) on inputs "
            f"{[tuple(x.shape) for x in checks]}: not written."
        )
    return errors


def _side(name: str, multiple: int, min_side: int):
    if multiple > 1:
        return multiple * torch.export.Dim(name, min=max(1, min_side // multiple), max=16384 // multiple)
    return torch.export.Dim(name, min=min_side, max=16384)


class _Input(torch.nn.Module):
    """The exported signature: one image tensor named ``x``, one output tensor."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        y = self.module(x)
        return getattr(y, "logits", y)


@torch.no_grad()
def check_onnx(path: Path, module: torch.nn.Module, inputs: list[torch.Tensor]) -> list[float]:
    """max |onnx - torch| / max |torch| of ``module`` on each input, run by ONNX Runtime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, errors = session.get_inputs()[0].name, []
    for x in inputs:
        got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
        want = _Input(module)(x).float()
        errors.append(float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    return errors
