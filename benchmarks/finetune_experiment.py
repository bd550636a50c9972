"""Does FCMAE pretraining help? A small experiment on real images available offline.

    python benchmarks/finetune_experiment.py                      # CPU default, about 10 minutes
    python benchmarks/finetune_experiment.py --pretrain-epochs 100 --finetune-epochs 30 --threads 8

Data: scikit-learn's bundled handwritten digits (UCI optdigits test set: 1,797 8x8 grey images,
10 classes; no download), upsampled to 64x64 RGB PNGs and split 80/20, stratified, into an image
folder with train/ and val/ class folders. Arms, all convnextv2_atto at 64 px, same seed:

1. FCMAE: ``fcmae/pretrain.py`` on the train images (labels unused), then ``finetune/run.py
   --from-fcmae`` with the official atto layer decay (0.9).
2. Scratch: ``finetune/run.py`` from random weights, the same fine-tuning flags, steps and schedule,
   without layer decay (1.0: a random encoder has no pretrained layers to protect).
3. Frozen features: logistic regression (scikit-learn, run to convergence) on the pooled, standardised
   features of the FCMAE encoder and of a random one, as a read-out of the representation that does
   not depend on a short training schedule.

Short fine-tuning runs use light augmentation (crop + flip, no RandAugment/erasing/mixup) and no EMA;
both arms the same. Prints a table and writes benchmarks/results/finetune_experiment.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_digits(root: Path, size: int, seed: int) -> dict:
    """sklearn digits -> root/{train,val}/{0..9}/*.png; returns the split sizes."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, val = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=seed)
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8))
            grey.resize((size, size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return {"train": len(train), "val": len(val)}


def run(script: str, args: list, log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{script} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def summary(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"best_acc1": max(r["acc1"] for r in rows), "final_acc1": rows[-1]["acc1"],
            "final_train_loss": rows[-1]["train_loss"], "acc1_per_epoch": [round(r["acc1"], 2) for r in rows]}


def frozen_probe(data: Path, size: int, encoder: Path | None, seed: int) -> float:
    """Top-1 (percent) of a logistic regression on frozen, pooled, standardised encoder features."""
    import torch
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    import fcmae
    from fcmae.data.labelled import eval_transform

    tf = eval_transform(size)
    torch.manual_seed(seed)
    model = fcmae.create_model("convnextv2_atto", num_classes=0).eval()
    if encoder is not None:
        fcmae.load_checkpoint(model, encoder)

    def features(split):
        files = sorted((data / split).glob("*/*.png"))
        x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            f = torch.cat([model.forward_features(x[i:i + 200]).mean((2, 3)) for i in range(0, len(x), 200)])
        return f.numpy(), np.array([int(f.parent.name) for f in files])

    (xtr, ytr), (xva, yva) = features("train"), features("val")
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    clf = LogisticRegression(max_iter=5000).fit((xtr - mu) / sd, ytr)
    return 100.0 * float((clf.predict((xva - mu) / sd) == yva).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="outputs/finetune_experiment")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pretrain-epochs", type=int, default=8)
    p.add_argument("--pretrain-lr", type=float, default=1.5e-3)
    p.add_argument("--mask-ratio", type=float, default=0.5)  # 64 px = 2x2 patches: keep 2 of 4
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--finetune-lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run (1 is fastest on a busy 2-core CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "finetune_experiment.json"))
    args = p.parse_args()

    work = (ROOT / args.work_dir).resolve()
    data = work / "digits"
    if not (data / "val").is_dir():
        counts = make_digits(data, args.size, args.seed)
    else:
        counts = {s: len(list((data / s).glob("*/*.png"))) for s in ("train", "val")}
    common = ["--model", "convnextv2_atto", "--input-size", args.size, "--batch-size", args.batch_size,
              "--num-workers", 0, "--report-to", "none", "--seed", args.seed]
    pretrain, times = work / "pretrain", {}
    times["pretrain"] = run("fcmae/pretrain.py", [
        *common, "--data", data / "train", "--epochs", args.pretrain_epochs, "--warmup-epochs", 1,
        "--lr", args.pretrain_lr, "--mask-ratio", args.mask_ratio, "--num-recon", 0, "--log-every", 10,
        "--save-every", 100000, "--output-dir", pretrain], work / "pretrain.log", args.threads)
    finetune = [*common, "--data", data, "--epochs", args.finetune_epochs, "--warmup-epochs", 1,
                "--lr", args.finetune_lr, "--aa", "none", "--color-jitter", "none", "--reprob", 0, "--mixup", 0,
                "--cutmix", 0, "--smoothing", 0.1,
                "--drop-path", 0.1, "--weight-decay", 0.05]
    arms = {"fcmae_finetune": ["--from-fcmae", pretrain, "--layer-decay", 0.9, *finetune],
            "scratch_finetune": ["--layer-decay", 1.0, *finetune]}
    results = {}
    for name, flags in arms.items():
        out = work / name
        times[name] = run("finetune/run.py", [*flags, "--output-dir", out], work / f"{name}.log", args.threads)
        results[name] = {**summary(out), "epochs": args.finetune_epochs, "seconds": round(times[name], 1)}
        print(f"{name}: best acc1 {results[name]['best_acc1']:.2f} ({times[name]:.0f} s)", flush=True)
    import torch

    torch.set_num_threads(args.threads)
    for name, encoder in (("fcmae_frozen_logreg", pretrain / "encoder.safetensors"), ("random_frozen_logreg", None)):
        t0 = time.perf_counter()
        acc = frozen_probe(data, args.size, encoder, args.seed)
        results[name] = {"best_acc1": acc, "final_acc1": acc, "epochs": "-",
                         "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: acc1 {acc:.2f}", flush=True)

    pre_rows = [json.loads(line) for line in (pretrain / "log.jsonl").read_text().splitlines()]
    steps_per_epoch = counts["train"] // args.batch_size
    print(f"\nsklearn digits ({counts['train']} train / {counts['val']} val, 10 classes), convnextv2_atto at "
          f"{args.size} px, batch {args.batch_size}, {steps_per_epoch} steps/epoch")
    print(f"FCMAE pretraining: {args.pretrain_epochs} epochs, mask ratio {args.mask_ratio}, loss "
          f"{pre_rows[0]['loss']:.3f} -> {pre_rows[-1]['loss']:.3f} ({times['pretrain']:.0f} s)\n")
    header = f"| {'run':<22} | {'epochs':>6} | {'top-1 best':>10} | {'top-1 last':>10} | {'time (s)':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        print(f"| {name:<22} | {r['epochs']:>6} | {r['best_acc1']:>10.2f} | {r['final_acc1']:>10.2f} | "
              f"{r['seconds']:>8.0f} |")
    record = {"dataset": "sklearn load_digits (8x8 -> 64x64 bicubic RGB), stratified 80/20 split", "splits": counts,
              "config": {**vars(args), "output": os.path.relpath(args.output, ROOT)}, "pretrain": {"seconds": round(times["pretrain"], 1),
                                                 "loss_first": pre_rows[0]["loss"], "loss_last": pre_rows[-1]["loss"]},
              "results": results, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                              "cpus": os.cpu_count(), "threads_per_run": args.threads}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nsaved {args.output}")


if __name__ == "__main__":
    main()
