"""The segmentation runner driven as a user would (`python finetune/segment.py ...` in a subprocess), on
generated ADE20K-layout data: coloured shapes (classes 1..3) on a textured background (0, ignored).

Independent references: a numpy confusion matrix of predictions recomputed here from the saved weights
(mmseg's resize, sliding window and reduce_zero_label, written out again), transformers'
AutoModelForSemanticSegmentation, fcmae's dense ConvNeXt against transformers' ConvNeXt V2, and the
lr schedule by hand."""

import json
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import CLI_ENV as ENV
from conftest import ROOT, accelerate_launch, run_cli
from PIL import Image
from safetensors.torch import load_file

import fcmae
from fcmae.tasks.segment import artifact as sa
from fcmae.tasks.segment import model as sm
from fcmae.weights import hub
from fcmae.weights.source import read_metadata

SCRIPT = ROOT / "finetune" / "segment.py"
MEAN, STD = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
COLOURS = {1: (200, 60, 50), 2: (60, 180, 70), 3: (60, 80, 210)}
SEG = [
    "--num-classes",
    "3",
    "--batch-size",
    "4",
    "--head-channels",
    "64",
    "--lr",
    "1e-3",
    "--mixed-precision",
    "no",
    "--num-workers",
    "0",
    "--report-to",
    "none",
]
REF = ["--input-size", "128", "--max-steps", "24", "--eval-every", "12", "--save-every", "8", "--log-every", "4"]
MIOU_BAR = 80.0  # measured: 96.9 at step 24 (80.9 at step 12); chance is about 25 for three classes


