"""UPerNet segmentation training-step benchmark: images/s and peak memory per model, precision and
batch size, at the ADE20K recipe's shape (512 px crops, 150 classes, UPerHead 512 channels, auxiliary
head). Prints a table, saves JSON and a PNG plot.

    python benchmarks/bench_segment.py                                    # CPU default: atto and tiny, batch 2
    python benchmarks/bench_segment.py --models convnextv2_base convnextv2_large --precisions bf16 \
        --batch-sizes 2 8 --channels-last --out benchmarks/results/segment_step_cuda.json   # on a GPU

A step is what finetune/segment.py runs per optimizer step: forward of backbone, UPerHead and auxiliary
head, mmseg's loss (cross-entropy + 0.4 x auxiliary, 255 ignored), backward, AdamW with the stage-wise
layer-decay groups; random images and labels (10 % ignored). The median of the timed steps is reported
after warm-up steps. Each configuration runs in its own process (--in-process: all in this one, for
smoke runs), so CPU peak memory is that process's peak RSS above its level before the first step
(CUDA: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, pyplot, run_config, stamp  # noqa: E402


def run_one(cfg: dict) -> dict:
    """Time one configuration in this process."""
    import torch

    from fcmae.tasks.segment import model as sm
    from fcmae.training.optim import param_groups

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = sm.build_segmenter(cfg["model"], cfg["num_classes"], cfg["head_channels"]).to(dev).train()
    if cfg["channels_last"]:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(net, 0.05, sm.lr_scale(net, 0.9, "stage")), lr=1e-4)
    b, s = cfg["batch_size"], cfg["size"]
    imgs = torch.randn(b, 3, s, s, device=dev)
    if cfg["channels_last"]:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, cfg["num_classes"], (b, s, s), device=dev)
    labels[torch.rand(labels.shape, device=dev) < 0.1] = 255
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["precision"]]

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = sm.train_loss(net, net, imgs, labels, 0.4)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(cfg["warmup"]):
        step()
    sync()
    times = []
    for _ in range(cfg["iters"]):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    med = statistics.median(times)
    return {
        **cfg,
        "step_ms": med * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "images_per_sec": b / med,
        "peak_mem_mib": peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["convnextv2_atto", "convnextv2_tiny"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--precisions", nargs="+", default=["fp32"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[2])
    p.add_argument("--head-channels", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=150)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/segment_step_<device>.json)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every configuration in this process instead of one process each (quicker to start, for smoke "
        "runs; CPU peak memory is then not per configuration)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when any configuration fails (after saving the rest)")
    p.add_argument("--report", metavar="JSON", help="reprint the table and redraw the plot of a saved result, in place")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # child process: one configuration
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        report(saved["rows"], saved["machine"], Path(args.report), {k: saved[k] for k in KEPT if k in saved})
        return
    info = machine()
    rows, failed = [], []
    for model, prec, batch in itertools.product(args.models, args.precisions, args.batch_sizes):
        cfg = dict(
            model=model,
            size=args.size,
            precision=prec,
            batch_size=batch,
            head_channels=args.head_channels,
            num_classes=args.num_classes,
            channels_last=args.channels_last,
            warmup=args.warmup,
            iters=args.iters,
        )
        r, err = run_config(__file__, cfg, run_one, args.in_process)
        if r is None:
            print(f"skipped {cfg}: {err}", file=sys.stderr)
            failed.append(cfg)
            continue
        rows.append(r)
        print(
            f"{model:16s} {args.size:4d} {prec:5s} batch {batch:3d} {r['step_ms']:10.1f} ms "
            f"{r['images_per_sec']:8.2f} img/s {r['peak_mem_mib']:9.0f} MiB",
            flush=True,
        )
    tag = "cuda" if "CPU" not in info["device"] else "cpu"
    report(rows, info, Path(args.out or ROOT / "benchmarks" / "results" / f"segment_step_{tag}.json"), stamp())
    if failed and args.strict:
        raise SystemExit(f"{len(failed)} configuration(s) failed (above)")


KEPT = ("date", "command", "provenance")  # what --report keeps of a saved file besides its rows and machine


def report(rows: list[dict], info: dict, out: Path, extra: dict) -> None:
    """Print the table, write JSON (rows, machine) and the PNG. The fastest step is printed beside the
    median: on a shared machine it is the closest to the uncontended cost."""
    head = "/".join(sorted({str(r.get("head_channels", 512)) for r in rows})) or "512"
    classes = "/".join(sorted({str(r.get("num_classes", 150)) for r in rows})) or "150"
    print(
        f"\n{info['device']} | torch {info['torch']} | {info['threads']} threads | load "
        f"{info['load_avg_1m_at_start']:.1f} at start | UperNet (head {head}, aux head), {classes} classes | "
        "fwd+bwd+AdamW"
    )
    print(
        f"{'model':16s} {'size':>4s} {'prec':5s} {'batch':>5s} | {'median ms':>10s} {'img/s':>8s} | "
        f"{'fastest ms':>10s} {'img/s':>8s} | {'peak MiB':>9s}"
    )
    for r in rows:
        fastest = min(r["step_ms_all"])
        print(
            f"{r['model']:16s} {r['size']:4d} {r['precision']:5s} {r['batch_size']:5d} | {r['step_ms']:10.1f} "
            f"{r['images_per_sec']:8.3f} | {fastest:10.1f} {r['batch_size'] / fastest * 1e3:8.3f} | "
            f"{r['peak_mem_mib']:9.0f}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "rows": rows, **extra}, indent=1))
    plot(rows, out.with_suffix(".png"), info)
    print(f"saved {out} and {out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path, info: dict) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    labels = [f"{r['model'].removeprefix('convnextv2_')}/{r['precision']}/b{r['batch_size']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows) + 2), 4))
    at = list(range(len(rows)))
    for shift, name, values in (
        (-0.2, "median step", [r["images_per_sec"] for r in rows]),
        (0.2, "fastest step", [r["batch_size"] / min(r["step_ms_all"]) * 1e3 for r in rows]),
    ):
        ax.bar_label(ax.bar([i + shift for i in at], values, 0.4, label=name), fmt="%.3g", fontsize=8)
    ax.set_xticks(at, labels)
    ax.set_ylabel("images / s (fwd + bwd + AdamW)")
    ax.set_title(
        f"UperNet segmentation training step at {rows[0]['size']} px\n{info['device']}, "
        f"{info['threads']} threads, load {info['load_avg_1m_at_start']:.1f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
