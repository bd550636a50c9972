"""Dense ConvNeXt speed: fcmae's model against timm's, same weights, same input.

Usage:
    python benchmarks/bench_dense.py                                   # atto and tiny, 224 px, batch 16
    python benchmarks/bench_dense.py --models convnextv2_base --batch 64 --bf16 --channels-last --compile

Times a training step (forward, cross-entropy, backward, AdamW step) and inference (no_grad
forward). Ours and timm's alternate iteration by iteration, so drift in machine load hits both
alike; the figure is the median (the minimum is reported too: on a loaded machine it is the
steadier estimate; on a shared CPU, ``--threads 1 --clock cpu`` times process CPU seconds, which
other processes do not inflate). timm's weights are loaded into ours with ``load_checkpoint`` and
the logits compared before timing. Prints a table and writes
benchmarks/results/dense_vs_timm_<device>.json with the machine's description.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import fcmae
from fcmae.weights import load_checkpoint

RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(RESULTS.parent))

from common import machine, pyplot, stamp  # noqa: E402


def build_pair(name: str, size: int, batch: int, device: torch.device, channels_last: bool, compile: bool):
    """timm's model and ours with timm's (perturbed, so GRN is active) weights; checks they agree."""
    theirs = timm.create_model(name)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.01))
    ours = fcmae.create_model(name)
    load_checkpoint(ours, theirs.state_dict())
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        err = (ours.eval()(x[:2]) - theirs.eval()(x[:2])).abs().max() / theirs(x[:2]).abs().max()
    assert err < 1e-4, f"{name}: ours and timm's disagree (relative error {err:.2e}); the timing would be moot"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(device, memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    models = {}
    for label, model in (("fcmae", ours), ("timm", theirs)):
        model = model.to(device, memory_format=fmt)
        models[label] = (model, torch.compile(model) if compile else model)
    return models, x, y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, args, device: torch.device) -> list[dict]:
    models, x, y = build_pair(name, args.size, args.batch, device, args.channels_last, args.compile)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _) in models.items()}

    def train_step(label):
        model, run = models[label]
        model.train()
        with autocast:
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        optims[label].step()
        optims[label].zero_grad(set_to_none=True)

    def infer(label):
        model, run = models[label]
        model.eval()
        with torch.no_grad(), autocast:
            run(x)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    rows = []
    for mode, step in (("train", train_step), ("infer", infer)):
        times = {k: [] for k in models}
        for i in range(args.warmup + args.iters):
            for label in ("fcmae", "timm") if i % 2 == 0 else ("timm", "fcmae"):  # alternate who goes first
                sync(device)
                t0 = clock()
                step(label)
                sync(device)
                if i >= args.warmup:
                    times[label].append(clock() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        row = dict(
            model=name,
            mode=mode,
            size=args.size,
            batch=args.batch,
            fcmae_img_s=args.batch / med["fcmae"],
            timm_img_s=args.batch / med["timm"],
            fcmae_ms=1e3 * med["fcmae"],
            timm_ms=1e3 * med["timm"],
            fcmae_ms_min=1e3 * best["fcmae"],
            timm_ms_min=1e3 * best["timm"],
            fcmae_ms_all=[round(1e3 * t, 2) for t in times["fcmae"]],
            timm_ms_all=[round(1e3 * t, 2) for t in times["timm"]],
        )
        row["speedup"] = row["fcmae_img_s"] / row["timm_img_s"]
        row["speedup_min"] = best["timm"] / best["fcmae"]
        rows.append(row)
        print(
            f"{name:18s} {mode:6s} {row['fcmae_img_s']:10.1f} {row['timm_img_s']:10.1f} {row['speedup']:8.3f} "
            f"{row['fcmae_ms_min']:10.1f} {row['timm_ms_min']:10.1f} {row['speedup_min']:8.3f}",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="convnextv2_atto,convnextv2_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time, for a loaded machine (use with --threads 1)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/dense_vs_timm_<device>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu only makes sense on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = machine(str(device)) | {"timm": timm.__version__}
    print(json.dumps(info))
    print(f"{'':25s} {'median':^30s} {'minimum':^30s}")
    print(
        f"{'model':18s} {'mode':6s} {'fcmae im/s':>10s} {'timm im/s':>10s} {'speedup':>8s} "
        f"{'fcmae ms':>10s} {'timm ms':>10s} {'speedup':>8s}"
    )
    rows = [r for name in args.models.split(",") for r in bench(name, args, device)]
    out = Path(args.out or RESULTS / f"dense_vs_timm_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    info["load_avg_1m_at_end"] = os.getloadavg()[0]  # other work on the machine skews both columns
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps(dict(machine=info, settings=settings, results=rows, **stamp()), indent=1) + "\n")
    plot(rows, out.with_suffix(".png"), info, settings)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(rows: list[dict], path: Path, info: dict, settings: dict) -> None:
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{r['model'].removeprefix('convnextv2_')}\n{r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.5))
    for i, (key, name) in enumerate((("fcmae_img_s", "fcmae"), ("timm_img_s", "timm"))):
        ax.bar([j + 0.4 * i for j in range(len(rows))], [r[key] for r in rows], 0.4, label=name)
    ax.set_xticks([j + 0.2 for j in range(len(rows))])
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("images / s (median)")
    flags = [k for k in ("bf16", "channels_last", "compile") if settings.get(k)]
    ax.set_title(f"{info['device']}, {settings['size']} px, batch {settings['batch']} {' '.join(flags)}", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
