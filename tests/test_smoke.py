"""A long smoke test that looks like real use: pretrain, crash, resume, fine-tune, on a few hundred
generated images of several sizes, modes and formats with about 1 % corrupt files, run as a user
runs them (`python fcmae/pretrain.py`, `python finetune/run.py`) with worker processes.

Expected values come from the data alone: which files are corrupt is settled here with PIL
(`Image.open(...).load()` fails on them and succeeds on every other file), and with full batches
(drop_last) and a whole number of epochs every training image is read exactly once per epoch, so
the bad-image counts are (corrupt files) x (epochs) whatever the order. The resumed pretraining run
is compared bit for bit with an uninterrupted one. RandAugment's posterize levels are recorded, as
drawn, by a spy on timm's level table (loaded through sitecustomize, so it reaches the workers).
"""

import json
import math
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, run_cli
from PIL import Image, features
from safetensors.torch import load_file

PRETRAIN, FINETUNE = ROOT / "fcmae" / "pretrain.py", ROOT / "finetune" / "run.py"
CLASSES = ["c0", "c1", "c2", "c3"]
N_TRAIN, N_VAL = 60, 15  # per class, corrupt files included
SIZES = [(8, 8), (300, 40), (64, 64), (200, 150)]  # (width, height)
KINDS = [
    ("RGB", "png"),
    ("RGB", "jpg"),
    ("RGB", "bmp"),
    ("L", "png"),
    ("L", "jpg"),
    ("L", "bmp"),
    ("RGBA", "png"),
    ("P", "png"),
    ("CMYK", "jpg"),
    ("I;16", "png"),
]
KINDS += [("RGB", "webp"), ("RGBA", "webp")] if features.check("webp") else []
# ~1 %: three corrupt training files (one per kind of damage) and one corrupt validation file
CORRUPT = {
    "train": {"c0": "truncated.jpg", "c1": "random_bytes.png", "c2": "empty.jpg"},
    "val": {"c3": "random_bytes.webp"},
}
BATCH, PRETRAIN_EPOCHS = 8, 2  # 240 / 8 = 30 steps per epoch: 60 steps are exactly 2 epochs
FT_BATCH, FT_EPOCHS = 16, 3  # 240 / 16 = 15 steps per epoch


