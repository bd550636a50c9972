"""Does FCMAE pretraining help when labels are few? A small experiment on real images, offline.

    python benchmarks/finetune_experiment.py                       # 3 seeds x 3 label budgets, CPU
    python benchmarks/finetune_experiment.py --seeds 0 --budgets 1,100 --finetune-steps 60   # a quick look
    python benchmarks/finetune_experiment.py --tune                # the k-NN comparison behind the preset

Data: scikit-learn's bundled handwritten digits (UCI optdigits test set: 1,797 8x8 grey images,
10 classes; no download), upsampled to 64x64 RGB PNGs, split 80/20 stratified (random_state 0,
the same split for every seed): 1,437 train / 360 val. Per seed:

1. FCMAE pretraining (``fcmae/pretrain.py --config configs/pretrain/small_data.yaml``) on all
   1,437 training images, labels unused, with the weighted k-NN monitor (``--knn-data``: all
   labelled train images as the memory bank, the val split as queries) a few times per epoch.
2. For each label budget B (percent of the training split): a stratified per-class subsample
   (``label_subset``: at least one image per class; 1 % = 14 images, 10 % = 144, 100 % = 1,437).
   ``finetune/run.py`` from the pretrained encoder (layer decay 0.9, the official atto value) and
   from random weights (layer decay 1.0: a random encoder has no pretrained layers to protect),
   with the same optimizer steps, schedule, lr and augmentation, and the same initial head seed.
   Every budget trains the same number of optimizer steps: its training folder repeats the subset
   until it holds at least 1,437 images, so an epoch is about the same length and tiny budgets
   still train (sampling the few labelled images with augmentation, as more epochs would).
3. Top-1 on the full 360-image val split after the last step (``final``; ``best`` is the best
   per-epoch value, optimistic since it selects on val).

Short runs use light augmentation (crop + flip; no RandAugment, erasing, mixup) and no EMA; both
arms the same. Prints the table and writes benchmarks/results/finetune_experiment.json (and .png
where matplotlib is installed). A rerun with the same ``--work-dir`` reuses the runs that finished
(their result.json): use a new work dir after changing flags. ``--tune`` runs short pretrainings
on one seed and compares their final knn_acc1 (benchmarks/results/finetune_experiment_tune.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import machine, pyplot, stamp  # noqa: E402

PRESET = ROOT / "configs" / "pretrain" / "small_data.yaml"
RNG_LOCK = threading.Lock()  # random_knn seeds torch's global generator; runs share it from threads
# one factor at a time around the preset's starting point: (name, extra pretrain flags)
TUNE_GRID = [
    ("mask0.5_lr1e-3_dec512", ["--mask-ratio", 0.5, "--lr", 1e-3, "--decoder-dim", 512]),
    ("mask0.75_lr1e-3_dec512", ["--mask-ratio", 0.75, "--lr", 1e-3, "--decoder-dim", 512]),
    ("mask0.5_lr3e-3_dec512", ["--mask-ratio", 0.5, "--lr", 3e-3, "--decoder-dim", 512]),
    ("mask0.5_lr1e-3_dec128", ["--mask-ratio", 0.5, "--lr", 1e-3, "--decoder-dim", 128]),
]


def make_digits(root: Path, size: int) -> dict:
    """sklearn digits -> root/{train,val}/{0..9}/*.png; returns the split sizes."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, val = train_test_split(index, test_size=0.2, stratify=digits.target, random_state=0)
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8))
            grey.resize((size, size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return {"train": len(train), "val": len(val)}


def label_subset(files_by_class: dict, percent: float, seed: int) -> dict:
    """A stratified subsample: round(percent x N) images in all, at least one per class; each class
    first gets floor(percent x its count) (at least 1), the rest go to the classes with the largest
    remainders (ties broken at random by ``seed``); the images within a class are drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    classes = sorted(files_by_class)
    counts = np.array([len(files_by_class[c]) for c in classes])
    total = max(len(classes), round(percent / 100 * counts.sum()))
    exact = percent / 100 * counts
    take = np.maximum(1, np.floor(exact)).astype(int)
    order = np.lexsort((rng.random(len(classes)), -(exact - np.floor(exact))))  # largest remainder first
    for i in order[: max(0, total - take.sum())]:
        take[i] += 1
    return {
        c: sorted(rng.choice(files_by_class[c], size=min(n, len(files_by_class[c])), replace=False))
        for c, n in zip(classes, take)
    }


def budget_folder(data: Path, out: Path, subset: dict, fill: int) -> int:
    """out/train holds the subset repeated to at least ``fill`` images (hard links), out/val the val split."""
    if (out / "repeats.txt").exists():  # built by an earlier run in this work dir
        return int((out / "repeats.txt").read_text())
    if out.exists():
        shutil.rmtree(out)
    repeats = -(-fill // sum(len(v) for v in subset.values()))
    same_disk = data.stat().st_dev == out.parent.stat().st_dev
    link = os.link if same_disk else shutil.copy  # hard links: 9 folders of ~1.8k files cost no space
    for c, files in subset.items():
        (out / "train" / c).mkdir(parents=True)
        for f in files:
            for r in range(repeats):
                link(f, out / "train" / c / f"{f.stem}_{r:03d}.png")
    for f in (data / "val").glob("*/*.png"):
        (out / "val" / f.parent.name).mkdir(parents=True, exist_ok=True)
        link(f, out / "val" / f.parent.name / f.name)
    (out / "repeats.txt").write_text(f"{repeats}\n")
    return repeats


