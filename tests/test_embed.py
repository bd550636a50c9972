"""``fcmae embed``: a classifier's embeddings are timm's pre-logits of its export (preprocessed with
the model's own timm data config), an encoder's are the global average of its last stage as timm
computes it; unreadable files are named and skipped."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli
from PIL import Image
from safetensors.torch import save_file

import fcmae
from fcmae.weights import hub

timm = pytest.importorskip("timm")
SIZE = 64


def perturbed(num_classes: int):
    model = fcmae.create_model("convnextv2_atto", num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.02))
    return model.eval()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(70, 90), (64, 64), (120, 80), (50, 130), (96, 96)]):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"img{i}.png")
    (root / "b" / "broken.jpg").write_bytes(b"not an image")
    return root


def embeddings(path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    return {p: np.asarray(e, np.float32) for p, e in zip(table["path"].to_pylist(), table["embedding"].to_pylist())}


def test_classifier_embeddings_are_timm_pre_logits(photos, tmp_path):
    model = perturbed(3)
    run = tmp_path / "run"
    run.mkdir()
    meta = {
        "format": "fcmae-classifier",
        "model": "convnextv2_atto",
        "num_classes": "3",
        "input_size": str(SIZE),
        "class_names": json.dumps(["x", "y", "z"]),
    }
    save_file(model.state_dict(), str(run / "best.safetensors"), metadata=meta)
    proc = run_cli(
        [
            "-m",
            "fcmae",
            "embed",
            photos,
            "--checkpoint",
            run,
            "--out",
            tmp_path / "emb.parquet",
            "--batch-size",
            "2",
            "--num-workers",
            "0",
        ],
        check=False,
    )
    assert proc.returncode == 1 and "broken.jpg" in proc.stderr and "1 of 6 images could not be read" in proc.stderr
    got = embeddings(tmp_path / "emb.parquet")
    assert len(got) == 5 and all(v.shape == (320,) for v in got.values())

    export = hub.export(run / "best.safetensors", tmp_path / "timm_export", formats="timm")
    ref = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=ref))
    for path, value in got.items():
        x = transform(Image.open(path).convert("RGB"))[None]
        with torch.no_grad():
            want = ref.forward_head(ref.forward_features(x), pre_logits=True)[0].numpy()
        assert np.abs(value - want).max() <= 1e-5, path


def test_encoder_embeddings_are_the_pooled_last_stage(photos, tmp_path):
    model = perturbed(0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    config = {"model": "convnextv2_atto", "input_size": SIZE}
    save_file(
        state,
        str(tmp_path / "encoder.safetensors"),
        metadata={"format": "fcmae-encoder", "model": "convnextv2_atto", "config": json.dumps(config)},
    )
    proc = run_cli(
        [
            "-m",
            "fcmae",
            "embed",
            photos / "a",
            "--checkpoint",
            tmp_path / "encoder.safetensors",
            "--out",
            tmp_path / "enc.parquet",
            "--num-workers",
            "0",
        ]
    )
    assert "embedded 2 of 2" in proc.stdout
    ref = timm.create_model("convnextv2_atto", num_classes=0, pretrained=False).eval()
    ref.load_state_dict({k: v.reshape(ref.state_dict()[k].shape) for k, v in state.items()}, strict=False)
    transform = timm.data.create_transform(input_size=(3, SIZE, SIZE), crop_pct=0.875, interpolation="bicubic")
    for path, value in embeddings(tmp_path / "enc.parquet").items():
        x = transform(Image.open(path).convert("RGB"))[None]
        with torch.no_grad():
            want = ref.forward_features(x).mean((2, 3))[0].numpy()
        assert np.abs(value - want).max() <= 1e-5 * np.abs(want).max() + 1e-6, path