def picture(cls: int, size, rng) -> np.ndarray:
    """(h, w, 3) uint8: stripes whose angle tells the class, random colours and phase."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    angle = cls * math.pi / 4
    wave = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) / rng.uniform(2, 6) + rng.uniform(0, 6))
    lo, hi = rng.uniform(0, 100, 3), rng.uniform(150, 255, 3)
    return (lo + (hi - lo) * (wave[..., None] + 1) / 2).astype(np.uint8)


def save_as(rgb: np.ndarray, mode: str, path: Path) -> None:
    img = Image.fromarray(rgb)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        alpha = np.linspace(0, 255, rgb.shape[1], dtype=np.uint8)[None].repeat(rgb.shape[0], 0)
        img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "P":
        img = img.quantize(16)  # saved with palette index 0 transparent
    elif mode == "CMYK":
        img = img.convert("CMYK")
    elif mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
    img.save(path, **({"transparency": 0} if mode == "P" else {}))
    with Image.open(path) as back:  # the file holds the mode asked for (no silent conversion on save)
        assert back.mode == mode and back.size == img.size and (mode != "P" or "transparency" in back.info), path


def make_dataset(root: Path, seed: int = 0) -> dict:
    """root/{train,val}/{c0..c3}/*: every (mode, format) at every size, plus the CORRUPT files.
    Returns {split: {"total": files, "corrupt": files PIL cannot decode, "names": their file names}}."""
    rng, counter = np.random.default_rng(seed), 0
    for split, per_class in (("train", N_TRAIN), ("val", N_VAL)):
        for c, cls in enumerate(CLASSES):
            folder = root / split / cls
            folder.mkdir(parents=True)
            bad = CORRUPT[split].get(cls)
            for i in range(per_class - (bad is not None)):
                mode, ext = KINDS[counter % len(KINDS)]
                size = SIZES[(counter // len(KINDS)) % len(SIZES)]  # every kind meets every size
                counter += 1
                save_as(picture(c, size, rng), mode, folder / f"{i:03d}_{mode.replace(';', '')}.{ext}")
            if bad == "truncated.jpg":
                Image.fromarray(picture(c, (200, 150), rng)).save(folder / "whole.jpeg", quality=95)
                data = (folder / "whole.jpeg").read_bytes()
                (folder / "whole.jpeg").unlink()
                (folder / bad).write_bytes(data[: len(data) // 3])
            elif bad == "empty.jpg":
                (folder / bad).write_bytes(b"")
            elif bad is not None:
                (folder / bad).write_bytes(rng.bytes(3000))
    facts = {}
    for split in ("train", "val"):  # what the data implies, settled by PIL itself
        files = sorted((root / split).rglob("*.*"))
        broken = [f.name for f in files if not decodes(f)]
        facts[split] = {"total": len(files), "corrupt": len(broken), "names": broken}
    assert sorted(facts["train"]["names"]) == sorted(CORRUPT["train"].values())
    assert facts["val"]["names"] == list(CORRUPT["val"].values())
    return facts


def decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:  # noqa: BLE001 - any failure to decode is what 'corrupt' means here
        return False


SPY = """
import os
from timm.data import auto_augment as aa
_level, _calls = aa.LEVEL_TO_ARG["PosterizeIncreasing"], [0]
def _spy(level, hparams):  # records the bits kept that RandAugment asks posterize for; every 5th draw (in
    _calls[0] += 1         # each process) is the policy's extreme, 0 bits kept, which noise reaches in ~2 %
    bits = (0,) if _calls[0] % 5 == 0 else _level(level, hparams)
    fd = os.open(os.environ["POSTERIZE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"%d\\n" % bits[0])
    os.close(fd)
    return bits
aa.LEVEL_TO_ARG["PosterizeIncreasing"] = _spy
"""


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def final(out: Path) -> dict:
    return yaml.safe_load((out / "final.yaml").read_text())


def assert_same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys(), a.name
    for k in x:
        assert torch.equal(x[k], y[k]), f"{a.name}: {k} differs after resume"


@pytest.mark.slow
def test_pretrain_kill_resume_then_finetune(tmp_path):
    facts = make_dataset(tmp_path / "data")
    train_bad, val_bad = facts["train"]["corrupt"], facts["val"]["corrupt"]
    n_train, n_val = facts["train"]["total"], facts["val"]["total"]
    assert n_train % BATCH == 0 and n_train % FT_BATCH == 0  # full batches: each image once per epoch
    steps = PRETRAIN_EPOCHS * n_train // BATCH

    args = [
        "--model",
        "convnextv2_atto",
        "--input-size",
        "64",
        "--batch-size",
        BATCH,
        "--decoder-dim",
        "32",
        "--num-workers",
        "2",
        "--report-to",
        "none",
        "--lr",
        "1.5e-3",
        "--warmup-steps",
        "10",
        "--max-steps",
        steps,
        "--save-every",
        "10",
        "--log-every",
        "4",
        "--max-bad-fraction",
        "0.05",
        "--data",
        tmp_path / "data" / "train",
    ]
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    proc = run_cli([PRETRAIN, *args, "--output-dir", ref])
    for name in facts["train"]["names"]:  # the workers' warnings name every bad file
        assert name in proc.stderr, name

    kill = int(os.environ.get("SMOKE_KILL_STEP") or random.Random().randint(11, steps - 1))
    print(f"pretraining killed at step {kill} (rerun with SMOKE_KILL_STEP={kill})")
    crashed = run_cli([PRETRAIN, *args, "--output-dir", resumed], env={"FCMAE_FAULT": f"step:{kill}"}, check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert not (resumed / "final.yaml").exists()
    proc = run_cli([PRETRAIN, *args, "--output-dir", resumed, "--resume", "auto"])
    assert f"at step {(kill - 1) // 10 * 10} (" in proc.stdout + proc.stderr  # the newest checkpoint before the kill

    for name in ("encoder.safetensors", "fcmae.safetensors"):
        assert_same_tensors(resumed / name, ref / name)
    timing = "images_per_sec"  # wall-clock: the one field that may differ
    got, want = ([{k: v for k, v in r.items() if k != timing} for r in rows(p)] for p in (resumed, ref))
    assert [r["step"] for r in want] == list(range(4, steps + 1, 4)) and got == want
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in want)
    for out in (ref, resumed):
        done = final(out)
        assert done["step"] == steps and done["epochs"] == PRETRAIN_EPOCHS
        assert done["num_seen"] == PRETRAIN_EPOCHS * n_train and done["num_bad"] == PRETRAIN_EPOCHS * train_bad

    # fine-tune from the resumed run with the official recipe's augmentation, Mixup/CutMix and EMA
    (tmp_path / "spy").mkdir()
    (tmp_path / "spy" / "sitecustomize.py").write_text(SPY)
    ft, bits_log = tmp_path / "ft", tmp_path / "posterize.txt"
    proc = run_cli(
        [
            FINETUNE,
            "--from-fcmae",
            resumed,
            "--data",
            tmp_path / "data",
            "--input-size",
            "64",
            "--batch-size",
            FT_BATCH,
            "--epochs",
            FT_EPOCHS,
            "--warmup-epochs",
            "1",
            "--num-workers",
            "2",
            "--aa",
            "rand-m9-mstd0.5-inc1",
            "--reprob",
            "0.25",
            "--mixup",
            "0.8",
            "--cutmix",
            "1.0",
            "--drop-path",
            "0.1",
            "--model-ema",
            "--max-bad-fraction",
            "0.05",
            "--report-to",
            "none",
            "--output-dir",
            ft,
        ],
        env={"PYTHONPATH": str(tmp_path / "spy"), "POSTERIZE_LOG": str(bits_log)},
    )
    for name in facts["train"]["names"] + facts["val"]["names"]:
        assert name in proc.stderr, name
    log = rows(ft)
    assert [r["epoch"] for r in log] == list(range(FT_EPOCHS))
    for r in log:
        assert math.isfinite(r["train_loss"]) and r["train_loss"] > 0
        assert r["val_bad"] == val_bad and r["val_samples"] == n_val - val_bad  # left out, not replaced
        assert 0 <= r["acc1"] <= r["acc5"] <= 100 and 0 <= r["ema_acc1"] <= r["ema_acc5"] <= 100
    done = final(ft)
    assert done["step"] == FT_EPOCHS * n_train // FT_BATCH and done["epochs"] == FT_EPOCHS
    assert done["num_seen"] == FT_EPOCHS * n_train and done["num_bad"] == FT_EPOCHS * train_bad
    assert (ft / "labels.txt").read_text().split() == CLASSES
    for name in ("best.safetensors", "best_ema.safetensors", "last.safetensors"):
        assert (ft / name).is_file(), name
    bits = [int(b) for b in bits_log.read_text().split()]
    print(f"posterize drawn {len(bits)} times, with 0 bits kept {bits.count(0)} times")
    assert len(bits) > 20, "RandAugment's posterize hardly ran: is --aa reaching the training transform?"
    # m ~ N(9, 0.5) reaches 10 (0 bits kept: a black image) in ~2 % of posterize draws; the spy makes every
    # 5th draw of each process that extreme, so the run goes through it whatever the draws
    assert 0 in bits, "the 0-bit posterize did not run in the fine-tuning workers"