def run(script: str, args: list, log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, script, *map(str, args)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        )
    if proc.returncode:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def cached(out: Path, compute) -> dict:
    """out/result.json when a finished run left one (a rerun, e.g. after a stop, reuses it), else compute()."""
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    result = compute()
    done.write_text(json.dumps(result) + "\n")
    return result


def rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def random_knn(data: Path, size: int, seed: int) -> float:
    """k-NN top-1 of the FCMAE encoder before any pretraining step (the curve's step 0), with the
    monitor the pretraining runs use."""
    import torch

    from fcmae import create_fcmae
    from fcmae.tasks.pretrain.evaluation import KnnMonitor

    with RNG_LOCK:
        torch.manual_seed(seed)
        encoder = create_fcmae("convnextv2_atto").encoder
    return KnnMonitor.from_folder(str(data), None, size, 64)(encoder)["knn_acc1"]


def pretrain(args, data: Path, out: Path, seed: int, extra: list) -> dict:
    return cached(out, lambda: _pretrain(args, data, out, seed, extra))


def _pretrain(args, data: Path, out: Path, seed: int, extra: list) -> dict:
    flags = [
        "--config",
        args.preset,
        "--data",
        data / "train",
        "--knn-data",
        data,
        "--seed",
        seed,
        "--num-workers",
        0,
        "--report-to",
        "none",
        "--num-recon",
        0,
        "--save-every",
        100000,
        *extra,
    ]
    seconds = run("fcmae/pretrain.py", [*flags, "--output-dir", out], out.parent / f"{out.name}.log", args.threads)
    log = rows(out)
    knn = [(r["step"], round(r["knn_acc1"], 2)) for r in log if "knn_acc1" in r]
    loss = [r["loss"] for r in log if "loss" in r]
    return {"seconds": round(seconds, 1), "knn_acc1": knn, "loss_first": loss[0], "loss_last": loss[-1]}


def finetune(args, data: Path, out: Path, seed: int, encoder: Path | None) -> dict:
    return cached(out, lambda: _finetune(args, data, out, seed, encoder))


def _finetune(args, data: Path, out: Path, seed: int, encoder: Path | None) -> dict:
    flags = [
        "--model",
        "convnextv2_atto",
        "--input-size",
        args.size,
        "--batch-size",
        args.batch_size,
        "--num-workers",
        0,
        "--report-to",
        "none",
        "--seed",
        seed,
        "--data",
        data,
        "--max-steps",
        args.finetune_steps,
        "--warmup-steps",
        args.finetune_steps // 10,
        "--lr",
        args.finetune_lr,
        "--aa",
        "none",
        "--color-jitter",
        "none",
        "--reprob",
        0,
        "--mixup",
        0,
        "--cutmix",
        0,
        "--smoothing",
        0.1,
        "--drop-path",
        0.1,
        "--weight-decay",
        0.05,
    ]
    flags += ["--from-fcmae", encoder, "--layer-decay", 0.9] if encoder else ["--layer-decay", 1.0]
    seconds = run("finetune/run.py", [*flags, "--output-dir", out], out.parent / f"{out.name}.log", args.threads)
    log = rows(out)
    return {
        "final_acc1": log[-1]["acc1"],
        "best_acc1": max(r["acc1"] for r in log),
        "acc1_per_eval": [(r["step"], round(r["acc1"], 2)) for r in log],
        "seconds": round(seconds, 1),
    }


