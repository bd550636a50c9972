"""Data-loading throughput: decoded + augmented images/s for each --num-workers, so users can size
it against the training step's images/s (benchmarks/bench_pretrain.py). Prints a table, saves JSON
and a PNG plot.

    python benchmarks/bench_data.py                                  # 512 JPEGs cut from the demo photos, 224 px
    python benchmarks/bench_data.py --data /path/to/images --workers 0 1 2 4 8 --input-size 224
    python benchmarks/bench_data.py --workers 1 2 4 8 --step-results benchmarks/results/pretrain_step_cuda.json

With --step-results (a bench_pretrain.py JSON) it also prints, for each measured training step, the
--num-workers that decodes images at least as fast as the step consumes them (per device).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import machine, pyplot, stamp  # noqa: E402


def measure(cfg, batch_size: int, workers: int, batches: int) -> float:
    from fcmae.data import build_pretrain_loader

    loader = build_pretrain_loader(cfg, batch_size, num_workers=workers, seed=0)
    seen, epoch, t0 = 0, 0, None
    while seen < batches:
        loader.set_epoch(epoch)
        for _batch in loader:
            if t0 is None:  # start after the first batch: worker start-up is not throughput
                t0 = time.perf_counter()
                continue
            seen += 1
            if seen >= batches:
                break
        epoch += 1
    return seen * batch_size / (time.perf_counter() - t0)


def synthetic_folder(n: int) -> str:
    """n JPEGs cut from the demo photos (26 of them make one batch per epoch, where worker start-up
    would dominate): 256-px random crops, re-encoded, in a temporary folder."""
    import random
    import tempfile

    from PIL import Image

    from fcmae.data import DEMO_DIR

    photos = [Image.open(p).convert("RGB") for p in sorted(DEMO_DIR.glob("*.jpg"))]
    folder = Path(tempfile.mkdtemp(prefix="fcmae_bench_data_"))
    rng = random.Random(0)
    for i in range(n):
        img = photos[i % len(photos)]
        s = min(img.size + (256,))
        x, y = rng.randint(0, img.width - s), rng.randint(0, img.height - s)
        img.crop((x, y, x + s, y + s)).resize((256, 256)).save(folder / f"{i:04d}.jpg", quality=90)
    return str(folder)


def recommend(rows: list[dict], steps: list[dict]) -> list[dict]:
    """The fewest workers whose measured rate covers each training step's images/s (per device);
    beyond the largest count measured, extrapolate from its per-worker rate."""
    measured = sorted((r for r in rows if r["workers"] > 0), key=lambda r: r["workers"])
    if not measured:
        return []
    out = []
    for s in steps:
        need = s["images_per_sec"]
        fit = next((r["workers"] for r in measured if r["images_per_sec"] >= need), None)
        if fit is None:
            fit = math.ceil(need / measured[-1]["per_worker"])
        out.append(
            {k: s[k] for k in ("model", "size", "precision", "channels_last", "compile", "backend")}
            | {"step_images_per_sec": need, "num_workers": fit}
        )
    return out


def plot_by_workers(rows: list[dict], path: Path, title: str, ylabel: str, bare: float | None = None) -> None:
    """images/s against --num-workers (and the bare step's rate as a line), as a PNG."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(
        [r["workers"] for r in rows],
        [r["images_per_sec"] for r in rows],
        "o-",
        label="training loop" if bare is not None else None,
    )
    if bare is not None:
        ax.axhline(bare, color="gray", ls="--", label="bare step")
        ax.legend()
    ax.set_xlabel("--num-workers")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        default=None,
        help="anything --data of pretraining takes (default: --num-images "
        "JPEGs cut from the demo photos, in a temporary folder)",
    )
    p.add_argument("--num-images", type=int, default=512, help="JPEGs cut from the demo photos (without --data)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=24)
    p.add_argument(
        "--step-results", default=None, help="a bench_pretrain.py JSON: recommend --num-workers for each row"
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_loading_cpu.json"))
    args = p.parse_args()
    from fcmae.data import DataConfig

    info = machine()
    data = args.data or synthetic_folder(args.num_images)
    source = args.data or f"{args.num_images} demo-photo crops (256 px JPEG)"
    cfg = DataConfig(data=data, input_size=args.input_size)
    rows = []
    print(f"{'workers':>7s} {'images/s':>9s} {'per worker':>10s}")
    try:
        for w in args.workers:
            ips = measure(cfg, args.batch_size, w, args.batches)
            rows.append(dict(workers=w, images_per_sec=ips, per_worker=ips / max(w, 1)))
            print(f"{w:7d} {ips:9.1f} {ips / max(w, 1):10.1f}", flush=True)
    finally:
        if not args.data:
            shutil.rmtree(data, ignore_errors=True)
    recommended = recommend(rows, json.loads(Path(args.step_results).read_text())["rows"]) if args.step_results else []
    for r in recommended:
        print(
            f"{r['model']} {r['size']} {r['precision']} {r['backend']}{' channels_last' if r['channels_last'] else ''}"
            f"{' compiled' if r['compile'] else ''}: "
            f"{r['step_images_per_sec']:.0f} img/s per device -> --num-workers {r['num_workers']}"
        )
    print(
        f"{info['device']} | {source} | {args.input_size} px | RandomResizedCrop + flip + normalise | batch "
        f"{args.batch_size}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "data": source,
                "input_size": args.input_size,
                "batch_size": args.batch_size,
                "rows": rows,
                "recommended": recommended,
                **stamp(),
            },
            indent=1,
        )
    )
    plot_by_workers(rows, out.with_suffix(".png"), info["device"], "images / s (decode + augment)")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
