"""Fine-tuning: finetune/run.py and python -m fcmae.predict run as a user would, in
subprocesses, on generated labelled images (3 classes of coloured shapes) with atto at 64 px.

Reference values come from independent paths: checkpoint fixtures are written by timm's and
transformers' own savers or built here by hand from the official code's and timm's checkpoint layouts;
pretrained features come from the FCMAE model that produced them; layer-decay scales are computed by hand."""

import argparse
import json
import shutil
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
from safetensors import safe_open
from safetensors.torch import load_file

import fcmae
from fcmae.tasks.classify import FinetuneConfig, build_classifier

FINETUNE, PRETRAIN = str(ROOT / "finetune" / "run.py"), str(ROOT / "fcmae" / "pretrain.py")
CLASSES = ["circle", "square", "triangle"]
N_TRAIN, N_VAL = 4, 3  # per class
TINY = ["--input-size", "64", "--batch-size", "4", "--num-workers", "0", "--report-to", "none"]
RECIPE = [
    *TINY,
    "--epochs",
    "2",
    "--warmup-epochs",
    "1",
    "--lr",
    "2e-3",
    "--layer-decay",
    "0.9",
    "--mixup",
    "0.8",
    "--cutmix",
    "1.0",
    "--smoothing",
    "0.1",
    "--drop-path",
    "0.1",
    "--model-ema",
    "--model-ema-decay",
    "0.9",
    "--save-every",
    "2",
]  # 3 steps per epoch: checkpoints at steps 2 (mid-epoch), 3, 4 (mid-epoch), 6


