"""The detection runner driven as a user would (`python finetune/detect.py ...` in a subprocess), on a
generated COCO-format dataset: bright rectangles, ellipses and bars (sparse category ids 2, 7, 11,
with polygon masks) on a dark noisy background, one image without annotations, a box partly outside
its image, a degenerate box, a crowd region as an RLE and an annotation without a mask.

Independent references: pycocotools' COCOeval run here on the saved COCO results, torchvision's
Mask R-CNN outputs of the saved weights, fcmae's encoder state as the pretraining run saved it, and
the lr schedule by hand."""

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CLI_ENV as ENV
from conftest import ROOT, accelerate_launch, run_cli
from PIL import Image, ImageDraw
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import load_file

from fcmae.tasks.detect import DetectConfig, export_detector, load_detector
from fcmae.training.config import parse_args
from fcmae.weights.source import read_metadata

SCRIPT = ROOT / "finetune" / "detect.py"
CATS = [{"id": 2, "name": "square"}, {"id": 7, "name": "disc"}, {"id": 11, "name": "bar"}]
COLOURS = {2: (230, 70, 60), 7: (70, 220, 90), 11: (80, 120, 240)}
DET = [
    "--batch-size",
    "4",
    "--lr",
    "3e-4",
    "--mixed-precision",
    "no",
    "--num-workers",
    "0",
    "--report-to",
    "none",
    "--train-short-side",
    "128",
    "--eval-short-side",
    "128",
    "--log-every",
    "5",
]
REF = ["--max-steps", "60", "--eval-every", "30", "--save-every", "20"]
AP50_BAR = 0.3  # measured: box AP50 0.66 at step 60 (0.18 at step 30), segm AP50 0.67; chance is near 0


def shape(rng, cat, w, h):
    bw, bh = (
        (int(rng.integers(56, 80)), int(rng.integers(18, 26)))
        if cat == 11
        else (int(rng.integers(32, 64)), int(rng.integers(32, 64)))
    )
    x, y = float(rng.integers(0, w - bw)), float(rng.integers(0, h - bh))
    if cat == 7:  # an ellipse as a 24-point polygon
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        poly = [v for a in t for v in (x + bw / 2 * (1 + np.cos(a)), y + bh / 2 * (1 + np.sin(a)))]
    else:
        poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
    return [x, y, bw, bh], poly


def make_coco(root: Path, n_train: int = 48, n_val: int = 16) -> Path:
    """annotations/{train,val}.json with train/ and val/ image folders; image ids sparse (1, 4, 7, ...)."""
    rng = np.random.default_rng(0)
    for split, n, start in (("train", n_train, 0), ("val", n_val, 1000)):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            iid, w, h = start + 3 * i + 1, int(rng.integers(96, 161)), int(rng.integers(96, 161))
            img = Image.fromarray(rng.normal(30, 8, (h, w, 3)).clip(0, 255).astype(np.uint8))
            for _ in range(0 if i == 5 else int(rng.integers(1, 4))):  # image 5: no annotations
                cat = int(rng.choice([2, 7, 11]))
                box, poly = shape(rng, cat, w, h)
                ImageDraw.Draw(img).polygon(poly, fill=COLOURS[cat])
                anns.append(
                    {
                        "id": start + len(anns) + 1,
                        "image_id": iid,
                        "category_id": cat,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                        "segmentation": [poly],
                    }
                )
            img.save(root / split / f"{iid:06d}.png")
            images.append({"id": iid, "file_name": f"{iid:06d}.png", "width": w, "height": h})
        if split == "train":
            a, b = images[0], images[1]
            rle = [0, 10] + [b["height"] - 10, 10] * 9 + [b["height"] * (b["width"] - 10) + b["height"] - 10]
            anns += [  # clipped (kept), degenerate, crowd, without a mask
                {
                    "id": 901,
                    "image_id": a["id"],
                    "category_id": 2,
                    "bbox": [a["width"] - 20, 10, 40, 30],
                    "iscrowd": 0,
                    "area": 600,
                    "segmentation": [[a["width"] - 20, 10, a["width"], 10, a["width"], 40, a["width"] - 20, 40]],
                },
                {
                    "id": 902,
                    "image_id": a["id"],
                    "category_id": 7,
                    "bbox": [5, 5, 0.5, 20],
                    "iscrowd": 0,
                    "area": 10,
                    "segmentation": [[5, 5, 5.5, 5, 5.5, 25, 5, 25]],
                },
                {
                    "id": 903,
                    "image_id": b["id"],
                    "category_id": 11,
                    "bbox": [0, 0, 10, 10],
                    "iscrowd": 1,
                    "area": 100,
                    "segmentation": {"size": [b["height"], b["width"]], "counts": rle},
                },
                {
                    "id": 904,
                    "image_id": b["id"],
                    "category_id": 11,
                    "bbox": [20, 20, 30, 12],
                    "iscrowd": 0,
                    "area": 360,
                },
            ]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": CATS})
        )
    return root


