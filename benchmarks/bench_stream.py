"""Sharded streaming (fcmae.data.stream) against the folder loader and datasets' stream: images/s, read
amplification of 2 processes x 2 DataLoader workers, and the cost of resuming at 10 % and 90 % of an
epoch. Prints a table, saves JSON (with the machine) and a PNG plot.

    python benchmarks/bench_stream.py                      # 1,024 JPEGs cut from the demo photos, 8 shards
    python benchmarks/bench_stream.py --images 4096 --shards 16 --input-size 224 --workers 2

The same JPEGs are read three ways: the folder (map-style, `build_pretrain_loader`), the packed parquet
shards streamed by fcmae.data.stream (`--streaming` now), and the same shards streamed by datasets'
IterableDataset split with split_dataset_by_node(strategy="examples") (`--streaming` before: every
worker reads the whole stream). Bytes read are counted three ways: fcmae's counting file wrapper
(FCMAE_COUNT_READS, per shard, workers included), strace (read/pread64/readv/preadv of the shard files
by every process and thread, where strace is installed and allowed), and /proc/self/io rchar of each
rank's process after its workers are reaped (all reads, Python's own files included: a loose upper
bound, kept in the JSON only). Each rank is a process of its own (`--rank`, internal), started side by
side. Resume: one process, --workers workers, from 10 % / 90 % of the epoch: `start_at` for the
stream, accelerate's skip_first_batches for datasets' stream (what the training loop does today).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import machine, pyplot  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "stream_cpu.json"
SYSCALL = re.compile(r"^(?:\d+ )?(read|pread64|readv|preadv|preadv2)\((\d+)<([^>]*)>.*\) = (\d+)$")


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return -1


def quiet_datasets():
    import datasets

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # a 5 s guard sleep per closed stream; not reading
    datasets.disable_progress_bars()


def legacy_loader(cfg, batch_size, workers, seed=0, rank=0, world=1):
    """`--streaming` before fcmae.data.stream (fcmae.data.loaders at the previous commit)."""
    import torch
    from datasets.distributed import split_dataset_by_node

    from fcmae.data import EpochLoader, Reader, StreamingPretrainImages, by_input, load_source

    transform = by_input("pretrain", cfg.input_size, cfg.mean, cfg.std)
    hf, num = load_source(cfg)
    hf = split_dataset_by_node(
        hf.shuffle(seed=seed, buffer_size=cfg.stream_window), rank=rank, world_size=world, strategy="examples"
    )
    ds = StreamingPretrainImages(
        hf,
        transform,
        batch_size,
        num // world // batch_size,
        cfg.input_size,
        seed,
        rank,
        world,
        cfg.max_bad_fraction,
        Reader(),
        cfg.mean,
    )
    loader = EpochLoader(
        ds, batch_size=batch_size, num_workers=workers, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    loader.set_epoch(0)
    return loader


WINDOW = 8  # --window: rows of a shuffle block (DataConfig.stream_window, default 1024; see main's help)


def make_loader(kind, data, batch_size, workers, input_size, rank=0, world=1):
    from fcmae.data import DataConfig, build_pretrain_loader

    cfg = DataConfig(data=data, streaming=kind != "folder", input_size=input_size, stream_window=WINDOW)
    if kind == "legacy":
        return legacy_loader(cfg, batch_size, workers, rank=rank, world=world)
    return build_pretrain_loader(cfg, batch_size, workers, rank=rank, world_size=world)


def one_rank(args) -> dict:
    """One process of a run (--rank): an epoch, or the rest of one from --resume-at (a fraction)."""
    import warnings

    from accelerate import skip_first_batches

    import fcmae.data  # noqa: F401 - imports are not the loader's time

    quiet_datasets()
    warnings.simplefilter("ignore")
    before, t0 = rchar(), time.perf_counter()
    loader = make_loader(args.kind, args.data, args.batch_size, args.workers, args.input_size, args.rank, args.world)
    start = int(args.resume_at * len(loader))
    if start and args.kind == "stream":
        batches = loader.start_at(0, start)
    elif start:
        loader.set_epoch(0)
        batches = skip_first_batches(loader, start)  # what the loop does for a map-style or datasets stream
    else:
        batches = loader
    first, n = None, 0
    for images, _ in batches:
        first = first or time.perf_counter()
        n += len(images)
    end = time.perf_counter()
    del batches, loader  # workers are reaped: their reads are in this process's counters
    return {
        "rank": args.rank,
        "images": n,
        "seconds": end - t0,
        "first_batch_s": first - t0,
        "rchar": rchar() - before,
        "steps_skipped": start,
    }


def strace_ok() -> bool:
    if not shutil.which("strace"):
        return False
    return subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True).returncode == 0


def run_ranks(kind, data, world, workers, batch_size, input_size, resume_at=0.0, trace=False) -> dict:
    """``world`` rank processes side by side; bytes read by shard file, three ways."""
    tmp = Path(tempfile.mkdtemp(prefix="fcmae_bench_stream_"))
    env = {**os.environ, "FCMAE_COUNT_READS": str(tmp / "counts"), "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world):
        cmd = [
            sys.executable,
            __file__,
            "--rank",
            str(rank),
            "--world",
            str(world),
            "--kind",
            kind,
            "--data",
            data,
            "--workers",
            str(workers),
            "--batch-size",
            str(batch_size),
            "--input-size",
            str(input_size),
            "--resume-at",
            str(resume_at),
            "--window",
            str(WINDOW),
        ]
        if trace:
            cmd = [
                "strace",
                "-f",
                "-ff",
                "-qq",
                "-s",
                "0",
                "-y",
                "-e",
                "trace=read,pread64,readv,preadv,preadv2",
                "-o",
                str(tmp / f"trace{rank}"),
                *cmd,
            ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    ranks = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"a rank failed:\n{err[-3000:]}")
        ranks.append(json.loads(out.strip().splitlines()[-1]))
    from fcmae.data.shards import read_counts

    counted = read_counts(str(tmp / "counts"))
    traced = None
    if trace:
        shard_files = {str(p) for p in Path(data).rglob("*.parquet")}
        traced = 0
        for f in tmp.glob("trace*"):
            for line in f.read_text(errors="replace").splitlines():
                m = SYSCALL.match(line)
                if m and m.group(3) in shard_files:
                    traced += int(m.group(4))
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "ranks": ranks,
        "counted_bytes": sum(counted.values()) if counted else None,
        "strace_bytes": traced,
        "rchar_bytes": sum(r["rchar"] for r in ranks),
        "seconds": max(r["seconds"] for r in ranks),
        "first_batch_s": max(r["first_batch_s"] for r in ranks),
        "images": sum(r["images"] for r in ranks),
    }


def throughput(kind, data, batch_size, workers, input_size, repeats=2) -> dict:
    """images/s over an epoch after the first batch (worker start-up is not throughput), one process;
    the best of ``repeats`` epochs (the machine is shared: the best is the least disturbed)."""
    import warnings

    import torch

    torch.set_num_threads(1)  # as in a DataLoader worker: on a busy machine, more threads only spin
    quiet_datasets()
    warnings.simplefilter("ignore")
    runs = []
    for epoch in range(repeats):
        loader = make_loader(kind, data, batch_size, workers, input_size)
        loader.set_epoch(epoch)
        t0, n, first = time.perf_counter(), 0, None
        for images, _ in loader:
            if first is None:
                first = time.perf_counter()
                continue
            n += len(images)
        end = time.perf_counter()
        runs.append((n / (end - first), first - t0))
    return {  # medians over the repeats
        "kind": kind,
        "workers": workers,
        "images_per_sec": statistics.median(r[0] for r in runs),
        "first_batch_s": statistics.median(r[1] for r in runs),
        "images_per_sec_runs": [r[0] for r in runs],
    }


def make_data(n: int, shards: int) -> tuple[str, str, int]:
    """(JPEG folder, packed parquet folder, total shard bytes): bench_data's JPEGs, packed into ``shards``."""
    from bench_data import synthetic_folder

    from fcmae.data.pack import pack

    folder = synthetic_folder(n)
    total = sum(f.stat().st_size for f in Path(folder).iterdir())
    out = tempfile.mkdtemp(prefix="fcmae_bench_shards_")
    manifest = pack(folder, out, shard_size=math.ceil(total / shards) + 1, workers=2, log=lambda *_: None)
    size = sum(s["bytes"] for s in manifest["splits"]["train"]["shards"])
    return folder, out, size


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    t = result["throughput"]
    labels = [f"{r['kind']}\n{r['workers']} workers" for r in t]
    axes[0].bar(
        labels, [r["images_per_sec"] for r in t], color=["#999", "#999", "#1f77b4", "#1f77b4", "#d62728"][: len(t)]
    )
    axes[0].set_ylabel("images / s (one process)")
    axes[0].set_title("throughput")
    a = result["amplification"]
    axes[1].bar(list(a), [v["amplification"] for v in a.values()], color=["#1f77b4", "#d62728"][: len(a)])
    axes[1].axhline(1.1, ls="--", c="k", lw=0.8)
    axes[1].set_ylabel("bytes read / shard bytes")
    axes[1].set_title("read amplification, 2 processes x 2 workers")
    r = result["resume"]
    x = range(len(r))
    axes[2].bar([i - 0.2 for i in x], [v["read_fraction"] for v in r], width=0.4, label="shard bytes read / epoch")
    axes[2].bar([i + 0.2 for i in x], [v["time_fraction"] for v in r], width=0.4, label="seconds / full epoch's")
    axes[2].set_xticks(list(x), [f"{v['kind']}\nat {v['at']:.0%}" for v in r])
    axes[2].set_title("resuming mid-epoch (rest of the epoch)")
    axes[2].legend(fontsize=8)
    fig.suptitle(
        f"{result['images']} JPEGs, {result['shards']} parquet shards, {result['input_size']} px; "
        f"{result['machine']['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    global WINDOW
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--window",
        type=int,
        default=8,
        help="--stream-window of the stream (default 8 rows, 6 %% of a partition of 128 rows here, "
        "as the default 1024 is of a partition of ImageNet split 64 ways; 1024 would make a block "
        "a whole partition of this small benchmark, so a resume would read all of it)",
    )
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="stream", help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resume-at", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    WINDOW = args.window
    if args.rank is not None:
        print(json.dumps(one_rank(args)))
        return

    info = machine("cpu")
    folder, shards, size = make_data(args.images, args.shards)
    trace = strace_ok()
    result = {
        "images": args.images,
        "shards": args.shards,
        "shard_bytes": size,
        "batch_size": args.batch_size,
        "window": args.window,
        "workers": args.workers,
        "input_size": args.input_size,
        "machine": info,
        "command": " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "strace": trace,
    }

    result["throughput"] = [
        throughput(kind, data, args.batch_size, w, args.input_size)
        for kind, data in (("folder", folder), ("stream", shards), ("legacy", shards))
        for w in ((0, args.workers) if kind != "legacy" else (args.workers,))
    ]
    amp = {}
    for kind in ("stream", "legacy"):
        r = run_ranks(kind, shards, 2, 2, args.batch_size // 2, args.input_size, trace=trace)
        measured = r["strace_bytes"] if r["strace_bytes"] is not None else r["counted_bytes"]
        amp[kind] = {
            **{k: v for k, v in r.items() if k != "ranks"},
            "amplification": (measured or 0) / size,
            "rchar_amplification": r["rchar_bytes"] / size,
            "counted_amplification": (r["counted_bytes"] or 0) / size,
        }
    result["amplification"] = amp
    resume = []
    for kind in ("stream", "legacy"):
        full = run_ranks(kind, shards, 1, args.workers, args.batch_size, args.input_size, trace=trace)
        for at in (0.1, 0.9):
            r = run_ranks(kind, shards, 1, args.workers, args.batch_size, args.input_size, resume_at=at, trace=trace)
            read = r["strace_bytes"] if r["strace_bytes"] is not None else r["counted_bytes"]
            read_full = full["strace_bytes"] if full["strace_bytes"] is not None else full["counted_bytes"]
            resume.append(
                {
                    "kind": kind,
                    "at": at,
                    "bytes": read,
                    "read_fraction": read / size,
                    "bytes_full_epoch": read_full,
                    "seconds": r["seconds"],
                    "seconds_full_epoch": full["seconds"],
                    "time_fraction": r["seconds"] / full["seconds"],
                    "first_batch_s": r["first_batch_s"],
                    "images": r["images"],
                }
            )
    result["resume"] = resume
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)

    print(
        f"{args.images} JPEGs in {args.shards} parquet shards ({size / 1e6:.1f} MB), {args.input_size} px, "
        f"{info['device']}, load {info['load_avg_1m_at_start']:.1f}"
    )
    print(f"{'loader':<8} {'workers':>7} {'images/s':>9} {'first batch s':>14}")
    for r in result["throughput"]:
        print(f"{r['kind']:<8} {r['workers']:>7} {r['images_per_sec']:>9.1f} {r['first_batch_s']:>14.2f}")
    print("read amplification, 2 processes x 2 workers (bytes read / shard bytes):")
    for kind, r in amp.items():
        print(
            f"  {kind:<8} {r['amplification']:.3f} ({'strace' if trace else 'counted'})"
            + (f"; fcmae's counting wrapper {r['counted_amplification']:.3f}" if r["counted_bytes"] else "")
        )
    print(f"{'resume':<8} {'at':>4} {'read/shards':>12} {'s':>7} {'s full':>7} {'first batch s':>14}")
    for r in resume:
        print(
            f"{r['kind']:<8} {r['at']:>4.0%} {r['read_fraction']:>12.3f} {r['seconds']:>7.1f} "
            f"{r['seconds_full_epoch']:>7.1f} {r['first_batch_s']:>14.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"saved {out} and {out.with_suffix('.png')}")


def versions() -> dict:
    import datasets
    import fsspec
    import pyarrow
    import torch

    return {
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "pyarrow": pyarrow.__version__,
        "fsspec": fsspec.__version__,
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    main()
