"""The whole pretraining loop against its bare training step: does data loading (decode, augment,
host-to-device copy) and the loop's bookkeeping keep the device busy? For each --num-workers it runs
`fcmae/pretrain.py` on a folder of JPEGs, reads the images/s the run logs (after the first log
interval: start-up and compilation), and divides by bench_pretrain.py's images/s for the same step
with the batch already in memory. 100 % means the loop costs nothing. Prints a table, saves JSON + PNG.

    python benchmarks/bench_loop.py                                   # CPU: atto, 224, batch 16, 0-1 workers
    python benchmarks/bench_loop.py --model convnextv2_base --batch-size 128 --mixed-precision bf16 \
        --channels-last --compile --workers 4 8 12 16 --steps 200 --log-every 50 --num-images 8192   # a GPU
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_data import plot_by_workers, synthetic_folder  # noqa: E402
from common import machine, stamp  # noqa: E402


def loop_rate(args, workers: int, data: str) -> tuple[float, list[float]]:
    """images/s of the training loop, averaged over the log intervals after the first."""
    out = Path(tempfile.mkdtemp(prefix="fcmae_bench_loop_"))
    cmd = [
        sys.executable,
        str(ROOT / "fcmae" / "pretrain.py"),
        "--data",
        data,
        "--model",
        args.model,
        "--input-size",
        str(args.size),
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(workers),
        "--backend",
        args.backend,
        "--mixed-precision",
        args.mixed_precision,
        "--max-steps",
        str(args.steps),
        "--log-every",
        str(args.log_every),
        "--save-every",
        str(10**9),
        "--recon-every",
        str(10**9),
        "--report-to",
        "none",
        "--warmup-steps",
        "1",
        "--output-dir",
        str(out),
    ]
    cmd += ["--compile"] * args.compile + ["--channels-last"] * args.channels_last
    try:
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
        logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"pretraining failed:\n{e.stderr[-3000:]}") from None
    finally:
        shutil.rmtree(out, ignore_errors=True)
    rates = [row["images_per_sec"] for row in logs[1:]]
    if not rates:
        raise SystemExit("--steps must span at least two log intervals (--log-every)")
    return statistics.median(rates), rates  # the median of the logged intervals


def step_rate(args) -> float:
    """images/s of the bare step (bench_pretrain.py, batch in memory), in its own process."""
    prec = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[args.mixed_precision]
    cfg = dict(
        model=args.model,
        size=args.size,
        precision=prec,
        channels_last=args.channels_last,
        compile=args.compile,
        backend=args.backend,
        batch_size=args.batch_size,
        warmup=3,
        iters=max(5, args.log_every),
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_pretrain.py"), "--one", json.dumps(cfg)],
        check=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_sec"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnextv2_atto")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backend", default="gather")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument(
        "--num-images",
        type=int,
        default=1024,
        help="JPEGs cut from the demo photos (default data, in a temporary folder)",
    )
    p.add_argument("--data", default=None, help="anything --data of pretraining takes, instead of the JPEGs")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pretrain_loop_<device>.json)")
    args = p.parse_args()

    info = machine()
    data = args.data or synthetic_folder(args.num_images)
    rows = []
    try:
        bare = step_rate(args)
        print(f"bare step (batch in memory): {bare:.1f} img/s")
        print(f"{'workers':>7s} {'loop img/s':>10s} {'of bare step':>12s}")
        for w in args.workers:
            rate, intervals = loop_rate(args, w, data)
            rows.append(dict(workers=w, images_per_sec=rate, intervals=intervals, efficiency=rate / bare))
            print(f"{w:7d} {rate:10.1f} {100 * rate / bare:11.1f}%", flush=True)
    finally:
        if not args.data:
            shutil.rmtree(data, ignore_errors=True)
    setting = (
        f"{args.model} {args.size} px, batch {args.batch_size}, {args.backend}, mixed precision "
        f"{args.mixed_precision}{', channels_last' if args.channels_last else ''}"
        f"{', compiled' if args.compile else ''}"
    )
    print(f"{info['device']} | torch {info['torch']} | {setting}")
    tag = "cuda" if "CPU" not in info["device"] else "cpu"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"pretrain_loop_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "setting": setting,
                "args": vars(args),
                "bare_step_images_per_sec": bare,
                "rows": rows,
                **stamp(),
            },
            indent=1,
        )
    )
    plot_by_workers(rows, out.with_suffix(".png"), f"{info['device']}\n{setting}", "images / s", bare)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