def data_args(coco: Path, val_ann: Path | None = None) -> list:
    return [
        "--train-ann",
        coco / "annotations" / "train.json",
        "--train-images",
        coco / "train",
        "--val-ann",
        val_ann or coco / "annotations" / "val.json",
        "--val-images",
        coco / "val",
    ]


def detect(args, env=None, check=True):
    return run_cli([SCRIPT, *args], env=env, check=check, timeout=1200)


def rows(out: Path, kind: str) -> list[dict]:
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in log if ("bbox_mAP" in r) == (kind == "eval")]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def pretrained(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    run_cli(
        [
            ROOT / "fcmae" / "pretrain.py",
            "--data",
            coco / "train",
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
def reference(coco, pretrained, tmp_path_factory):
    """60 steps at 128 px (batch 4, 12 steps an epoch) from the FCMAE run, evaluated at steps 30 and 60."""
    out = tmp_path_factory.mktemp("det")
    proc = detect(["--from-fcmae", pretrained, *data_args(coco), *DET, *REF, "--output-dir", out])
    (out / "stdout.txt").write_text(proc.stdout + proc.stderr)
    return out


def cocoeval(gt_path: Path, results: list, iou_type: str) -> np.ndarray:
    gt = COCO(str(gt_path))
    ev = COCOeval(gt, gt.loadRes(results), iou_type)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return ev.stats


# ----------------------------------------------------------------------------- tests


def test_presets_parse_to_the_published_recipe():
    for name in ("convnextv2_base_coco_maskrcnn_3x", "convnextv2_tiny_coco_maskrcnn_3x"):
        cfg = parse_args(DetectConfig, ["--config", str(ROOT / "configs" / "detect" / f"{name}.yaml"), "--data", "x"])
        assert cfg.lr == 1e-4 and cfg.weight_decay == 0.05 and cfg.layer_decay == 0.95 and cfg.drop_path == 0.4
        assert cfg.lr_milestones == [27, 33] and cfg.epochs == 36 and cfg.layer_decay_type == "layer_wise"
    base = parse_args(DetectConfig, ["--config", str(ROOT / "configs/detect/convnextv2_base_coco_maskrcnn_3x.yaml")])
    tiny = parse_args(DetectConfig, ["--config", str(ROOT / "configs/detect/convnextv2_tiny_coco_maskrcnn_3x.yaml")])
    assert (base.jitter, base.task.train_scale, base.task.eval_size) == ("lsj", 1024, 800)
    assert (tiny.jitter, tiny.task.train_scale, tiny.task.eval_size) == ("multiscale", 800, 800)


def test_milestones_past_the_epochs_and_auto_precision():
    with pytest.raises(ValueError, match="--lr-milestones"):  # 27 and 33 of 12 epochs would never drop the lr
        parse_args(DetectConfig, ["--data", "x", "--epochs", "12"]).validate()
    parse_args(DetectConfig, ["--data", "x", "--epochs", "12", "--lr-milestones", "8,11"]).validate()
    from fcmae.training.config import resolve_precision

    cfg = parse_args(DetectConfig, ["--data", "x"])
    assert cfg.mixed_precision == "auto"  # bf16 only on a GPU that has it: CPUs emulate bf16
    assert resolve_precision("auto") == (
        "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    )
    assert resolve_precision("fp16") == "fp16"


def test_two_processes_count_each_image_once(coco, pretrained, tmp_path):
    """16 validation images on 2 processes (8 + 8): the evaluation equals one process scoring the saved weights."""
    cmd = [
        *accelerate_launch(),
        SCRIPT,
        "--from-fcmae",
        pretrained,
        *data_args(coco),
        *DET,
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--warmup-steps",
        "1",
        "--save-every",
        "2",
        "--output-dir",
        tmp_path,
    ]
    proc = subprocess.run(
        list(map(str, cmd)),
        env={**ENV, "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    final = yaml.safe_load((tmp_path / "final.yaml").read_text())
    assert final["world_size"] == 2 and final["ranks_identical"] is True and final["val_images"] == 16
    net, gt = load_detector(tmp_path / "last.safetensors"), coco / "annotations" / "val.json"
    results = json.loads((tmp_path / "predictions" / "val_bbox.json").read_text())
    ids = {im["id"]: im for im in json.loads(gt.read_text())["images"]}
    mine = []
    with torch.no_grad():  # one process, every image, torchvision's outputs -> COCO results by hand
        for iid, im in ids.items():
            x = torch.from_numpy(np.asarray(Image.open(coco / "val" / im["file_name"]).convert("RGB")).copy())
            out = net([x.permute(2, 0, 1).float() / 255])[0]
            for b, s, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                mine.append(
                    {
                        "image_id": iid,
                        "category_id": net.categories.label_to_cat[lab],
                        "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                        "score": s,
                    }
                )
    assert sorted(r["image_id"] for r in results) == sorted(r["image_id"] for r in mine)  # each image once
    stats = cocoeval(gt, mine, "bbox")
    assert round(final["bbox_mAP"], 4) == round(float(stats[0]), 4)


def test_malformed_annotations_exit_2_naming_the_annotation(coco, tmp_path):
    bad = json.loads((coco / "annotations" / "val.json").read_text())
    bad["annotations"][3]["image_id"] = 99999
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    out = tmp_path / "out"
    proc = detect(
        [
            "--model",
            "convnextv2_atto",
            *data_args(coco, tmp_path / "bad.json"),
            *DET,
            "--max-steps",
            "2",
            "--output-dir",
            out,
        ],
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"annotation {bad['annotations'][3]['id']}" in lines[0] and "99999" in lines[0]
    assert not any((out / name).exists() for name in ("config.yaml", "log.jsonl", "last.safetensors", "final.yaml"))


def test_fcmae_encoder_to_a_trained_detector(reference, pretrained):
    """Pretrain 10 steps, fine-tune 60 at 128 px: a clearly non-trivial box AP50, the outputs, the load."""
    evals = rows(reference, "eval")
    assert [r["step"] for r in evals] == [30, 60] and evals[-1]["bbox_mAP_50"] >= AP50_BAR, evals
    assert evals[-1]["segm_mAP_50"] >= AP50_BAR, evals  # the mask head learns too
    assert all(-1 <= r[k] <= 1 for r in evals for k in r if "mAP" in k) and evals[-1]["val_images"] == 16
    assert {p.name for p in reference.iterdir()} >= {
        "config.yaml",
        "log.jsonl",
        "categories.json",
        "predictions",
        "checkpoints",
        "best.safetensors",
        "last.safetensors",
        "final.yaml",
    }
    train = rows(reference, "train")
    assert all(
        {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"} <= r.keys()
        for r in train
    )
    for r in train:  # the parts sum to the loss
        assert sum(v for k, v in r.items() if k.startswith("loss_")) == pytest.approx(r["loss"], rel=1e-5)
        t = r["step"] - 1  # warmup a tenth of 60, then lr x 0.1 at 27/36 x 60 = 45 and 33/36 x 60 = 55
        assert r["lr"] == pytest.approx(3e-4 * (t / 6 if t < 6 else 0.1 ** ((t >= 45) + (t >= 55)))), r
    cfg = yaml.safe_load((reference / "config.yaml").read_text())
    assert cfg["model"] == "convnextv2_atto" and cfg["warmup_steps_resolved"] == 6
    assert cfg["encoder_load"]["missing"] == [] and "missing" not in (reference / "stdout.txt").read_text()
    cats = json.loads((reference / "categories.json").read_text())["categories"]
    assert [(c["label"], c["id"], c["name"]) for c in cats] == [(1, 2, "square"), (2, 7, "disc"), (3, 11, "bar")]
    final = yaml.safe_load((reference / "final.yaml").read_text())
    assert final["dropped"] == {"degenerate": 1, "crowd": 1, "without_mask": 1}
    assert final["best_bbox_mAP"] == max(r["bbox_mAP"] for r in evals)
    meta = read_metadata(reference / "best.safetensors")
    assert meta["format"] == "fcmae-detector" and meta["model"] == "convnextv2_atto" and meta["input_size"] == "128"
    assert json.loads(meta["categories"])["categories"] == cats and meta["masks"] == "true"
    # the pretraining run's encoder and the detector's backbone hold the same keys and shapes
    enc = load_file(str(pretrained / "encoder.safetensors"))
    body = {
        k.removeprefix("backbone.body."): v.shape
        for k, v in load_file(str(reference / "last.safetensors")).items()
        if k.startswith("backbone.body.")
    }
    assert body == {k: v.shape for k, v in enc.items() if not k.startswith("head.")}


def test_logged_ap_equals_cocoeval_of_the_saved_results(reference, coco, tmp_path):
    last = rows(reference, "eval")[-1]
    gt = coco / "annotations" / "val.json"
    for kind in ("bbox", "segm"):
        results = json.loads((reference / "predictions" / f"val_{kind}.json").read_text())
        assert {r["category_id"] for r in results} <= {2, 7, 11}
        stats = cocoeval(gt, results, kind)
        for i, name in enumerate(("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")):
            assert round(last[f"{kind}_{name}"], 4) == round(float(stats[i]), 4), (kind, name)
    # --eval-only scores the last weights the same way
    proc = detect(["--eval-only", "--checkpoint", reference / "last.safetensors", *data_args(coco)[4:], *DET])
    scored = json.loads(proc.stdout.strip().splitlines()[-1])
    assert scored["bbox_mAP"] == pytest.approx(last["bbox_mAP"]) and scored["val_images"] == 16
    # export -> load_detector: the same outputs as the run's weights
    out = export_detector(reference, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "README.md"}
    assert "load_detector" in (out / "README.md").read_text()
    a, b = load_detector(out), load_detector(reference / "best.safetensors")
    assert a.categories.label_to_cat == {1: 2, 2: 7, 3: 11}
    x = [torch.rand(3, 120, 100)]
    with torch.no_grad():
        ya, yb = a(x)[0], b(x)[0]
    assert all(torch.equal(ya[k], yb[k]) for k in ("boxes", "labels", "scores", "masks"))
    # predict: a drawn PNG and a JSON per readable image; an unreadable one named, exit 1
    (tmp_path / "broken.png").write_bytes(b"not an image")
    proc = detect(
        ["predict", coco / "val", tmp_path / "broken.png", "--checkpoint", reference, "--out-dir", tmp_path / "pred"],
        check=False,
    )
    assert proc.returncode == 1 and "broken.png" in proc.stderr and "16 of 17" in proc.stderr
    first = sorted((coco / "val").iterdir())[0]
    assert Image.open(tmp_path / "pred" / f"{first.stem}.png").size == Image.open(first).size
    recs = json.loads((tmp_path / "pred" / f"{first.stem}.json").read_text())
    assert all(r["category_id"] in (2, 7, 11) and r["score"] >= 0.5 for r in recs)


def test_resume_after_sigkill_is_bitwise_exact(coco, pretrained, tmp_path):
    """12 steps of batch 2 at 64 px, killed after step 10 (past the step-6 evaluation, checkpoint 8 the
    newest): the resumed run repeats steps 9..12, its evaluation and exports, bit for bit. At 64 px the
    multiscale short sides (38..64) pad to 64 whatever they are, the case where torchvision's RoIAlign
    read its level scales off the first batch: the resumed run (first batch 9) pooled differently."""
    small = {"--batch-size": "2", "--train-short-side": "64", "--eval-short-side": "64", "--log-every": "1"}
    det = [small.get(DET[i - 1], a) if i else a for i, a in enumerate(DET)]
    assert det.count("64") == 2 and det[det.index("--batch-size") + 1] == "2"
    steps = ["--max-steps", "12", "--eval-every", "6", "--save-every", "4"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    args = ["--from-fcmae", pretrained, *data_args(coco), *det, *steps, "--output-dir"]
    detect([*args, reference])
    crashed = detect([*args, out], env={"FCMAE_FAULT": "step:10"}, check=False)
    assert crashed.returncode == -signal.SIGKILL and not (out / "final.yaml").exists()
    resumed = detect([*args, out, "--resume", "auto"])
    assert "resumed from" in resumed.stdout + resumed.stderr and "at step 8" in resumed.stdout + resumed.stderr
    for name in ("best.safetensors", "last.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(reference / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    strip = [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows(out, "train")]
    assert [r["step"] for r in strip] == list(range(1, 13))
    assert strip == [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows(reference, "train")]
    assert [r["step"] for r in rows(out, "eval")] == [6, 12] and rows(out, "eval") == rows(reference, "eval")
    for name in ("val_bbox.json", "val_segm.json"):
        assert (out / "predictions" / name).read_text() == (reference / "predictions" / name).read_text()
