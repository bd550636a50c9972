"""Domain pretraining from the command line: --init-encoder from released layouts, the k-NN
monitor, N-channel arrays end to end. The sources are built here, by hand (official layout), with
timm or with transformers, never with fcmae's rename tables."""

import json

import numpy as np
import pytest
import timm
import torch
from conftest import run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from test_checkpoints import perturb_, to_official

PRETRAIN = "fcmae/pretrain.py"
SMALL = [
    "--input-size",
    "64",
    "--batch-size",
    "4",
    "--decoder-dim",
    "16",
    "--num-workers",
    "0",
    "--report-to",
    "none",
    "--log-every",
    "1",
]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (72, 80, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def timm_encoder():
    torch.manual_seed(0)
    return {k: v.clone() for k, v in perturb_(timm.create_model("convnextv2_atto", num_classes=0)).state_dict().items()}


def encoder_after_one_step_at_lr_zero(src, images, out) -> dict:
    run_cli(
        [
            PRETRAIN,
            *SMALL,
            "--init-encoder",
            src,
            "--lr",
            "0",
            "--max-steps",
            "1",
            "--num-recon",
            "0",
            "--data",
            images,
            "--output-dir",
            out,
        ]
    )
    return load_file(str(out / "encoder.safetensors"))


def test_init_encoder_from_the_official_release_holds_its_weights(images, timm_encoder, tmp_path):
    """The released convnextv2_*_1k_224_fcmae.pt: dense official names, GRN as (1, C), no head."""
    official = to_official(timm_encoder, grn_shape=(1, -1), with_head=False)
    torch.save({"model": official}, tmp_path / "convnextv2_atto_1k_224_fcmae.pt")
    got = encoder_after_one_step_at_lr_zero(tmp_path / "convnextv2_atto_1k_224_fcmae.pt", images, tmp_path / "out")
    expected = {k: v for k, v in timm_encoder.items() if not k.startswith("head.")}
    assert sorted(got) == sorted(expected)
    for k, v in expected.items():  # timm keeps atto's MLP as 1x1 convs: same numbers, other shape
        assert torch.equal(got[k], v.reshape(got[k].shape)), k


def test_init_encoder_from_timm_holds_its_weights(images, timm_encoder, tmp_path):
    save_file(timm_encoder, str(tmp_path / "model.safetensors"))
    got = encoder_after_one_step_at_lr_zero(tmp_path / "model.safetensors", images, tmp_path / "out")
    for k, v in timm_encoder.items():
        if not k.startswith("head."):
            assert torch.equal(got[k], v.reshape(got[k].shape)), k


def test_init_encoder_from_transformers_gives_its_features(images, tmp_path):
    import transformers

    torch.manual_seed(1)
    config = transformers.ConvNextV2Config(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], layer_norm_eps=1e-6)
    hf = perturb_(transformers.ConvNextV2Model(config)).eval()
    hf.save_pretrained(tmp_path / "hf")
    got = encoder_after_one_step_at_lr_zero(tmp_path / "hf", images, tmp_path / "out")
    import fcmae

    model = fcmae.create_model("convnextv2_atto", num_classes=0).eval()
    model.load_state_dict(got, strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model.forward_features(x), hf(x).last_hidden_state
    assert ((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5


def test_init_encoder_errors(images, timm_encoder, tmp_path):
    save_file(timm_encoder, str(tmp_path / "atto.safetensors"))
    both = run_cli(
        [
            PRETRAIN,
            *SMALL,
            "--init-encoder",
            tmp_path / "atto.safetensors",
            "--init-from",
            tmp_path,
            "--data",
            images,
            "--output-dir",
            tmp_path / "a",
        ],
        check=False,
    )
    assert both.returncode == 2 and "choose one" in both.stderr and "Traceback" not in both.stderr
    wrong = run_cli(
        [
            PRETRAIN,
            *SMALL,
            "--model",
            "convnextv2_femto",
            "--init-encoder",
            tmp_path / "atto.safetensors",
            "--max-steps",
            "1",
            "--data",
            images,
            "--output-dir",
            tmp_path / "b",
        ],
        check=False,
    )
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "convnextv2_atto" in wrong.stderr and "convnextv2_femto" in wrong.stderr
    assert not (tmp_path / "b" / "encoder.safetensors").exists()


def knn_by_hand(encoder: dict, folder, k: int = 20, temperature: float = 0.07) -> float:
    """DINO's weighted k-NN top-1 (percent) on timm's convnextv2_atto loaded with ``encoder``: its pooled
    last stage of the evaluation crop (timm's transform), cosine similarity, votes exp(sim / T)."""
    model = timm.create_model("convnextv2_atto", num_classes=0, pretrained=False).eval()
    model.load_state_dict({k: v.reshape(model.state_dict()[k].shape) for k, v in encoder.items()}, strict=False)
    tf = timm.data.create_transform(input_size=(3, 64, 64), crop_pct=0.875, interpolation="bicubic")
    classes = sorted(p.name for p in (folder / "train").iterdir())

    def feats(split):
        files = [(f, c) for c, name in enumerate(classes) for f in sorted((folder / split / name).iterdir())]
        with torch.no_grad():
            x = torch.stack([tf(Image.open(f).convert("RGB")) for f, _ in files])
            f = model.forward_features(x).mean((2, 3)).double().numpy()
        return f / np.linalg.norm(f, axis=1, keepdims=True), np.array([c for _, c in files])

    (train, ty), (val, vy) = feats("train"), feats("val")
    sim = val @ train.T
    top = np.argsort(-sim, axis=1)[:, : min(k, len(train))]
    votes = np.zeros((len(val), len(classes)))
    for i, row in enumerate(top):
        np.add.at(votes[i], ty[row], np.exp(sim[i, row] / temperature))
    return 100.0 * float((votes.argmax(1) == vy).mean())


def test_knn_monitor_logs_knn_acc1(images, tmp_path):
    rng = np.random.default_rng(1)
    colours = (("red", (200, 30, 30)), ("green", (30, 200, 30)), ("blue", (30, 30, 200)))
    for split, n in (("train", 6), ("val", 4)):
        for label, color in colours:
            (tmp_path / "knn" / split / label).mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(color) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(tmp_path / "knn" / split / label / f"{i}.png")
    run_cli(
        [
            PRETRAIN,
            *SMALL,
            "--max-steps",
            "2",
            "--num-recon",
            "0",
            "--knn-data",
            tmp_path / "knn",
            "--knn-every",
            "1",
            "--data",
            images,
            "--output-dir",
            tmp_path / "out",
        ]
    )
    rows = [json.loads(r) for r in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_acc1" in r]
    assert [r["step"] for r in knn] == [1, 2]
    # the step-2 value is the k-NN of the final encoder, computed independently (timm, numpy); colour is
    # all it takes to separate three classes (a constant guess scores 33.3)
    encoder = load_file(str(tmp_path / "out" / "encoder.safetensors"))
    assert knn[-1]["knn_acc1"] == pytest.approx(knn_by_hand(encoder, tmp_path / "knn"), abs=1e-9)
    assert knn[-1]["knn_acc1"] >= 90.0
