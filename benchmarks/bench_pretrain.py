"""FCMAE pretraining-step benchmark: images/s and peak memory per backend, model, resolution,
precision, channels_last, torch.compile and activation checkpointing. Prints a table, saves JSON and
a PNG plot.

    python benchmarks/bench_pretrain.py                                   # CPU default: atto, 224, batch 16
    python benchmarks/bench_pretrain.py --models convnextv2_base --sizes 224 384 --precisions fp32 bf16 \
        --channels-last both --compile both --batch-size 64                # on a GPU
    python benchmarks/bench_pretrain.py --models convnextv2_huge --sizes 512 --precisions bf16 --backends gather \
        --grad-checkpointing both --batch-size 32                          # activation checkpointing's saving

A step is forward + backward + AdamW at mask ratio 0.6, each sample's mask drawn from its key
(``keys=arange(batch)``, as the training loop does). --grad-checkpointing recomputes each encoder
block's activations in the backward pass (``model.encoder.set_grad_checkpointing(True)``). The
minkowski backend has neither channels_last nor torch.compile: it runs once per model, size and
precision with both off, whatever those flags say, and never with --grad-checkpointing (its sparse
tensors cannot be recomputed). Each configuration runs in its own process (--in-process: all in
this one, for smoke runs), so CPU peak memory is that process's peak RSS above its level before the
first step (CUDA: torch.cuda.max_memory_allocated). "useful TFLOP/s" counts only the encoder's work on
visible sites plus the decoder: 2 FLOPs per multiply-add, 3 x forward for forward + backward, the
convention of the tensor-core peaks it is printed next to.
"""

from __future__ import annotations

import argparse
import functools
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

# Dense (no sparsity) tensor-core peaks, TFLOP/s, SXM parts: bf16/fp16, and fp32 (TF32 off, CUDA cores).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
}


def useful_flops(name: str, size: int, batch: int, ratio: float) -> float:
    """Forward multiply-adds of the visible-site encoder work plus the decoder, per batch."""
    return batch * _useful_flops_per_image(name, size, ratio)