def make_pair(rng, h, w):
    """A rectangle (1), a disc (2) and a triangle (3), each a noisy colour, on a noisy sine texture (0)."""
    yy, xx = np.mgrid[:h, :w]
    label = np.zeros((h, w), np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    label[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
    cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), min(h, w) // 5
    label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 2
    label[(yy > h // 2) & (xx < w // 2) & (yy - h // 2 > xx)] = 3
    texture = 127 + 60 * np.sin(xx / 3.0 + yy / 5.0 + rng.uniform(0, 6))[..., None] + rng.normal(0, 25, (h, w, 3))
    image = texture * rng.uniform(0.6, 1.0, 3)
    for k, c in COLOURS.items():
        image[label == k] = np.array(c) + rng.normal(0, 20, ((label == k).sum(), 3))
    return image.clip(0, 255).astype(np.uint8), label


def make_ade(root: Path, n_train: int = 16, n_val: int = 7) -> Path:
    """ADE20K layout; 7 validation images, so two processes hold 4 and 3."""
    rng = np.random.default_rng(0)
    for i in range(n_train + n_val):
        split = "training" if i < n_train else "validation"
        image, label = make_pair(rng, int(rng.integers(96, 161)), int(rng.integers(96, 161)))
        for sub, arr, ext in (("images", image, "jpg"), ("annotations", label, "png")):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub / split / f"ADE_{i:04d}.{ext}")
    return root


def segment(args, env=None, check=True):
    return run_cli([SCRIPT, *args], env=env, check=check)


def rows(out: Path, kind: str) -> list[dict]:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in log if ("mIoU" in r) == (kind == "eval")]


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return make_ade(tmp_path_factory.mktemp("ade"))


@pytest.fixture(scope="module")
def pretrained(ade, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    run_cli(
        [
            ROOT / "fcmae" / "pretrain.py",
            "--data",
            ade / "images" / "training",
            "--model",
            "convnextv2_atto",
            "--input-size",
            "64",
            "--batch-size",
            "4",
            "--max-steps",
            "10",
            "--decoder-dim",
            "32",
            "--num-workers",
            "0",
            "--report-to",
            "none",
            "--num-recon",
            "0",
            "--save-every",
            "10",
            "--output-dir",
            out,
        ]
    )
    return out


@pytest.fixture(scope="module")
def reference(ade, pretrained, tmp_path_factory):
    """24 steps at 128 px from the FCMAE run (6 epochs of 4 steps), evaluated at steps 12 and 24."""
    out = tmp_path_factory.mktemp("seg")
    segment(["--from-fcmae", pretrained, "--data", ade, *SEG, *REF, "--output-dir", out])
    return out


# ----------------------------------------------------------------------------- the independent computation


def slide(net, x, crop):
    """mmseg's slide_inference: windows of ``crop`` every 2/3 of it, the last flush with the border."""
    h, w = x.shape[-2:]
    stride = crop * 2 // 3

    def starts(n):
        return sorted({min(s, max(n - crop, 0)) for s in range(0, max(n - crop, 0) + stride, stride)})

    total, count = 0, torch.zeros(1, 1, h, w)
    for y in starts(h):
        for x0 in starts(w):
            logits = net(pixel_values=x[..., y : y + crop, x0 : x0 + crop]).logits
            total = total + F.pad(logits, (x0, w - x0 - logits.shape[-1], y, h - y - logits.shape[-2]))
            count[..., y : y + crop, x0 : x0 + crop] += 1
    return total / count


@torch.no_grad()
def predictions(net, ade: Path, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(predicted classes, reduced label) per validation image: short side to ``size`` (long side at
    most 4x), bilinear with uint8 rounding, ImageNet normalisation, slide windows, logits resized to
    the label, argmax; labels 1..3 -> 0..2, 0 -> 255."""
    out = []
    for path in sorted((ade / "images" / "validation").iterdir()):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        raw = np.asarray(Image.open(ade / "annotations" / "validation" / f"{path.stem}.png")).astype(np.int64)
        h, w = raw.shape
        scale = min(4 * size / max(h, w), size / min(h, w))
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(int(h * scale + 0.5), int(w * scale + 0.5)), mode="bilinear", align_corners=False)
        x = (x.round().clamp(0, 255).to(torch.uint8).float() / 255 - MEAN) / STD
        logits = F.interpolate(slide(net, x, size), size=(h, w), mode="bilinear", align_corners=False)
        out.append((logits.argmax(1)[0].numpy(), np.where(raw == 0, 255, raw - 1)))
    return out


def numpy_metrics(pairs, k: int = 3) -> dict:
    conf = np.zeros((k, k), np.int64)
    for pred, label in pairs:
        keep = label != 255
        conf += np.bincount(label[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
    tp = np.diag(conf).astype(float)
    with np.errstate(invalid="ignore"):
        iou = tp / (conf.sum(0) + conf.sum(1) - tp) * 100
    return {"mIoU": np.nanmean(iou), "IoU": iou, "aAcc": tp.sum() / conf.sum() * 100, "pixels": int(conf.sum())}


# ----------------------------------------------------------------------------- tests


def test_fcmae_encoder_to_a_trained_segmenter(reference):
    """Pretrain 10 steps, fine-tune 24 at 128 px: a clearly non-trivial mIoU, the outputs, the schedule."""
    evals = rows(reference, "eval")
    assert [r["step"] for r in evals] == [12, 24] and evals[-1]["mIoU"] >= MIOU_BAR, evals
    assert all(0 <= r[k] <= 100 for r in evals for k in ("mIoU", "mAcc", "aAcc")) and evals[-1]["val_images"] == 7
    assert {p.name for p in reference.iterdir()} >= {
        "config.yaml",
        "log.jsonl",
        "per_class_iou.json",
        "checkpoints",
        "best.safetensors",
        "last.safetensors",
        "final.yaml",
    }
    cfg = yaml.safe_load((reference / "config.yaml").read_text())
    assert cfg["model"] == "convnextv2_atto" and cfg["warmup_steps_resolved"] == 2  # a tenth of 24 (mmseg: 1500)
    for r in rows(reference, "train"):  # lr of optimizer step s = 1e-3 x (s - 1) / 2 in warmup, then poly to 0
        t = r["step"] - 1
        assert r["lr"] == pytest.approx(1e-3 * (t / 2 if t < 2 else 1 - (t - 2) / 22)), r
    final = yaml.safe_load((reference / "final.yaml").read_text())
    assert final["best_mIoU"] == max(r["mIoU"] for r in evals) and final["mIoU"] == evals[-1]["mIoU"]
    meta = read_metadata(reference / "best.safetensors")
    assert meta["format"] == "fcmae-segmenter" and meta["model"] == "convnextv2_atto" and meta["input_size"] == "128"
    assert json.loads(meta["class_names"]) == ["class 0", "class 1", "class 2"]


def test_logged_miou_equals_an_independent_computation(reference, ade, tmp_path):
    final, log = json.loads((reference / "per_class_iou.json").read_text()), rows(reference, "eval")
    for name in ("best.safetensors", "last.safetensors"):
        net, meta = sa.load_segmenter(reference / name)
        pairs = predictions(net, ade, 128)
        ref = numpy_metrics(pairs)
        row = next(r for r in log if r["step"] == int(meta["step"]))
        assert row["val_pixels"] == ref["pixels"]
        assert round(row["mIoU"], 2) == round(ref["mIoU"], 2) and round(row["aAcc"], 2) == round(ref["aAcc"], 2)
    np.testing.assert_allclose([c["IoU"] for c in final["classes"]], ref["IoU"], atol=0.01)  # last: step 24
    # --eval-only scores the same weights the same way
    proc = segment(["--eval-only", "--checkpoint", reference, "--data", ade, *SEG])
    scored = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scored["mIoU"] == pytest.approx(final_best(reference)) and scored["val_images"] == 7
    # predict: a palette PNG per readable image with these classes; an unreadable one named, exit 1
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    proc = segment(
        [
            "predict",
            ade / "images" / "validation",
            tmp_path / "broken.jpg",
            "--checkpoint",
            reference,
            "--out-dir",
            tmp_path / "pred",
        ],
        check=False,
    )
    assert proc.returncode == 1 and "broken.jpg" in proc.stderr and "1 of 8 images" in proc.stderr
    paths = sorted((ade / "images" / "validation").iterdir())
    for path, (pred, _) in zip(paths, predictions(sa.load_segmenter(reference / "best.safetensors")[0], ade, 128)):
        mask = np.asarray(Image.open(tmp_path / "pred" / f"{path.stem}.png"))
        assert mask.shape == pred.shape and (mask == pred).mean() > 0.999
        assert Image.open(tmp_path / "pred" / f"{path.stem}_overlay.png").size == Image.open(path).size


def final_best(out: Path) -> float:
    return yaml.safe_load((out / "final.yaml").read_text())["best_mIoU"]


def test_transformers_export_matches(reference, tmp_path, capsys):
    from transformers import AutoModelForSemanticSegmentation

    hub.main(["export", "--checkpoint", str(reference), "--out", str(tmp_path / "hf"), "--format", "transformers"])
    assert "model.safetensors" in capsys.readouterr().out and (tmp_path / "hf" / "README.md").is_file()
    hf = AutoModelForSemanticSegmentation.from_pretrained(str(tmp_path / "hf")).eval()
    assert hf.config.id2label == {0: "class 0", 1: "class 1", 2: "class 2"}
    net, _ = sa.load_segmenter(reference / "best.safetensors")
    x = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - net(pixel_values=x).logits).abs().max() <= 1e-4


def test_resume_after_sigkill_is_bitwise_exact(reference, ade, pretrained, tmp_path):
    """Killed after step 13 (past the step-12 evaluation, checkpoint 8 the newest): the resumed run
    repeats steps 9..24, its evaluations and exports, bit for bit."""
    args = ["--from-fcmae", pretrained, "--data", ade, *SEG, *REF, "--output-dir", tmp_path]
    crashed = segment(args, env={"FCMAE_FAULT": "step:13"}, check=False)
    assert crashed.returncode == -signal.SIGKILL and not (tmp_path / "final.yaml").exists()
    resumed = segment([*args, "--resume", "auto"])
    assert "resumed from" in resumed.stdout + resumed.stderr and "step 8" in resumed.stdout + resumed.stderr
    for name in ("best.safetensors", "last.safetensors"):
        a, b = load_file(str(tmp_path / name)), load_file(str(reference / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows(tmp_path, "train")]
    assert strip == [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows(reference, "train")]
    assert rows(tmp_path, "eval") == rows(reference, "eval")


def test_two_processes_count_each_image_once(ade, pretrained, tmp_path):
    """7 validation images on 2 processes (4 + 3): the pixel count and the mIoU are those of one process
    scoring the saved weights. Step 1 runs at lr 0 (warmup), so its checkpoint holds the loaded encoder:
    transformers' ConvNeXt V2 with it gives fcmae's dense stage outputs (a strict, complete load)."""
    cmd = [
        *accelerate_launch(),
        SCRIPT,
        "--from-fcmae",
        pretrained,
        "--data",
        ade,
        *SEG,
        "--batch-size",
        "2",
        "--input-size",
        "64",
        "--max-steps",
        "2",
        "--warmup-steps",
        "2",
        "--save-every",
        "1",
        "--output-dir",
        tmp_path,
    ]
    proc = subprocess.run(
        list(map(str, cmd)),
        env={**ENV, "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = yaml.safe_load((tmp_path / "final.yaml").read_text())
    assert final["world_size"] == 2 and final["ranks_identical"] is True and final["val_images"] == 7
    ref = numpy_metrics(predictions(sa.load_segmenter(tmp_path / "last.safetensors")[0], ade, 64))
    labelled = sum(int((np.asarray(Image.open(p)) != 0).sum()) for p in (ade / "annotations" / "validation").iterdir())
    assert final["val_pixels"] == ref["pixels"] == labelled
    assert round(final["mIoU"], 2) == round(ref["mIoU"], 2)
    # step 1 at lr 0: the backbone is the FCMAE encoder as loaded
    from transformers import UperNetForSemanticSegmentation

    net = UperNetForSemanticSegmentation(sm.build_segmenter("convnextv2_atto", 3, head_channels=64).config).eval()
    net.load_state_dict(load_file(str(tmp_path / "checkpoints" / "step_00000001" / "model.safetensors")))
    enc = fcmae.create_model("convnextv2_atto", num_classes=0).eval()
    report = fcmae.load_checkpoint(enc, pretrained / "encoder.safetensors")
    assert report.ignored == []
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = enc.forward_intermediates(x), net.backbone(x, output_hidden_states=True).hidden_states[1:]
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["encoder_load"]["missing"] == [
        f"backbone.hidden_states_norms.stage{i}.{p}" for i in range(1, 5) for p in ("weight", "bias")
    ]


@pytest.mark.parametrize("fault", ["missing", "size", "value"])
def test_bad_data_fails_with_one_line_and_writes_no_results(ade, tmp_path, fault):
    data = tmp_path / "ade"
    subprocess.run(["cp", "-r", str(ade), str(data)], check=True)
    if fault == "missing":
        (data / "annotations" / "training" / "ADE_0003.png").unlink()
        expect = "ADE_0003.jpg has no label map"
    elif fault == "size":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(data / "annotations" / "validation" / "ADE_0017.png")
        expect = "ADE_0017.png is 12x10 but its image"
    else:
        raw = np.asarray(Image.open(data / "annotations" / "training" / "ADE_0005.png")).copy()
        raw[0, 0] = 9
        Image.fromarray(raw).save(data / "annotations" / "training" / "ADE_0005.png")
        expect = "ADE_0005.png: label value 9 is above the 3 classes"
    out = tmp_path / "out"
    proc = segment(
        [
            "--model",
            "convnextv2_atto",
            "--data",
            data,
            *SEG,
            "--input-size",
            "64",
            "--max-steps",
            "4",
            "--num-workers",
            "1",
            "--output-dir",
            out,
        ],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [s for s in re.split(r"[\r\n]", proc.stderr) if "error: " in s]  # the progress bar may precede it
    assert len(errors) == 1 and expect in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not any((out / name).exists() for name in ("best.safetensors", "last.safetensors", "final.yaml"))