def draw_shape(shape: str, rng, size: int = 72) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 80, 3)))
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(c) for c in rng.integers(r, size - r, 2))
    fill = tuple(int(c) for c in rng.integers(120, 256, 3))
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make_shapes(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for shape in CLASSES:
            (root / split / shape).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw_shape(shape, rng).save(root / split / shape / f"{i}.png")
    return root


def run(script, args, env=None, check=True, module=False):
    return run_cli([*(["-m", script] if module else [script]), *args], env=env, check=check)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def pretrain_run(shapes, tmp_path_factory):
    """A real FCMAE pretraining run (4 steps) on the training images."""
    out = tmp_path_factory.mktemp("pretrain")
    run(
        PRETRAIN,
        [
            *TINY,
            "--model",
            "convnextv2_atto",
            "--decoder-dim",
            "32",
            "--num-recon",
            "0",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "1",
            "--data",
            shapes / "train",
            "--max-steps",
            "4",
            "--save-every",
            "4",
            "--output-dir",
            out,
        ],
    )
    return out


@pytest.fixture(scope="module")
def reference_run(shapes, pretrain_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    run(FINETUNE, [*RECIPE, "--from-fcmae", pretrain_run, "--data", shapes, "--output-dir", out])
    return out


def fcmae_features(state: dict, x: torch.Tensor) -> torch.Tensor:
    """The encoder features of the FCMAE model holding ``state``, nothing masked (ratio 0)."""
    model = fcmae.create_fcmae("convnextv2_atto", decoder_dim=32).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.forward_encoder(x, torch.zeros(x.shape[0], (x.shape[2] // 32) * (x.shape[3] // 32)))


def perturbed(state: dict) -> dict:
    """Noise on every tensor, so that GRN (zero at init) and every norm matter to the output."""
    g = torch.Generator().manual_seed(0)
    return {k: v + torch.randn(v.shape, generator=g) * (0.2 if v.ndim == 1 else 0.02) for k, v in state.items()}


# --------------------------------------------------------------------------- source formats, built by hand

from test_checkpoints import minkowski_kernel as me_kernel  # noqa: E402  (brute-force loops over kernel offsets)


def official_block_keys(prefix: str, ours: str, v: torch.Tensor, minkowski: bool) -> tuple[str, torch.Tensor]:
    """One block tensor, fcmae name tail -> the official code's (dense, or MinkowskiEngine)."""
    if ours == "conv_dw.weight":
        return (f"{prefix}.dwconv.kernel", me_kernel(v, True)) if minkowski else (f"{prefix}.dwconv.weight", v)
    if ours == "conv_dw.bias":
        return f"{prefix}.dwconv.bias", v.reshape(1, -1) if minkowski else v
    if ours.startswith("norm."):
        return f"{prefix}.norm.{'ln.' if minkowski else ''}{ours[5:]}", v
    if ours.startswith("mlp.grn."):  # ME: (1, C); released dense weights: (1, 1, 1, C)
        name = "gamma" if ours.endswith("weight") else "beta"
        return f"{prefix}.grn.{name}", v.reshape(1, -1) if minkowski else v.reshape(1, 1, 1, -1)
    fc, kind = ours.split(".")[1:]  # mlp.fc1.weight -> pwconv1
    return f"{prefix}.pwconv{fc[-1]}.{'linear.' if minkowski else ''}{kind}", v


def to_official(fcmae_state: dict, minkowski: bool) -> dict:
    """An FCMAE state dict (fcmae names) -> the official MinkowskiEngine training checkpoint's
    ``model`` (minkowski=True), or the released encoder-only ``*_fcmae.pt``'s (dense names, no prefix)."""
    out, pre = {}, "encoder." if minkowski else ""
    for key, v in fcmae_state.items():
        if not key.startswith("encoder."):
            if minkowski:  # decoder and friends travel along under their own names
                out[
                    key.replace("conv_dw", "dwconv")
                    .replace("mlp.fc", "pwconv")
                    .replace("mlp.grn.weight", "grn.gamma")
                    .replace("mlp.grn.bias", "grn.beta")
                ] = v
            continue
        p = key.split(".")[1:]
        if p[0] == "stem":
            out[f"{pre}downsample_layers.0.{p[1]}.{p[2]}"] = v
        elif p[2] == "downsample" and p[3] == "0":
            out[f"{pre}downsample_layers.{p[1]}.0.{'ln.' if minkowski else ''}{p[4]}"] = v
        elif p[2] == "downsample":
            if minkowski:
                name = "kernel" if p[4] == "weight" else "bias"
                out[f"{pre}downsample_layers.{p[1]}.1.{name}"] = me_kernel(v, False) if name == "kernel" else v[None]
            else:
                out[f"downsample_layers.{p[1]}.1.{p[4]}"] = v
        else:
            name, value = official_block_keys(f"{pre}stages.{p[1]}.{p[3]}", ".".join(p[4:]), v, minkowski)
            out[name] = value
    return out


def timm_export(directory: Path):
    """A perturbed timm convnextv2_atto feature extractor, saved by timm's own save_for_hf."""
    timm = pytest.importorskip("timm")
    from timm.models._hub import save_for_hf

    model = timm.create_model("convnextv2_atto", num_classes=0).eval()
    model.load_state_dict(perturbed(model.state_dict()))
    save_for_hf(model, str(directory), safe_serialization=True)
    return model


def source_and_reference(kind: str, pretrain_run: Path, tmp: Path, x: torch.Tensor, monkeypatch):
    """(--from-fcmae value, the features of the model it came from)."""
    trained = load_file(str(pretrain_run / "fcmae.safetensors"))
    if kind in ("run_dir", "encoder", "fcmae", "checkpoint_dir"):
        src = {
            "run_dir": pretrain_run,
            "encoder": pretrain_run / "encoder.safetensors",
            "fcmae": pretrain_run / "fcmae.safetensors",
            "checkpoint_dir": pretrain_run / "checkpoints" / "step_00000004",
        }
        return str(src[kind]), fcmae_features(trained, x)
    if kind in ("official_minkowski", "official_released"):
        state = perturbed(trained)
        if kind == "official_minkowski":  # as the official save_model writes it
            ckpt = {
                "model": to_official(state, True),
                "optimizer": {"state": {}, "param_groups": []},
                "epoch": 799,
                "scaler": {"scale": 65536.0},
                "args": argparse.Namespace(model="convnextv2_atto", mask_ratio=0.6),
            }
        else:
            ckpt = {"model": to_official(state, False)}
        torch.save(ckpt, tmp / "official.pth")
        return str(tmp / "official.pth"), fcmae_features(state, x)
    if kind in ("timm", "hf_hub"):
        model = timm_export(tmp / "timm")
        with torch.no_grad():
            features = model.forward_features(x)
        if kind == "timm":
            return str(tmp / "timm"), features
        import huggingface_hub.constants

        snapshot = tmp / "hub" / "models--someone--atto-fcmae" / "snapshots" / ("0" * 40)
        shutil.copytree(tmp / "timm", snapshot)
        (snapshot.parents[1] / "refs").mkdir()
        (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp / "hub"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return "hf-hub:someone/atto-fcmae", features
    transformers = pytest.importorskip("transformers")
    config = transformers.ConvNextV2Config(depths=[2, 2, 6, 2], hidden_sizes=[40, 80, 160, 320], layer_norm_eps=1e-6)
    model = transformers.ConvNextV2Model(config).eval()
    model.load_state_dict(perturbed(model.state_dict()))
    model.save_pretrained(tmp / "hf")
    with torch.no_grad():
        return str(tmp / "hf"), model(pixel_values=x).last_hidden_state


KINDS = [
    "run_dir",
    "encoder",
    "fcmae",
    "checkpoint_dir",
    "official_minkowski",
    "official_released",
    "timm",
    "hf_hub",
    "transformers",
]


@pytest.mark.parametrize("kind", KINDS)
def test_from_fcmae_source_gives_the_source_features(kind, pretrain_run, tmp_path, monkeypatch, rel_err):
    x = torch.randn(2, 3, 64, 96)
    src, expected = source_and_reference(kind, pretrain_run, tmp_path, x, monkeypatch)
    model, report = build_classifier(FinetuneConfig(from_fcmae=src, drop_path=0.0), num_classes=3)  # --model inferred
    assert model.name == "convnextv2_atto" and report.missing == sorted(k for k in model.state_dict() if "head" in k)
    with torch.no_grad():
        assert rel_err(model.eval().forward_features(x), expected) < 1e-5
    # the head is fresh: final norm at identity, classifier scaled by 0.001 (std 0.02 -> 2e-5)
    assert torch.equal(model.head.norm.weight, torch.ones(320)) and torch.equal(model.head.norm.bias, torch.zeros(320))
    assert 5e-6 < model.head.fc.weight.std() < 5e-5 and not model.head.fc.bias.any()


def test_wrong_architecture_fails_naming_both(shapes, pretrain_run, tmp_path):
    proc = run(
        FINETUNE,
        [
            *TINY,
            "--model",
            "convnextv2_femto",
            "--from-fcmae",
            pretrain_run,
            "--data",
            shapes,
            "--output-dir",
            tmp_path,
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "convnextv2_atto" in proc.stderr and "convnextv2_femto" in proc.stderr and "--from-fcmae" in proc.stderr


# --------------------------------------------------------------------------- layer decay, by hand


def _groups(name, decay, kind):
    from fcmae.tasks.classify.model import lr_scale
    from fcmae.training.optim import param_groups

    with torch.device("meta"):  # names and shapes matter, values do not
        model = fcmae.create_model(name, num_classes=10)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.05, lr_scale(model, decay, kind))
    assert sum(len(g["params"]) for g in groups) == len(names)
    return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_layer_decay_single_atto():
    # atto: depths 2,2,6,2 -> 12 layers; scale = 0.9 ** (13 - id); stem and downsample i share the id
    # of the first block of their stage; head 13
    got = _groups("convnextv2_atto", 0.9, "single")
    expected = {
        "stem.0.weight": (0.282429536481, 0.05),  # id 1: 0.9^12
        "stem.1.bias": (0.282429536481, 0.0),
        "stages.0.blocks.1.conv_dw.weight": (0.31381059609, 0.05),  # id 2: 0.9^11
        "stages.1.downsample.1.weight": (0.3486784401, 0.05),  # id 3: 0.9^10
        "stages.1.downsample.0.weight": (0.3486784401, 0.0),  # LayerNorm: 1-D, no decay
        "stages.2.blocks.5.mlp.fc1.weight": (0.729, 0.05),  # id 2+2+5+1 = 10: 0.9^3
        "stages.2.blocks.5.mlp.grn.weight": (0.729, 0.0),  # GRN: no decay
        "stages.3.downsample.1.bias": (0.81, 0.0),  # id 11: 0.9^2
        "stages.3.blocks.1.mlp.fc2.weight": (0.9, 0.05),  # id 12
        "head.norm.weight": (1.0, 0.0),
        "head.fc.weight": (1.0, 0.05),
    }  # id 13
    for name, (scale, wd) in expected.items():
        assert got[name][0] == pytest.approx(scale, rel=1e-9) and got[name][1] == wd, name


def test_layer_decay_group_base():
    # base: 12 groups; scale = 0.6 ** (13 - id): stem 0, stage 1 -> 1, ds 1 + stage 2 -> 2, ds 2 -> 3,
    # stage-3 block b -> 3 + b // 3, ds 3 + stage 4 -> 12, head 13
    got = _groups("convnextv2_base", 0.6, "group")
    expected = {
        "stem.0.weight": 0.0013060694016,  # 0.6^13
        "stages.0.blocks.2.mlp.fc2.weight": 0.002176782336,  # 0.6^12
        "stages.1.downsample.1.weight": 0.00362797056,  # 0.6^11
        "stages.1.blocks.2.conv_dw.weight": 0.00362797056,
        "stages.2.downsample.1.weight": 0.0060466176,  # id 3: 0.6^10
        "stages.2.blocks.2.norm.weight": 0.0060466176,  # 3 + 2 // 3 = 3
        "stages.2.blocks.5.mlp.fc1.weight": 0.010077696,  # 3 + 5 // 3 = 4: 0.6^9
        "stages.2.blocks.26.conv_dw.weight": 0.36,  # 3 + 26 // 3 = 11: 0.6^2
        "stages.3.downsample.1.weight": 0.6,
        "stages.3.blocks.2.mlp.grn.bias": 0.6,  # 12
        "head.fc.weight": 1.0,
        "head.norm.bias": 1.0,
    }
    for name, scale in expected.items():
        assert got[name][0] == pytest.approx(scale, rel=1e-9), name


# --------------------------------------------------------------------------- end to end


def test_finetune_end_to_end_and_eval_only_reproduces_best(reference_run, shapes):
    out = reference_run
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == "convnextv2_atto" and cfg["num_classes"] == 3 and cfg["steps_per_epoch"] == 3
    log = rows(out)
    assert [r["epoch"] for r in log] == [0, 1]
    assert all({"train_loss", "lr", "acc1", "acc5", "ema_acc1", "ema_acc5"} <= r.keys() for r in log)
    assert all(r["val_samples"] == 3 * N_VAL for r in log)
    assert (out / "labels.txt").read_text().split() == CLASSES
    final = yaml.safe_load((out / "final.yaml").read_text())
    best = max(r["acc1"] for r in log)
    assert final["best_acc1"] == best and final["ranks_identical"] is None  # one process: nothing to compare
    meta = metadata(out / "best.safetensors")
    assert meta["model"] == "convnextv2_atto" and json.loads(meta["class_names"]) == CLASSES
    assert float(meta["acc1"]) == best and (out / "best_ema.safetensors").is_file()
    proc = run(FINETUNE, [*TINY, "--eval-only", "--checkpoint", out / "best.safetensors", "--data", shapes])
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    logged = next(r for r in log if r["epoch"] == final["best_epoch"])
    assert (stats["acc1"], stats["acc5"], stats["val_samples"]) == (logged["acc1"], logged["acc5"], 3 * N_VAL)


def test_resume_after_sigkill_is_bitwise_exact(reference_run, shapes, pretrain_run, tmp_path):
    args = [*RECIPE, "--from-fcmae", pretrain_run, "--data", shapes, "--output-dir", tmp_path]
    crashed = run(FINETUNE, args, env={"FCMAE_FAULT": "step:5"}, check=False)  # mid-epoch 2, after step 4's checkpoint
    assert crashed.returncode == -signal.SIGKILL
    resumed = run(FINETUNE, [*args, "--resume", "auto"])
    assert "resumed from" in resumed.stdout and "step 4 (epoch 1, batch 1)" in resumed.stdout
    assert rows(tmp_path) == rows(reference_run)
    for name in ("best.safetensors", "best_ema.safetensors", "last.safetensors"):
        a, b = load_file(str(tmp_path / name)), load_file(str(reference_run / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_linear_probe_on_parquet_freezes_the_encoder(shapes, pretrain_run, tmp_path):
    """Split parquet files with string labels under custom column names; frozen encoder, trained head."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    data.mkdir()
    for split, folder in (("train", "train"), ("validation", "val")):
        files = sorted((shapes / folder).glob("*/*.png"))
        pq.write_table(
            pa.table(
                {
                    "picture": [{"bytes": f.read_bytes(), "path": f.name} for f in files],
                    "shape": [f.parent.name for f in files],
                }
            ),
            data / f"{split}.parquet",
        )
    out = tmp_path / "probe"
    run(
        FINETUNE,
        [
            *TINY,
            "--linear-probe",
            "--from-fcmae",
            pretrain_run / "encoder.safetensors",
            "--data",
            data,
            "--image-column",
            "picture",
            "--label-column",
            "shape",
            "--epochs",
            "2",
            "--lr",
            "0.05",
            "--warmup-epochs",
            "0",
            "--output-dir",
            out,
        ],
    )
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["aa"] is None and cfg["mixup"] == 0.0 and cfg["weight_decay"] == 0.0  # the probe preset
    assert (out / "labels.txt").read_text().split() == CLASSES
    encoder, last = load_file(str(pretrain_run / "encoder.safetensors")), load_file(str(out / "last.safetensors"))
    assert all(torch.equal(last[k], v) for k, v in encoder.items())  # bitwise unchanged
    assert not torch.equal(last["head.norm.weight"], torch.ones(320)) and last["head.fc.weight"].abs().max() > 1e-3


def test_predict_prints_top5_with_names(reference_run, shapes):
    timm = pytest.importorskip("timm")
    images = [shapes / "val" / "circle" / "0.png", shapes / "val" / "triangle" / "1.png"]
    proc = run("fcmae.predict", [*images, "--checkpoint", reference_run], module=True)  # model, names from metadata
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == str(images[0]) and lines[4] == str(images[1]) and len(lines) == 8  # 3 classes: top-3
    # independent: timm's convnextv2_atto with the fine-tuned weights, the eval transform written out
    from torchvision import transforms

    state = load_file(str(reference_run / "best.safetensors"))
    model = timm.create_model("convnextv2_atto", num_classes=3).eval()
    model.load_state_dict({k: v.reshape(model.state_dict()[k].shape) for k, v in state.items()})
    tf = transforms.Compose(
        [
            transforms.Resize(73, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(64),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    with torch.no_grad():
        probs = model(torch.stack([tf(Image.open(p).convert("RGB")) for p in images])).softmax(1)
    for i in range(2):
        printed = [line.split() for line in lines[4 * i + 1 : 4 * i + 4]]
        order = probs[i].argsort(descending=True).tolist()
        assert [p[1] for p in printed] == [CLASSES[j] for j in order]
        assert [float(p[2]) for p in printed] == pytest.approx(probs[i][order].tolist(), abs=1e-4)


def test_predict_names_each_unreadable_file_and_predicts_the_rest(reference_run, shapes, tmp_path):
    good = [shapes / "val" / "circle" / "0.png", shapes / "val" / "triangle" / "1.png"]
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    Image.open(good[0]).convert("RGB").save(tmp_path / "full.jpg", quality=90)
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:200])
    paths = [good[0], tmp_path / "bad.jpg", tmp_path / "missing.png", tmp_path / "truncated.jpg", good[1]]
    proc = run("fcmae.predict", [*paths, "--checkpoint", reference_run], module=True, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    printed = [line for line in proc.stdout.splitlines() if not line.startswith(" ")]
    assert printed == [str(good[0]), str(good[1])]  # every readable image, in order
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: cannot read")]
    assert [e.split(": ")[1].removeprefix("cannot read ") for e in errors] == [
        str(tmp_path / n) for n in ("bad.jpg", "missing.png", "truncated.jpg")
    ]
    assert "3 of 5 images could not be read" in proc.stderr
    missing = run("fcmae.predict", [good[0], "--checkpoint", tmp_path / "no_such_run"], module=True, check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "no_such_run" in missing.stderr


def test_two_processes_count_each_val_sample_once(shapes, pretrain_run, tmp_path):
    """9 val images, 2 processes, batch 4: the last batch is padded; the metric must not count the padding."""
    cmd = [
        *accelerate_launch(),
        FINETUNE,
        *TINY,
        "--from-fcmae",
        pretrain_run,
        "--data",
        shapes,
        "--epochs",
        "1",
        "--lr",
        "2e-3",
        "--warmup-epochs",
        "0",
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
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["effective_batch_size"] == 8
    assert yaml.safe_load((tmp_path / "final.yaml").read_text())["ranks_identical"] is True
    (row,) = rows(tmp_path)
    assert row["val_samples"] == 3 * N_VAL
    single = run(FINETUNE, [*TINY, "--eval-only", "--checkpoint", tmp_path / "best.safetensors", "--data", shapes])
    assert json.loads(single.stdout.strip().splitlines()[-1])["acc1"] == row["acc1"]


# --------------------------------------------------------------------------- configuration


def test_eval_transform_crops_below_384_and_warps_from_384():
    from fcmae.data import eval_transform

    img = Image.new("RGB", (200, 100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 50, 100))  # the left quarter red, the rest blue
    warped = eval_transform(384)(img)  # straight to 384 x 384: the red quarter stays
    assert warped.shape == (3, 384, 384) and warped[0, :, :90].min() > 2 and warped[0, :, 100:].max() < 0
    cropped = eval_transform(64)(img)  # short side to 73 (146 x 73), centre crop 64 from x = 41: red cut
    assert cropped.shape == (3, 64, 64) and cropped[0].max() < 0 and cropped[2].min() > 2


def test_presets_hold_the_official_recipes():
    from fcmae.training.config import build, load_yaml

    files = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))
    expected_files = (
        [f"{m}_224" for m in fcmae.list_models("convnextv2_*")]
        + [f"convnextv2_{s}_384" for s in ("nano", "tiny", "base", "large", "huge")]
        + ["convnextv2_huge_512"]
    )
    assert sorted(f.stem for f in files) == sorted(expected_files)
    # official ConvNeXt V2 code: blr, epochs, warmup, layer decay, type, wd, drop path, mixup, cutmix, smoothing
    official = {
        "atto": (2e-4, 600, 0, 0.9, "single", 0.3, 0.1, 0.0, 0.0, 0.2),
        "tiny": (8e-4, 300, 40, 0.9, "single", 0.05, 0.2, 0.8, 1.0, 0.1),
        "base": (6.25e-4, 100, 20, 0.6, "group", 0.05, 0.1, 0.8, 1.0, 0.1),
    }
    for f in files:
        cfg = build(FinetuneConfig, load_yaml(f))
        cfg.validate()
        size, res = f.stem.split("_")[1], int(f.stem.split("_")[2])
        assert cfg.model == f"convnextv2_{size}" and cfg.input_size == res
        assert cfg.batch_size * cfg.grad_accum * 8 == 1024  # the official effective batch, on 8 GPUs
        assert (cfg.min_lr, cfg.aa, cfg.reprob, cfg.head_init_scale) == (1e-6, "rand-m9-mstd0.5-inc1", 0.25, 0.001)
        assert cfg.model_ema and cfg.model_ema_decay == 0.9999 and (cfg.beta1, cfg.beta2) == (0.9, 0.999)
        if size in official and res == 224:
            got = (
                cfg.blr,
                cfg.epochs,
                cfg.warmup_epochs,
                cfg.layer_decay,
                cfg.layer_decay_type,
                cfg.weight_decay,
                cfg.drop_path,
                cfg.mixup,
                cfg.cutmix,
                cfg.smoothing,
            )
            assert got == official[size], f.name


def test_flags_and_bad_arguments():
    from fcmae.tasks.classify import choose_preset
    from fcmae.training.config import parse_args

    def parse(*argv):
        cfg = parse_args(FinetuneConfig, list(argv), choose_preset=choose_preset)
        cfg.validate()
        return cfg

    probe = parse("--linear-probe", "--data", "x")
    assert probe.linear_probe and probe.mixup == 0 and probe.aa is None and probe.weight_decay == 0
    assert parse("--linear-probe", "--weight-decay", "0.01").weight_decay == 0.01  # flags beat the preset
    assert parse("--aa", "none").aa is None and parse("--model-ema").model_ema is True
    for argv, message in (
        (["--input-size", "100"], "multiple of 32"),
        (["--eval-only"], "--checkpoint"),
        (["--mixup", "0.8", "--batch-size", "3"], "even"),
        (["--layer-decay-type", "blocks"], "single or group"),
    ):
        with pytest.raises(ValueError, match=message):
            parse(*argv)


def test_hub_dataset_offline_fails_fast_with_a_hint(tmp_path):
    from fcmae.data import load_labelled

    cfg = FinetuneConfig(dataset_name="someone/not-cached-anywhere", label_column="label")
    with pytest.raises(RuntimeError, match="Offline mode"):
        load_labelled(cfg)
