"""Start-up time on a local image folder: listing it, and building the pretraining loader up to its
first batch (build_pretrain_loader + next(iter(loader)), num_workers 0), for N tiny JPEGs in 100
class folders. Fits time = a + b * N and extrapolates to ImageNet-1K (1,281,167 files). Prints a
table, saves JSON and a PNG plot.

    python benchmarks/bench_listing.py --old-sizes 10000 50000           # 10k, 50k, 100k, 200k files
    python benchmarks/bench_listing.py --sizes 1000 5000 --old-sizes 1000  # smaller; and the old listing

One folder grows from size to size (files are added, never rewritten). Each measurement starts with
an empty listing cache, as a new run does; the operating system's file cache is warm (the files were
just written), so a cold disk or a network file system takes longer. --old-sizes also times
datasets' pattern matching (get_data_patterns + DataFilesDict.from_patterns: an fsspec glob per
pattern), which is how fcmae listed folders before.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import machine, pyplot, stamp  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def grow(folder: Path, n: int, classes: int) -> None:
    """Add tiny JPEGs (distinct 8x8 colours) until the folder holds n, spread over `classes` folders."""
    from PIL import Image

    have = sum(len(os.listdir(folder / f"class_{c:03d}")) for c in range(classes)) if folder.exists() else 0
    for c in range(classes):
        (folder / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(have, n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (i % 256, (i // 256) % 256, 7)).save(buf, format="JPEG", quality=90)
        (folder / f"class_{i % classes:03d}" / f"img_{i:07d}.jpg").write_bytes(buf.getvalue())


def time_listing(folder: Path) -> tuple[float, int]:
    from fcmae.data import listing

    listing.clear_cache()
    t0 = time.perf_counter()
    files = listing.list_files(str(folder))
    return time.perf_counter() - t0, sum(map(len, files.values()))


def time_first_batch(folder: Path, batch_size: int, input_size: int) -> float:
    from fcmae.data import DataConfig, build_pretrain_loader, listing

    listing.clear_cache()
    t0 = time.perf_counter()
    loader = build_pretrain_loader(DataConfig(data=str(folder), input_size=input_size), batch_size, num_workers=0)
    images, ok = next(iter(loader))
    assert images.shape == (batch_size, 3, input_size, input_size) and ok.all()
    return time.perf_counter() - t0


def time_old_listing(folder: Path) -> float:
    from datasets.data_files import DataFilesDict, get_data_patterns

    t0 = time.perf_counter()
    DataFilesDict.from_patterns(get_data_patterns(str(folder)), base_path=str(folder))
    return time.perf_counter() - t0


def fit(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares line t = a + b * n."""
    import numpy as np

    if len(ns) < 2:
        return ts[0], 0.0
    b, a = np.polyfit(np.asarray(ns, float), np.asarray(ts, float), 1)
    return float(a), float(b)


def plot(rows, fits, path: Path, device: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["files"] for r in rows]
    for key, label in (("first_batch_s", "build_pretrain_loader + first batch"), ("listing_s", "listing alone")):
        a, b = fits[key]
        (points,) = ax.plot(ns, [r[key] for r in rows], "o", label=label)
        ax.plot(ns, [a + b * n for n in ns], "-", alpha=0.5, color=points.get_color())
    old = [r for r in rows if r.get("old_listing_s") is not None]
    if old:
        ax.plot([r["files"] for r in old], [r["old_listing_s"] for r in old], "x", label="old listing (datasets' glob)")
    ax.set(xlabel="image files", ylabel="seconds", title=f"Start-up on a local folder\n{device}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000, 200_000])
    p.add_argument("--old-sizes", type=int, nargs="*", default=[], help="sizes at which to time the old listing too")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--folder", default=None, help="where to write the files (default: a temporary folder, removed)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "listing_cpu.json"))
    args = p.parse_args()

    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="fcmae_bench_listing_")) / "images"
    rows = []
    print(f"{'files':>8s} {'write s':>8s} {'listing s':>10s} {'first batch s':>14s} {'old listing s':>14s}")
    try:
        for n in sorted(args.sizes):
            t0 = time.perf_counter()
            grow(folder, n, args.classes)
            written = time.perf_counter() - t0
            listing_s, listed = time_listing(folder)
            assert listed == n, (listed, n)
            first = time_first_batch(folder, args.batch_size, args.input_size)
            old = time_old_listing(folder) if n in args.old_sizes else None
            rows.append(dict(files=n, write_s=written, listing_s=listing_s, first_batch_s=first, old_listing_s=old))
            old_text = f"{old:14.1f}" if old is not None else f"{'-':>14s}"
            print(f"{n:8d} {written:8.1f} {listing_s:10.2f} {first:14.2f} {old_text}", flush=True)
    finally:
        if not args.folder:
            shutil.rmtree(folder.parent, ignore_errors=True)
    ns = [r["files"] for r in rows]
    fits = {key: fit(ns, [r[key] for r in rows]) for key in ("listing_s", "first_batch_s")}
    for key, (a, b) in fits.items():
        print(f"{key}: {a:.2f} s + {b * 1e6:.2f} us/file -> {a + b * IMAGENET_TRAIN:.1f} s at {IMAGENET_TRAIN:,} files")
    info = machine("cpu")
    print(
        f"{info['device']} | load average at start {info['load_avg_1m_at_start']:.1f} | batch {args.batch_size}, "
        f"{args.input_size} px | {args.classes} class folders | warm file cache"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "classes": args.classes,
                "batch_size": args.batch_size,
                "input_size": args.input_size,
                "rows": rows,
                "fits": {
                    k: {"a_s": a, "b_s_per_file": b, "at_imagenet_s": a + b * IMAGENET_TRAIN}
                    for k, (a, b) in fits.items()
                },
                **stamp(),
            },
            indent=1,
        )
    )
    plot(rows, fits, out.with_suffix(".png"), info["device"])
    print(f"saved {out}")


if __name__ == "__main__":
    main()