@functools.cache
def _useful_flops_per_image(name: str, size: int, ratio: float) -> float:
    import torch
    from fvcore.nn import FlopCountAnalysis

    import fcmae

    model = fcmae.create_model(name, num_classes=0).eval()
    with torch.no_grad():
        enc = FlopCountAnalysis(model, torch.zeros(1, 3, size, size)).unsupported_ops_warnings(False)
        enc = enc.uncalled_modules_warnings(False).total()
    keep = int((size // 32) ** 2 * (1 - ratio)) / (size // 32) ** 2
    return enc * keep + _decoder_flops(fcmae.create_fcmae(name), size)


def _decoder_flops(fm, size: int) -> float:
    """Multiply-adds of the decoder per image, counted as fvcore counts the encoder: 1x1 projections,
    and per block the 7x7 depthwise conv, the 4x MLP and LayerNorm (5 per element)."""
    sites = (size // 32) ** 2
    d = fm.proj.out_channels
    per_site = fm.proj.in_channels * d + fm.pred.in_channels * fm.pred.out_channels
    per_site += len(fm.decoder) * (49 * d + 8 * d * d + 5 * d)
    return sites * per_site


def run_one(cfg: dict) -> dict:
    """Time one configuration in this process."""
    import torch

    import fcmae

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = fcmae.create_fcmae(cfg["model"], backend=cfg["backend"]).to(dev)
    if cfg.get("grad_checkpointing"):
        model.encoder.set_grad_checkpointing(True)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    fwd = torch.compile(model, backend=cfg.get("compile_backend", "inductor")) if cfg["compile"] else model
    imgs = torch.randn(cfg["batch_size"], 3, cfg["size"], cfg["size"], device=dev)
    keys = torch.arange(cfg["batch_size"], device=dev)  # per-sample masks, as the training loop draws them
    if cfg["channels_last"]:
        imgs = imgs.contiguous(memory_format=torch.channels_last)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg["precision"]]

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = fwd(imgs, keys=keys)[0]
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
    return {**cfg, "step_ms": med * 1e3, "images_per_sec": cfg["batch_size"] / med, "peak_mem_mib": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["convnextv2_atto"])
    p.add_argument("--sizes", nargs="+", type=int, default=[224])
    p.add_argument("--backends", nargs="+", default=["dense", "gather"])
    p.add_argument("--precisions", nargs="+", default=["fp32"])
    p.add_argument("--channels-last", choices=["off", "on", "both"], default="off")
    p.add_argument("--compile", choices=["off", "on", "both"], default="off")
    p.add_argument(
        "--grad-checkpointing",
        choices=["off", "on", "both"],
        default="off",
        help="recompute the encoder blocks' activations in the backward pass",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pretrain_step_<device>.json)")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile's backend (inductor; a smoke run: aot_eager, no code generation)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every configuration in this process instead of one process each (quicker to start, for smoke "
        "runs; CPU peak memory is then not per configuration)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when any configuration fails (after saving the rest)")
    p.add_argument(
        "--report",
        metavar="JSON",
        help="reprint the table and redraw the plot of a saved result (useful TFLOP/s recomputed), in place",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # child process: one configuration
        print(json.dumps(run_one(json.loads(args.one))))
        return
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        rows = [r | {"useful_tflops": useful_tflops(r)} for r in saved["rows"]]
        report(rows, saved["machine"], Path(args.report), {k: saved[k] for k in KEPT if k in saved})
        return
    info = machine()
    flag = {"off": [False], "on": [True], "both": [False, True]}
    rows, failed, seen = [], [], set()
    for model, size, prec, cl, comp, gc, backend in itertools.product(
        args.models,
        args.sizes,
        args.precisions,
        flag[args.channels_last],
        flag[args.compile],
        flag[args.grad_checkpointing],
        args.backends,
    ):
        if backend == "minkowski":  # sparse tensors: neither channels_last nor torch.compile applies
            cl = comp = False
            if gc:
                continue  # MinkowskiEngine's tensors cannot be recomputed by torch.utils.checkpoint
        cfg = dict(
            model=model,
            size=size,
            precision=prec,
            channels_last=cl,
            compile=comp,
            grad_checkpointing=gc,
            backend=backend,
            batch_size=args.batch_size,
            warmup=args.warmup,
            iters=args.iters,
        )
        if comp and args.compile_backend != "inductor":
            cfg["compile_backend"] = args.compile_backend
        if json.dumps(cfg) in seen:
            continue
        seen.add(json.dumps(cfg))
        row, err = run_config(__file__, cfg, run_one, args.in_process)
        if row is None:
            print(f"skipped {cfg}: {err}", file=sys.stderr)
            failed.append(cfg)
            continue
        row["useful_tflops"] = useful_tflops(row)
        rows.append(row)
        print(
            f"{model:16s} {size:4d} {prec:5s} cl={cl!s:5s} compile={comp!s:5s} ckpt={gc!s:5s} {backend:9s} "
            f"{row['step_ms']:9.1f} ms {row['images_per_sec']:8.1f} img/s {row['peak_mem_mib']:9.0f} MiB",
            flush=True,
        )
    tag = "cuda" if "CPU" not in info["device"] else "cpu"
    report(rows, info, Path(args.out or ROOT / "benchmarks" / "results" / f"pretrain_step_{tag}.json"), stamp())
    if failed and args.strict:
        raise SystemExit(f"{len(failed)} configuration(s) failed (above)")


def useful_tflops(row: dict) -> float:
    """2 FLOPs per multiply-add, x3 for forward + backward, per second of the measured step."""
    return 2 * 3 * useful_flops(row["model"], row["size"], row["batch_size"], 0.6) / (row["step_ms"] / 1e3) / 1e12


KEPT = ("date", "command", "provenance")  # what --report keeps of a saved file besides its rows and machine


def report(rows: list[dict], info: dict, out: Path, extra: dict) -> None:
    """Print the table, write JSON (rows, gather/dense summary, machine; ``extra``: date, command) and the PNG."""
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    peaks = next((v for k, v in PEAK_TFLOPS.items() if k in info["device"]), {})
    batches = sorted({r["batch_size"] for r in rows})
    print(
        f"\n{info['device']} | torch {info['torch']} | batch {'/'.join(map(str, batches))} | mask ratio 0.6 | "
        "fwd+bwd+AdamW"
    )
    print(
        f"{'model':16s} {'size':>4s} {'prec':5s} {'cl':>3s} {'comp':>4s} {'ckpt':>4s} | "
        + " | ".join(f"{b:>9s} img/s  MiB" for b in backends)
        + " | gather/dense speed, memory | gather useful TFLOP/s"
    )
    summary = []
    for key, group in itertools.groupby(rows, key=setting):
        by = {r["backend"]: r for r in group}
        line = (
            f"{key[0]:16s} {key[1]:4d} {key[2]:5s} "
            + " ".join(f"{'y' if k else 'n':>{w}s}" for k, w in zip(key[3:], (3, 4, 4)))
            + " | "
        )
        line += " | ".join(
            f"{by[b]['images_per_sec']:9.1f} {by[b]['peak_mem_mib']:9.0f}" if b in by else f"{'-':>20s}"
            for b in backends
        )
        if "dense" in by and "gather" in by:
            speed = by["gather"]["images_per_sec"] / by["dense"]["images_per_sec"]
            mem = by["gather"]["peak_mem_mib"] / max(by["dense"]["peak_mem_mib"], 1e-9)
            line += f" | {speed:5.2f}x, {mem:4.2f}x"
            names = ("model", "size", "precision", "channels_last", "compile", "grad_checkpointing")
            summary.append(dict(zip(names, key if key[5] else key[:5]), gather_speedup=speed, gather_memory_ratio=mem))
        if "gather" in by:
            peak = peaks.get(key[2])
            line += f" | {by['gather']['useful_tflops']:.3g}" + (f" of {peak:.0f} peak" if peak else "")
        print(line)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": info,
                "batch_size": batches[0] if len(batches) == 1 else batches,
                "mask_ratio": 0.6,
                "rows": rows,
                "summary": summary,
                **extra,
            },
            indent=1,
        )
    )
    plot(rows, out.with_suffix(".png"), info)
    print(f"saved {out} and {out.with_suffix('.png')}")


