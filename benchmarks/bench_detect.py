"""Mask R-CNN detection training-step benchmark: images/s and peak memory per model, image size and
batch size, at the COCO recipe's shape (Mask R-CNN FPN, 80 classes + background, a few objects with
masks per image). Prints a table, saves JSON and a PNG plot.

    python benchmarks/bench_detect.py                       # CPU default: atto and tiny at 512 and 1024, batch 1
    python benchmarks/bench_detect.py --models convnextv2_base --sizes 1024 --precisions bf16 --batch-sizes 4 \
        --iters 10 --out benchmarks/results/detect_step_cuda.json           # on a GPU (the LSJ 3x recipe's shape)

A step is what finetune/detect.py runs per optimizer step: torchvision's Mask R-CNN forward in
training mode (RPN, RoI heads, mask head and their losses) on S x S images, the sum of its loss
dict, backward, AdamW with the layer-wise decay groups. Images are random; each holds 8 boxes of
random size with their box-filling masks. The median of the timed steps is reported after warm-up
steps (1024 px on a CPU is slow: pass --iters 2). Each configuration runs in its own process
(--in-process: all in this one, for smoke runs), so CPU peak memory is that process's peak RSS above
its level before the first step (CUDA: torch.cuda.max_memory_allocated).
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


def targets(b: int, s: int, objects: int, num_classes: int, dev, g) -> list[dict]:
    """``objects`` boxes per image (16 px to 30 % of the side) with the masks filling them."""
    import torch

    out = []
    for _ in range(b):
        xy = torch.rand(objects, 2, generator=g) * s * 0.7
        wh = 16 + torch.rand(objects, 2, generator=g) * s * 0.3
        boxes = torch.cat([xy, (xy + wh).clamp(max=s - 1)], 1).round()
        masks = torch.zeros(objects, s, s, dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        labels = torch.randint(1, num_classes, (objects,), generator=g)
        out.append({"boxes": boxes.to(dev), "labels": labels.to(dev), "masks": masks.to(dev)})
    return out


def run_one(cfg: dict) -> dict:
    """Time one configuration in this process."""
    import torch

    from fcmae.tasks.detect import model as dm
    from fcmae.training.optim import param_groups

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s, b = cfg["size"], cfg["batch_size"]
    net = (
        dm.build_detector(
            cfg["model"], cfg["num_classes"], s, masks=True, box_batch_size_per_image=cfg.get("rois_per_image", 512)
        )
        .to(dev)
        .train()
    )
    opt = torch.optim.AdamW(param_groups(net, 0.05, dm.lr_scale(net, 0.95, "layer_wise")), lr=1e-4)
    imgs = [torch.rand(3, s, s, generator=g).to(dev) for _ in range(b)]
    tgts = targets(b, s, cfg["objects"], cfg["num_classes"], dev, g)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["precision"]]

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = sum(net(imgs, tgts).values())
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
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    p.add_argument("--precisions", nargs="+", default=["fp32"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--num-classes", type=int, default=81, help="with the background (COCO: 80 + 1)")
    p.add_argument("--objects", type=int, default=8, help="boxes with masks per image")
    p.add_argument(
        "--rois-per-image",
        type=int,
        default=512,
        help="RoIs sampled per image for the box and mask "
        "heads (the recipe's 512; fewer for a smoke run: the mask head's cost grows with them)",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/detect_step_<device>.json)")
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
    for model, size, prec, batch in itertools.product(args.models, args.sizes, args.precisions, args.batch_sizes):
        cfg = dict(
            model=model,
            size=size,
            precision=prec,
            batch_size=batch,
            num_classes=args.num_classes,
            objects=args.objects,
            rois_per_image=args.rois_per_image,
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
            f"{model:16s} {size:4d} {prec:5s} batch {batch:3d} {r['step_ms']:10.1f} ms "
            f"{r['images_per_sec']:8.3f} img/s {r['peak_mem_mib']:9.0f} MiB",
            flush=True,
        )
    tag = "cuda" if "CPU" not in info["device"] else "cpu"
    report(rows, info, Path(args.out or ROOT / "benchmarks" / "results" / f"detect_step_{tag}.json"), stamp())
    if failed and args.strict:
        raise SystemExit(f"{len(failed)} configuration(s) failed (above)")


KEPT = ("date", "command", "provenance")  # what --report keeps of a saved file besides its rows and machine


def report(rows: list[dict], info: dict, out: Path, extra: dict) -> None:
    """Print the table, write JSON (rows, machine) and the PNG. The fastest step is printed beside the
    median: on a shared machine it is the closest to the uncontended cost."""
    print(
        f"\n{info['device']} | torch {info['torch']} | {info['threads']} threads | load "
        f"{info['load_avg_1m_at_start']:.1f} at start | Mask R-CNN FPN, 81 classes | fwd+bwd+AdamW"
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
    labels = [f"{r['model'].removeprefix('convnextv2_')}/{r['size']}/{r['precision']}/b{r['batch_size']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4))
    at = list(range(len(rows)))
    for shift, name, values in (
        (-0.2, "median step", [r["images_per_sec"] for r in rows]),
        (0.2, "fastest step", [r["batch_size"] / min(r["step_ms_all"]) * 1e3 for r in rows]),
    ):
        ax.bar_label(ax.bar([i + shift for i in at], values, 0.4, label=name), fmt="%.3g", fontsize=8)
    ax.set_xticks(at, labels, fontsize=8)
    ax.set_ylabel("images / s (fwd + bwd + AdamW)")
    ax.set_title(
        f"Mask R-CNN detection training step\n{info['device']}, {info['threads']} threads, "
        f"load {info['load_avg_1m_at_start']:.1f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