def mean_std(values: list) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def tune(args, data: Path, work: Path) -> None:
    def one(item):
        name, extra = item
        r = pretrain(args, data, work / "tune" / name, args.seeds[0], [*extra, "--epochs", args.tune_epochs])
        print(f"{name}: knn_acc1 {r['knn_acc1']} ({r['seconds']:.0f} s)", flush=True)
        return name, {"flags": extra, **r}

    (work / "tune").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(one, TUNE_GRID))
    results["random_init"] = {"knn_acc1": [(0, round(random_knn(data, args.size, args.seeds[0]), 2))], "loss_last": 0}
    print("\n| setting | final knn_acc1 | best knn_acc1 | loss last |\n|---|---|---|---|")
    for name, r in results.items():
        knn = [a for _, a in r["knn_acc1"]]
        print(f"| {name} | {knn[-1]:.2f} | {max(knn):.2f} | {r['loss_last']:.3f} |")
    out = Path(args.output).with_name("finetune_experiment_tune.json")
    out.write_text(
        json.dumps(
            {
                "seed": args.seeds[0],
                "epochs": args.tune_epochs,
                "base_preset": str(args.preset),
                "results": results,
                "machine": machine("cpu"),
                **stamp(),
            },
            indent=1,
        )
        + "\n"
    )
    print(f"saved {out}")


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for seed, p in record["pretrain"].items():
        steps, acc = zip(*p["knn_acc1"])
        a.plot(steps, acc, marker="o", label=f"seed {seed}")
    a.set(xlabel="pretraining step", ylabel="weighted k-NN top-1 (%)", title="k-NN during FCMAE pretraining")
    a.legend()
    for method in ("fcmae", "scratch"):
        t = record["table"][method]
        b.errorbar(
            record["budgets"],
            [t[str(x)]["mean"] for x in record["budgets"]],
            yerr=[t[str(x)]["std"] for x in record["budgets"]],
            marker="o",
            capsize=4,
            label=method,
        )
    b.set(
        xscale="log",
        xlabel="labelled training images (%)",
        ylabel="val top-1 (%), mean ± std",
        title=f"fine-tuning, {record['config']['finetune_steps']} steps",
    )
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="outputs/finetune_experiment")
    p.add_argument("--preset", default=str(PRESET), help="pretraining config (model, size, recipe, k-NN cadence)")
    p.add_argument("--budgets", default="1,10,100", help="percent of the training labels")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--finetune-steps", type=int, default=60, help="optimizer steps for every budget and arm")
    p.add_argument("--finetune-lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run (1 is fastest on a busy 2-core CPU)")
    p.add_argument("--tune", action="store_true", help="compare short pretrainings by k-NN instead")
    p.add_argument("--tune-epochs", type=int, default=3)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "finetune_experiment.json"))
    args = p.parse_args()
    args.budgets = [float(b) if "." in b else int(b) for b in args.budgets.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.perf_counter()

    work = (ROOT / args.work_dir).resolve()
    data = work / "digits"
    if not (data / "val").is_dir():
        make_digits(data, args.size)
    by_class = {c.name: sorted(c.glob("*.png")) for c in sorted((data / "train").iterdir())}
    n_train = sum(map(len, by_class.values()))
    if args.tune:
        return tune(args, data, work)

    subsets = {(b, s): label_subset(by_class, b, s) for b in args.budgets for s in args.seeds}
    sizes = {str(b): sum(map(len, subsets[b, args.seeds[0]].values())) for b in args.budgets}
    repeats = {(b, s): budget_folder(data, work / f"data_b{b}_s{s}", subsets[b, s], n_train) for b, s in subsets}
    pre, runs = {}, {}

    def chain(seed):  # pretraining, then the FCMAE arms that need it
        pre[seed] = pretrain(args, data, work / f"pretrain_s{seed}", seed, [])
        if pre[seed]["knn_acc1"][0][0] != 0:
            pre[seed]["knn_acc1"].insert(0, (0, round(random_knn(data, args.size, seed), 2)))  # random init
            (work / f"pretrain_s{seed}" / "result.json").write_text(json.dumps(pre[seed]) + "\n")
        print(f"seed {seed} pretraining: knn_acc1 {pre[seed]['knn_acc1']} ({pre[seed]['seconds']:.0f} s)", flush=True)
        for b in args.budgets:
            arm(b, seed, "fcmae")

    def arm(b, seed, method):
        encoder = work / f"pretrain_s{seed}" if method == "fcmae" else None
        r = finetune(args, work / f"data_b{b}_s{seed}", work / f"ft_{method}_b{b}_s{seed}", seed, encoder)
        runs[f"{method}_b{b}_s{seed}"] = {
            "method": method,
            "budget": b,
            "seed": seed,
            "labelled": sizes[str(b)],
            "repeats": repeats[b, seed],
            **r,
        }
        print(
            f"{method} {b}% seed {seed}: final {r['final_acc1']:.2f} best {r['best_acc1']:.2f} ({r['seconds']:.0f} s)",
            flush=True,
        )

    with ThreadPoolExecutor(args.jobs) as pool:  # seed by seed, so a stopped run leaves whole seeds
        jobs = [
            job
            for s in args.seeds
            for job in [pool.submit(chain, s)] + [pool.submit(arm, b, s, "scratch") for b in args.budgets]
        ]
        for j in jobs:
            j.result()

    final = lambda m, b: [runs[f"{m}_b{b}_s{s}"]["final_acc1"] for s in args.seeds]
    table = {
        m: {str(b): dict(zip(("mean", "std"), mean_std(final(m, b)))) for b in args.budgets}
        for m in ("fcmae", "scratch")
    }
    gain = {
        str(b): dict(zip(("mean", "std"), mean_std(list(np.subtract(final("fcmae", b), final("scratch", b))))))
        for b in args.budgets
    }
    wall = time.perf_counter() - t_start
    print(
        f"\nsklearn digits, {n_train} train / 360 val, convnextv2_atto at {args.size} px, {args.finetune_steps} "
        f"fine-tuning steps (batch {args.batch_size}), seeds {args.seeds}, wall {wall / 60:.1f} min\n"
    )
    print("| labels | images | FCMAE + fine-tune | scratch | FCMAE - scratch (paired) |\n|---|---|---|---|---|")
    for b in args.budgets:
        f, s, g = table["fcmae"][str(b)], table["scratch"][str(b)], gain[str(b)]
        print(
            f"| {b} % | {sizes[str(b)]} | {f['mean']:.2f} ± {f['std']:.2f} | {s['mean']:.2f} ± {s['std']:.2f} | "
            f"{g['mean']:+.2f} ± {g['std']:.2f} |"
        )
    for seed, r in pre.items():
        print(f"k-NN seed {seed}: " + ", ".join(f"{st}:{a:.1f}" for st, a in r["knn_acc1"]))
    record = {
        "dataset": "sklearn load_digits (8x8 -> 64x64 bicubic RGB), stratified 80/20 split (random_state 0)",
        "splits": {"train": n_train, "val": 360},
        "budgets": args.budgets,
        "labelled_images": sizes,
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("output",)},
            "preset": os.path.relpath(args.preset, ROOT),
            "work_dir": args.work_dir,
        },
        "table_metric": "val top-1 after the last fine-tuning step; mean and sample std over seeds",
        "table": table,
        "gain_paired": gain,
        "pretrain": {str(s): r for s, r in pre.items()},
        "runs": runs,
        "wall_seconds": round(wall, 1),  # this invocation; reused runs keep their own seconds
        "run_seconds_total": round(sum(r["seconds"] for r in [*runs.values(), *pre.values()]), 1),
        "machine": machine("cpu"),
        **stamp(),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(json.loads(out.read_text()), out.with_suffix(".png"))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
