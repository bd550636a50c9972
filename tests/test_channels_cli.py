"""N-channel data end to end, through the entry points a user runs: FCMAE pretraining on 4-band .npy
and TIFF files, the timm export of the run, fine-tuning on labelled .npy folders, (N, H, W) arrays,
files with the wrong channel count, and an RGB encoder adapted to a 4-channel stem."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import timm
import torch
import yaml
from conftest import CLI_ENV as ENV
from conftest import ROOT, run_cli
from PIL import Image
from safetensors.torch import load_file

import fcmae

PRETRAIN, FINETUNE = str(ROOT / "fcmae" / "pretrain.py"), str(ROOT / "finetune" / "run.py")
TINY = [
    "--model",
    "convnextv2_atto",
    "--input-size",
    "64",
    "--batch-size",
    "4",
    "--decoder-dim",
    "32",
    "--num-workers",
    "0",
    "--report-to",
    "none",
    "--log-every",
    "1",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "2",
]
H, W, N = 72, 80, 4


def bands(rng, label: int | None = None) -> np.ndarray:
    """(H, W, 4) uint16: a ramp per band (along x, along y, radial, diagonal) with a random
    amplitude and a little noise: structure a masked patch can be predicted from (after FCMAE's
    per-patch normalisation a ramp is a ramp, whatever the crop). With a label, band 3 holds
    horizontal (0) or vertical (1) stripes, so the classes differ outside the first three bands."""
    yy, xx = np.mgrid[0:H, 0:W] / np.array([H, W]).reshape(2, 1, 1)
    ramps = np.stack([xx, yy, np.hypot(xx - 0.5, yy - 0.5), (xx + yy) / 2], -1) * rng.uniform(0.5, 1, N)
    if label is not None:
        ramps[..., 3] = (np.sin((yy * H if label == 0 else xx * W) / 2 + rng.uniform(0, 6)) + 1) / 2
    return np.round(65535 * (0.1 + 0.8 * ramps + rng.normal(0, 0.01, ramps.shape))).astype(np.uint16)


def write_npy(folder: Path, n: int, seed: int = 0, first: bool = False) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = [bands(rng) for _ in range(n)]
    for i, a in enumerate(arrays):
        np.save(folder / f"a{i:02d}.npy", a.transpose(2, 0, 1) if first else a)
    return arrays


def stats(arrays) -> tuple[str, str]:
    """--mean / --std over every pixel, worked out with numpy (integers scaled to [0, 1])."""
    x = np.concatenate([a.reshape(-1, N) for a in arrays]).astype(np.float64) / 65535
    return ",".join(f"{v:.6f}" for v in x.mean(0)), ",".join(f"{v:.6f}" for v in x.std(0))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def assert_learns_and_draws(out: Path):
    loss = losses(out)
    assert len(loss) == 24 and all(np.isfinite(loss))
    assert np.mean(loss[-6:]) < 0.95 * np.mean(loss[:4]), loss  # the loss falls
    panels = sorted((out / "reconstructions").glob("step_*.png"))
    assert panels, "no reconstruction panel"
    panel = Image.open(panels[-1])
    assert panel.mode == "RGB" and panel.size == (4 * 64, 2 * 64)  # 4 columns, --num-recon 2 rows
    assert np.asarray(panel).std() > 0  # not a blank image


@pytest.fixture(scope="module")
def npy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("npy")
    arrays = write_npy(root / "data", 16)
    mean, std = stats(arrays)
    out = root / "run"
    run_cli(
        [
            PRETRAIN,
            *TINY,
            "--data",
            root / "data",
            "--in-chans",
            "4",
            "--mean",
            mean,
            "--std",
            std,
            "--vis-channels",
            "3,1,0",
            "--num-recon",
            "2",
            "--max-steps",
            "24",
            "--save-every",
            "24",
            "--output-dir",
            out,
        ]
    )
    return out, mean, std


def test_pretrain_on_npy_and_export_to_timm(npy_run, tmp_path):
    out, mean, _ = npy_run
    assert_learns_and_draws(out)
    assert yaml.safe_load((out / "config.yaml").read_text())["in_chans"] == 4
    export = tmp_path / "export"
    subprocess.run(
        [sys.executable, "-m", "fcmae.hub", "export", "--checkpoint", str(out), "--out", str(export)],
        env=ENV,
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    config = json.loads((export / "config.json").read_text())
    assert config["pretrained_cfg"]["mean"] == pytest.approx([float(m) for m in mean.split(",")])
    ours = fcmae.create_model("convnextv2_atto", num_classes=0, in_chans=4).eval()
    encoder = load_file(str(out / "encoder.safetensors"))
    ours.load_state_dict(encoder, strict=False)  # the encoder has no head norm
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in encoder.items())
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        t = timm.create_model(f"local-dir:{export}", pretrained=True).eval()  # timm's own loader, strict
        assert t.stem[0].in_channels == 4
        theirs, mine = t.forward_features(x), ours.forward_features(x)
    assert ((theirs - mine).abs().max() / mine.abs().max()).item() < 1e-5


def test_pretrain_on_multiband_tiff(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "tif").mkdir()
    arrays = [bands(rng) for _ in range(16)]
    for i, a in enumerate(arrays):  # bands as samples of each pixel, as GDAL writes a GeoTIFF
        tifffile.imwrite(tmp_path / "tif" / f"t{i:02d}.tif", a, photometric="minisblack", planarconfig="contig")
    mean, std = stats(arrays)
    out = tmp_path / "run"
    run_cli(
        [
            PRETRAIN,
            *TINY,
            "--data",
            tmp_path / "tif",
            "--in-chans",
            "4",
            "--mean",
            mean,
            "--std",
            std,
            "--num-recon",
            "2",
            "--max-steps",
            "24",
            "--save-every",
            "24",
            "--output-dir",
            out,
        ]
    )
    assert_learns_and_draws(out)


def make_labelled(root: Path) -> Path:
    rng = np.random.default_rng(2)
    for split, n in (("train", 4), ("val", 2)):
        for label, name in enumerate(("horizontal", "vertical")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                np.save(root / split / name / f"{i}.npy", bands(rng, label))
    return root


def test_finetune_from_a_four_channel_run(npy_run, tmp_path):
    run, mean, std = npy_run
    data, out = make_labelled(tmp_path / "labelled"), tmp_path / "ft"
    proc = run_cli(
        [
            FINETUNE,
            "--input-size",
            "64",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--report-to",
            "none",
            "--from-fcmae",
            run,
            "--in-chans",
            "4",
            "--mean",
            mean,
            "--std",
            std,
            "--data",
            data,
            "--epochs",
            "2",
            "--lr",
            "1e-3",
            "--output-dir",
            out,
        ]
    )
    assert "apply to RGB images only" in proc.stderr  # --aa (on by default) is skipped for arrays, with a note
    best = load_file(str(out / "best.safetensors"))
    assert best["stem.0.weight"].shape[1] == 4 and best["head.fc.weight"].shape[0] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and all(r["val_samples"] == 4 for r in log)
    # prediction reads the run's channels, mean and std from the checkpoint
    sample = sorted((data / "val").rglob("*.npy"))[0]
    (tmp_path / "rgb.png").write_bytes(b"\x89PNG not really")
    pred = run_cli(["-m", "fcmae.predict", sample, tmp_path / "rgb.png", "--checkpoint", out], check=False)
    assert pred.returncode == 1 and pred.stdout.splitlines()[0] == str(sample) and "rgb.png" in pred.stderr
    # independent: timm's 4-channel atto with the fine-tuned weights, the eval transform written out
    import torchvision.transforms.v2.functional as F

    model = timm.create_model("convnextv2_atto", in_chans=4, num_classes=2).eval()
    model.load_state_dict({k: v.reshape(model.state_dict()[k].shape) for k, v in best.items()})
    x = torch.from_numpy(np.load(sample).astype(np.float32) / 65535).permute(2, 0, 1)
    x = F.center_crop(F.resize(x, [int(64 / 0.875)], interpolation=F.InterpolationMode.BICUBIC, antialias=True), [64])
    x = F.normalize(x, [float(v) for v in mean.split(",")], [float(v) for v in std.split(",")])
    with torch.no_grad():
        probs = model(x[None]).softmax(1)[0]
    printed = [float(line.split()[-1]) for line in pred.stdout.splitlines()[1:3]]
    assert printed == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-4)


def test_channels_first_npy_and_a_wrong_channel_count(tmp_path):
    data = tmp_path / "first"
    arrays = write_npy(data, 7, seed=3, first=True)  # (4, H, W) files
    np.save(data / "rgb.npy", np.zeros((3, H, W), np.uint8))  # 3 channels: a bad file
    mean, std = stats(arrays)
    args = [
        PRETRAIN,
        *TINY,
        "--data",
        data,
        "--in-chans",
        "4",
        "--mean",
        mean,
        "--std",
        std,
        "--channel-axis",
        "first",
        "--num-recon",
        "0",
        "--max-steps",
        "30",
        "--save-every",
        "30",
    ]
    proc = run_cli([*args, "--max-bad-fraction", "0.3", "--output-dir", tmp_path / "ok"])
    assert "rgb.npy" in proc.stderr and "3 channels" in proc.stderr  # named, with the reason
    final = yaml.safe_load((tmp_path / "ok" / "final.yaml").read_text())
    assert final["num_seen"] == 120 and final["num_bad"] == 15  # 1 file of 8, 30 steps of 4
    bad = run_cli([*args, "--output-dir", tmp_path / "bad"], check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]  # beside the progress bar
    assert len(errors) == 1 and "max-bad-fraction" in errors[0], bad.stderr[-2000:]


def test_rgb_encoder_adapted_to_four_channels(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "rgb").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "rgb" / f"{i}.png")
    run_cli(
        [
            PRETRAIN,
            *TINY,
            "--data",
            tmp_path / "rgb",
            "--num-recon",
            "0",
            "--max-steps",
            "2",
            "--save-every",
            "2",
            "--output-dir",
            tmp_path / "rgb_run",
        ]
    )
    data, out = make_labelled(tmp_path / "labelled"), tmp_path / "ft"
    proc = run_cli(
        [
            FINETUNE,
            "--input-size",
            "64",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--report-to",
            "none",
            "--from-fcmae",
            tmp_path / "rgb_run",
            "--in-chans",
            "4",
            "--mean",
            "0.5,0.5,0.5,0.5",
            "--std",
            "0.3,0.3,0.3,0.3",
            "--aa",
            "none",
            "--data",
            data,
            "--epochs",
            "1",
            "--output-dir",
            out,
        ]
    )
    assert "adapted the stem from 3 to 4 input channels" in proc.stdout + proc.stderr
    assert load_file(str(out / "best.safetensors"))["stem.0.weight"].shape[1] == 4