def setting(r: dict) -> tuple:
    """(model, size, precision, channels_last, compile, grad_checkpointing) of a row (files written
    before --grad-checkpointing have no such key: off)."""
    return (r["model"], r["size"], r["precision"], r["channels_last"], r["compile"], r.get("grad_checkpointing", False))


def plot(rows: list[dict], path: Path, info: dict) -> None:
    plt = pyplot()
    if plt is None or not rows:
        return
    labels = sorted({(r["model"].removeprefix("convnextv2_"), *setting(r)[1:]) for r in rows})
    backends = sorted({r["backend"] for r in rows})
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.5 * len(labels) * len(backends) + 2)), 4))
    width = 0.8 / len(backends)
    for i, b in enumerate(backends):
        vals = [
            next(
                (
                    r["images_per_sec"]
                    for r in rows
                    if r["backend"] == b and (r["model"].removeprefix("convnextv2_"), *setting(r)[1:]) == lab
                ),
                0,
            )
            for lab in labels
        ]
        ax.bar([j + i * width for j in range(len(labels))], vals, width, label=b)
    ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(
        [
            f"{m}/{s}/{p}" + ("/cl" if c else "") + ("/comp" if k else "") + ("/ckpt" if g else "")
            for m, s, p, c, k, g in labels
        ],
        rotation=20,
        fontsize=8,
    )
    ax.set_ylabel("images / s (fwd + bwd + AdamW)")
    ax.set_title(f"FCMAE pretraining step, mask ratio 0.6 - {info['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
