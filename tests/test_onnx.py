"""ONNX exports: ONNX Runtime gives PyTorch's outputs within 1e-4 on another batch size and another
image size than the export's example, for a classifier (sides multiples of 32) and a segmenter (any
side of at least 32 px: its pyramid pooling is exported size-free); the sizes a graph cannot take are
refused in one line."""

import json

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

import fcmae
from fcmae.weights import artifacts

ort = pytest.importorskip("onnxruntime")


def onnx_outputs(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def perturb_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.02))
        for name, b in model.named_buffers():  # BatchNorm statistics of the segmentation heads
            if name.endswith("running_mean"):
                b.add_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(1 + torch.rand_like(b))
    return model.eval()


def test_classifier_onnx_matches_pytorch(tmp_path):
    model = perturb_(fcmae.create_model("convnextv2_atto", num_classes=5))
    meta = {
        "format": "fcmae-classifier",
        "model": "convnextv2_atto",
        "num_classes": "5",
        "input_size": "64",
        "class_names": json.dumps(list("abcde")),
    }
    save_file(model.state_dict(), str(tmp_path / "best.safetensors"), metadata=meta)
    out = artifacts.export(tmp_path / "best.safetensors", tmp_path / "onnx", "onnx")
    assert {p.name for p in out.iterdir()} == {"model.onnx", "onnx_config.json", "README.md"}
    config = json.loads((out / "onnx_config.json").read_text())
    assert config["label_names"] == list("abcde") and config["sizes"] == "height and width multiples of 32"
    for shape in ((3, 3, 96, 128), (1, 3, 224, 160)):
        x = torch.randn(*shape)
        with torch.no_grad():
            want = model(x)
        got = onnx_outputs(out / "model.onnx", x)
        assert got.shape == want.shape and ((got - want).abs().max() / want.abs().max()) <= 1e-4, shape


def test_segmenter_onnx_matches_pytorch_at_any_size(tmp_path):
    from fcmae.tasks.segment.artifact import segmenter_metadata
    from fcmae.tasks.segment.model import build_segmenter

    net = perturb_(build_segmenter("convnextv2_atto", 3, head_channels=32))
    save_file(
        net.state_dict(),
        str(tmp_path / "best.safetensors"),
        metadata=segmenter_metadata("convnextv2_atto", ["a", "b", "c"], 64, 32),
    )
    out = artifacts.export(tmp_path, tmp_path / "onnx", "onnx")
    assert json.loads((out / "onnx_config.json").read_text())["sizes"] == "height and width at least 32 px"
    for shape in ((1, 3, 200, 328), (3, 3, 192, 256), (2, 3, 32, 48)):
        x = torch.randn(*shape)
        with torch.no_grad():
            want = net(pixel_values=x).logits
        got = onnx_outputs(out / "model.onnx", x)
        assert got.shape == want.shape and ((got - want).abs().max() / want.abs().max()) <= 1e-4, shape
    proc = run_cli(
        [
            "-m",
            "fcmae",
            "export",
            "--checkpoint",
            tmp_path,
            "--out",
            tmp_path / "small",
            "--format",
            "onnx",
            "--onnx-size",
            "16",
        ],
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --onnx-size 16: give H or H,W, at least 32 px (the sides this model's graph takes)."
    )


def test_missing_extra_is_one_line_with_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    from fcmae.weights import onnx

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(ValueError, match=r'^ONNX export needs onnxscript: pip install "fcmae\[onnx\]"$'):
        onnx.require_onnx()
