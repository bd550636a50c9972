"""Write every table of measured figures in the README and the docs from benchmarks/results/*.json.

    python benchmarks/make_tables.py            # rewrite the tables in place
    python benchmarks/make_tables.py --check    # exit 1, naming each stale table (CI, pre-commit)

A table lives between two marker comments in a Markdown file:

    <!-- table:NAME -->
    ...written by this script...
    <!-- /table:NAME -->

NAME is one of ``TABLES`` below; each reads one or more results files and writes the table plus a
line naming, for every file it read, the machine (CPU model and cores, GPU), the versions, the date
and the command that file records. Timings are medians (of the timed steps, intervals or runs a file
holds), never the best. A fact a file does not record is written as "not recorded". ``--check`` also
fails on a marker with an unknown NAME, an unclosed marker, and a relative link in README.md or docs/
that points at nothing. Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
MARKER = re.compile(r"<!-- table:(?P<name>[a-z0-9_]+) -->\n(?P<body>.*?)<!-- /table:(?P=name) -->", re.DOTALL)
OPEN = re.compile(r"<!-- table:([a-z0-9_]+) -->")
LINK = re.compile(r"\]\(([^)\s]+)\)")


# ----------------------------------------------------------------------------------------- reading files
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def short(model: str) -> str:
    return model.replace("convnextv2_", "")


def machine_text(d: dict) -> str:
    """'2-core AMD EPYC CPU, no GPU' from what a file records."""
    m = d.get("machine", {})
    gpu = m.get("gpu")
    dev = m.get("device", "")
    if dev and not dev.startswith("CPU"):  # a GPU run: the device is the GPU's name
        return f"{dev} GPU" + (f", CUDA {m['cuda']}" if m.get("cuda") else "")
    cpu = m.get("cpu") or (re.sub(r"\s*\(\d+ cores\)$", "", dev[5:]) if dev.startswith("CPU: ") else None)
    cores = m.get("cores") or m.get("cpu_count")
    if cpu is None:
        return "machine not recorded"
    cpu = re.sub(r"\s+Processor$", "", cpu.replace("(R)", "").replace("  ", " ").strip())
    text = f"{cores}-core {cpu} CPU" if cores else f"{cpu} CPU (cores not recorded)"
    return text + (", no GPU" if gpu == "none" else f", GPU {gpu}" if gpu else ", GPU not recorded")


def versions_text(d: dict) -> str:
    v = {**{k: d.get("machine", {}).get(k) for k in ("torch", "timm", "python")}, **d.get("versions", {})}
    parts = [f"{k} {v[k]}" for k in ("torch", "timm", "python") if v.get(k)]
    return ", ".join(parts) if parts else "versions not recorded"


def date_text(d: dict) -> str:
    date = d.get("date")
    if not date:
        return "date not recorded"
    from_git = "author date of commit" in d.get("provenance", "")
    return date[:10] + (" (commit date, from git)" if from_git else "")


def source_line(names: list[str], fmt: str) -> str:
    """One line per results file: where the figures come from, on what, when and how."""
    lines = []
    for name in names:
        d = load(name)
        where = (
            f"[`benchmarks/results/{name}`](benchmarks/results/{name})"
            if fmt == "readme"
            else f"`benchmarks/results/{name}`"
        )
        cmd = f"`{d['command']}`" if d.get("command") else "command not recorded"
        lines.append(f"Source: {where}: {machine_text(d)}; {versions_text(d)}; {date_text(d)}; {cmd}.")
    return "\n".join(lines)


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def steps(d: dict) -> dict:
    """{(model, size, precision, channels_last, compile, batch): {backend: row}} of a bench_pretrain file."""
    out: dict = {}
    for r in d["rows"]:
        key = (
            r["model"],
            r["size"],
            r["precision"],
            r["channels_last"],
            r["compile"],
            r["batch_size"],
            r.get("grad_checkpointing", False),
        )
        out.setdefault(key, {})[r["backend"]] = r
    return out


def ratio(g: dict, d: dict) -> tuple[float, float]:
    return g["images_per_sec"] / d["images_per_sec"], g["peak_mem_mib"] / d["peak_mem_mib"]


PRETRAIN_SIZES = [
    "pretrain_step_cpu.json",
    "pretrain_step_cpu_small_models.json",
    "pretrain_step_cpu_tiny.json",
    "pretrain_step_cpu_large_models.json",
    "pretrain_step_cpu_huge.json",
]
PRETRAIN_ALL = [*PRETRAIN_SIZES, "pretrain_step_cpu_matrix.json", "pretrain_step_cpu_resolution.json"]


def fastest_step() -> tuple[float, str]:
    """The highest images/s of any CPU pretraining step measured (a median per configuration)."""
    best = (0.0, "")
    for name in PRETRAIN_ALL:
        for r in load(name)["rows"]:
            if r["images_per_sec"] > best[0]:
                what = (
                    f"{short(r['model'])} {r['size']} px {r['precision']}"
                    + (" channels_last" if r["channels_last"] else "")
                    + (" compiled" if r["compile"] else "")
                    + f", {r['backend']}"
                )
                best = (r["images_per_sec"], f"{what}, `{name}`")
    return best


def loop_rows(d: dict) -> list[tuple[int, float, float]]:
    """(workers, median images/s over the logged intervals, fraction of the bare step)."""
    bare = d["bare_step_images_per_sec"]
    return [
        (r["workers"], statistics.median(r["intervals"]), statistics.median(r["intervals"]) / bare) for r in d["rows"]
    ]


def seconds(ms: float) -> str:
    return f"{ms / 1000:.1f} s"


def minutes(s: float) -> str:
    return f"{int(s // 60)} min {round(s % 60):02d} s"


# ------------------------------------------------------------------------------------------------ tables
def measured_on(names: list[str]) -> str:
    """'2-core AMD EPYC, 2026-11-21' for the files of one row (with the load average when it was high)."""
    parts = []
    for name in names:
        d = load(name)
        text = (
            machine_text(d).replace(" CPU, no GPU", "").replace(" CPU", "") + ", " + (d.get("date") or "no date")[:10]
        )
        load_avg = d.get("machine", {}).get("load_avg_1m_at_start")
        text += f", load {load_avg:.1f}" if load_avg and load_avg > 2 else ""
        parts.append(text)
    return "; ".join(dict.fromkeys(parts))


def t_readme_results(fmt: str) -> str:
    def link(name: str, label: str | None = None) -> str:
        label = label or name
        return f"[{label}](benchmarks/results/{name})" if fmt == "readme" else f"`{name}`"

    rows = []

    def row(what: str, setting: str, result: str, names: list[str], labels: list[str] | None = None) -> None:
        sources = ", ".join(link(n, lab) for n, lab in zip(names, labels or [None] * len(names), strict=True))
        rows.append([what, setting, result, measured_on(names), sources])

    ((_, by),) = steps(load("pretrain_step_cpu.json")).items()
    s, m = ratio(by["gather"], by["dense"])
    row(
        "pretraining step (fwd + bwd + AdamW)",
        "atto, 224 px, batch 16, fp32",
        f"dense {by['dense']['images_per_sec']:.1f} img/s; gather {by['gather']['images_per_sec']:.1f} img/s "
        f"(**{s:.2f}x**) at {m:.2f}x the memory",
        ["pretrain_step_cpu.json"],
    )
    pairs = [(k, b) for k, b in steps(load("pretrain_step_cpu_matrix.json")).items() if "dense" in b and "gather" in b]
    k, b = max(pairs, key=lambda kb: kb[1]["gather"]["images_per_sec"])
    speeds = [ratio(b["gather"], b["dense"])[0] for _, b in pairs]
    row(
        "same, fp32/bf16 x channels_last x compile",
        "atto, 224 px, batch 16",
        f"gather {min(speeds):.2f}x-{max(speeds):.2f}x dense; fastest: {k[2]} + channels_last + compile, gather "
        f"{b['gather']['images_per_sec']:.1f} img/s",
        ["pretrain_step_cpu_matrix.json"],
    )
    names = PRETRAIN_SIZES[1:]
    speeds = [ratio(b["gather"], b["dense"])[0] for n in names for b in steps(load(n)).values()]
    row(
        "same, every size femto..huge",
        "224 px, fp32",
        f"gather {min(speeds):.2f}x-{max(speeds):.2f}x dense",
        names,
        [n.split("_cpu_")[1][:-5] for n in names],
    )
    w, ips, frac = max(loop_rows(load("pretrain_loop_cpu.json")), key=lambda r: r[1])
    row(
        "whole pretraining loop, JPEG folder",
        f"atto, 224 px, gather, {w} worker" + ("s" if w != 1 else ""),
        f"{ips:.1f} img/s, {frac * 100:.0f} % of the bare step",
        ["pretrain_loop_cpu.json"],
    )
    d = load("stream_cpu.json")
    a, res = d["amplification"], {(r["kind"], r["at"]): r for r in d["resume"]}
    row(
        "sharded streaming: bytes read / shard bytes",
        "2 processes x 2 workers; resume at 90 %",
        f"{a['stream']['amplification']:.2f}x (before: {a['legacy']['amplification']:.2f}x); resume "
        f"{res[('stream', 0.9)]['read_fraction']:.2f}x (before: {res[('legacy', 0.9)]['read_fraction']:.2f}x)",
        ["stream_cpu.json"],
    )
    d = load("segment_step_cpu.json")
    row(
        "UPerNet segmentation step, median",
        "512 px, batch 2, fp32",
        "; ".join(f"{short(r['model'])} {seconds(r['step_ms'])}" for r in d["rows"]),
        ["segment_step_cpu.json"],
    )
    d = load("detect_step_cpu.json")
    row(
        "Mask R-CNN step, median",
        "batch 1, fp32",
        "; ".join(f"{short(r['model'])} {r['size']} px {seconds(r['step_ms'])}" for r in d["rows"]),
        ["detect_step_cpu.json"],
    )
    d = load("demo_cpu.json")
    row(
        "README command 1 (the demo)",
        f"atto, {d['settings']['input_size']} px, {d['steps']} steps of batch {d['settings']['batch_size']}",
        f"{minutes(d['wall_seconds'])}; loss {d['loss_first']['loss']:.3f} (step {d['loss_first']['step']}) -> "
        f"{d['loss_last']['loss']:.3f} (step {d['loss_last']['step']})",
        ["demo_cpu.json"],
    )
    d = load("finetune_experiment.json")
    f, sc = d["table"]["fcmae"]["1"], d["table"]["scratch"]["1"]
    row(
        "low-label fine-tuning (digits)",
        f"1 % of the labels ({d['labelled_images']['1']} images), 3 seeds",
        f"FCMAE {f['mean']:.1f} ± {f['std']:.1f} vs scratch {sc['mean']:.1f} ± {sc['std']:.1f} top-1 (%)",
        ["finetune_experiment.json"],
    )
    return (
        table(["what", "setting", "result", "measured on (CPU, date, load)", "source"], rows)
        + "\n\nNo GPU on any of these machines; the load is the 1-minute load average at the start, shown when "
        "the 2 cores were shared. Dates marked in the files as taken from git are the commit dates."
    )


def t_pretrain_sizes(fmt: str) -> str:
    rows = []
    for name in PRETRAIN_SIZES:
        for key, by in steps(load(name)).items():
            s, m = ratio(by["gather"], by["dense"])
            mk = by.get("minkowski")
            rows.append(
                [
                    short(key[0]),
                    key[5],
                    f"{by['dense']['images_per_sec']:.2f}, {by['dense']['peak_mem_mib']:.0f}",
                    f"{by['gather']['images_per_sec']:.2f}, {by['gather']['peak_mem_mib']:.0f}",
                    f"**{s:.2f}x**, {m:.2f}x",
                    f"{mk['images_per_sec']:.2f}, {mk['peak_mem_mib']:.0f}" if mk else "",
                    f"{by['dense']['iters']} after {by['dense']['warmup']}",
                ]
            )
    return (
        table(
            [
                "model",
                "batch",
                "dense img/s, MiB",
                "gather img/s, MiB",
                "gather / dense: speed, memory",
                "minkowski img/s, MiB",
                "timed steps (median)",
            ],
            rows,
        )
        + "\n\n"
        + source_line(PRETRAIN_SIZES, fmt)
    )


def t_pretrain_matrix(fmt: str) -> str:
    d = load("pretrain_step_cpu_matrix.json")
    rows = []
    for key, by in steps(d).items():
        s, m = ratio(by["gather"], by["dense"])
        mk = by.get("minkowski")
        rows.append(
            [
                key[2],
                "yes" if key[3] else "no",
                "yes" if key[4] else "no",
                f"{by['dense']['images_per_sec']:.1f}, {by['dense']['peak_mem_mib']:.0f}",
                f"{by['gather']['images_per_sec']:.1f}, {by['gather']['peak_mem_mib']:.0f}",
                f"{s:.2f}x, {m:.2f}x",
                f"{mk['images_per_sec']:.1f}, {mk['peak_mem_mib']:.0f}" if mk else "",
            ]
        )
    return (
        table(
            [
                "precision",
                "channels_last",
                "compile",
                "dense img/s, MiB",
                "gather img/s, MiB",
                "gather / dense",
                "minkowski img/s, MiB",
            ],
            rows,
        )
        + "\n\n"
        + source_line(["pretrain_step_cpu_matrix.json"], fmt)
    )


def t_pretrain_resolution(fmt: str) -> str:
    d = load("pretrain_step_cpu_resolution.json")
    rows = []
    for key, by in steps(d).items():
        s, m = ratio(by["gather"], by["dense"])
        rows.append(
            [
                key[1],
                key[2],
                f"{by['dense']['images_per_sec']:.2f}, {by['dense']['peak_mem_mib']:.0f}",
                f"{by['gather']['images_per_sec']:.2f}, {by['gather']['peak_mem_mib']:.0f}",
                f"{s:.2f}x, {m:.2f}x",
            ]
        )
    return (
        table(["size", "precision", "dense img/s, MiB", "gather img/s, MiB", "gather / dense"], rows)
        + "\n\n"
        + source_line(["pretrain_step_cpu_resolution.json"], fmt)
    )


def t_pretrain_loop(fmt: str) -> str:
    d = load("pretrain_loop_cpu.json")
    rows = [[w, f"{ips:.1f}", f"{frac * 100:.0f} %"] for w, ips, frac in loop_rows(d)]
    return (
        table(["--num-workers", "loop img/s (median of the logged intervals)", "of the bare step"], rows)
        + f"\n\nBare step, batch in memory: {d['bare_step_images_per_sec']:.1f} img/s ({d['setting']}, "
        f"{d['args']['steps']} steps, logged every {d['args']['log_every']}; the first interval is left out).\n\n"
        + source_line(["pretrain_loop_cpu.json"], fmt)
    )


def t_dense_vs_timm(fmt: str) -> str:
    d = load("dense_vs_timm_cpu.json")
    rows = [
        [short(r["model"]), r["mode"], f"{r['fcmae_img_s']:.1f}", f"{r['timm_img_s']:.1f}", f"{r['speedup']:.2f}x"]
        for r in d["results"]
    ]
    st = d["settings"]
    return (
        table(["model", "step", "fcmae img/s", "timm img/s", "fcmae / timm"], rows)
        + f"\n\nMedian of {st['iters']} timed steps after {st['warmup']}, {st['size']} px, batch {st['batch']}, "
        "the same weights in both models.\n\n" + source_line(["dense_vs_timm_cpu.json"], fmt)
    )


def t_data_loading(fmt: str) -> str:
    d = load("data_loading_cpu.json")
    rows = [[r["workers"], f"{r['images_per_sec']:.0f}", f"{r['per_worker']:.0f}"] for r in d["rows"]]
    per_worker = min(r["per_worker"] for r in d["rows"] if r["workers"] >= 1)
    fast, what = fastest_step()
    return (
        table(["workers", "img/s", "per worker"], rows)
        + f"\n\n{d['data']}, {d['input_size']} px, batch {d['batch_size']}; one timed pass per row. "
        f"The slowest worker rate, {per_worker:.0f} img/s, is {per_worker / fast:.1f} times the fastest CPU "
        f"pretraining step measured ({fast:.1f} img/s: {what}): on this CPU one worker keeps up with every "
        "step.\n\n" + source_line(["data_loading_cpu.json"], fmt)
    )


def t_listing(fmt: str) -> str:
    d = load("listing_cpu.json")
    rows = [
        [
            f"{r['files']:,}",
            f"{r['listing_s']:.2f} s",
            f"{r['first_batch_s']:.2f} s",
            f"{r['old_listing_s']:.1f} s" if r.get("old_listing_s") is not None else "",
        ]
        for r in d["rows"]
    ]
    f = d["fits"]
    return (
        table(["files", "listing", "to the first batch", "old listing (glob per pattern)"], rows)
        + f"\n\n{d['classes']} class folders, batch {d['batch_size']}, {d['input_size']} px; one run per size. "
        f"A straight-line fit extrapolates to about {f['listing_s']['at_imagenet_s']:.0f} s of listing and "
        f"{f['first_batch_s']['at_imagenet_s']:.0f} s to the first batch for ImageNet's 1.28M files.\n\n"
        + source_line(["listing_cpu.json"], fmt)
    )


def t_stream(fmt: str) -> str:
    d = load("stream_cpu.json")
    thr = [
        [
            r["kind"],
            r["workers"],
            f"{statistics.median(r['images_per_sec_runs']):.0f}",
            ", ".join(f"{x:.0f}" for x in r["images_per_sec_runs"]),
        ]
        for r in d["throughput"]
    ]
    a = d["amplification"]
    amp = [
        [k, f"{v['amplification']:.2f}x", f"{v['counted_amplification']:.2f}x" if v.get("counted_bytes") else ""]
        for k, v in a.items()
    ]
    res = [
        [r["kind"], f"{r['at']:.0%}", f"{r['read_fraction']:.2f}x", f"{r['time_fraction']:.2f}x"] for r in d["resume"]
    ]
    return (
        "Throughput, one process (`folder`: map-style JPEG folder; `stream`: fcmae's sharded stream; "
        "`legacy`: the previous streaming, datasets' stream split by example):\n\n"
        + table(["loader", "workers", "img/s (median of runs)", "runs"], thr)
        + f"\n\nBytes read over one epoch, 2 processes x {d['workers']} workers, as a multiple of the shard "
        "bytes (strace; fcmae's own read counter beside it):\n\n"
        + table(["loader", "strace", "counted"], amp)
        + "\n\nResuming mid-epoch: shard bytes read and seconds for the rest of the epoch, as a multiple of a "
        "full epoch's:\n\n"
        + table(["loader", "resumed at", "bytes", "time"], res)
        + f"\n\n{d['images']} JPEGs in {d['shards']} parquet shards, batch {d['batch_size']}, window "
        f"{d['window']}, {d['input_size']} px.\n\n" + source_line(["stream_cpu.json"], fmt)
    )


def _step_table(name: str, fmt: str, extra: list[str]) -> str:
    d = load(name)
    rows = []
    for r in d["rows"]:
        rows.append(
            [
                short(r["model"]),
                r["size"],
                r["batch_size"],
                r["precision"],
                seconds(r["step_ms"]),
                f"{r['images_per_sec']:.3f}",
                f"{r['peak_mem_mib']:.0f}",
                ", ".join(seconds(x) for x in r["step_ms_all"]),
                *[r.get(k, "") for k in extra],
            ]
        )
    load_avg = d["machine"].get("load_avg_1m_at_start")
    return (
        table(
            ["model", "px", "batch", "precision", "median step", "img/s", "peak MiB", "every timed step", *extra], rows
        )
        + (
            f"\n\nThe machine was shared: 1-minute load average {load_avg:.1f} on its 2 cores at the start, "
            "hence the spread of the timed steps."
            if load_avg and load_avg > 2
            else ""
        )
        + "\n\n"
        + source_line([name], fmt)
    )


def t_segment_step(fmt: str) -> str:
    return _step_table("segment_step_cpu.json", fmt, [])


def t_detect_step(fmt: str) -> str:
    return _step_table("detect_step_cpu.json", fmt, [])


def t_demo(fmt: str) -> str:
    d = load("demo_cpu.json")
    s = d["settings"]
    rows = [
        ["wall time, start to exit", minutes(d["wall_seconds"])],
        ["steps, images", f"{d['steps']}, {d['images_seen']} ({d['bad_images']} unreadable)"],
        [f"loss at step {d['loss_first']['step']} (first logged)", f"{d['loss_first']['loss']:.3f}"],
        [f"loss at step {d['loss_last']['step']} (last)", f"{d['loss_last']['loss']:.3f}"],
        ["images/s (median of the logged intervals)", f"{d['images_per_sec_logged_median']:.1f}"],
    ]
    ml = d["machine"]
    return (
        table(["demo", "measured"], rows)
        + f"\n\n{s['model']}, {s['input_size']} px, batch {s['batch_size']}, {s['epochs']} epochs, "
        f"{s['backend']} backend, {s['num_workers']} loader workers. The machine was shared: 1-minute load "
        f"average {ml['load_avg_1m_at_start']:.1f} at the start and {ml['load_avg_1m_at_end']:.1f} at the end "
        "on 2 cores.\n\n" + source_line(["demo_cpu.json"], fmt)
    )


def t_finetune_experiment(fmt: str) -> str:
    d = load("finetune_experiment.json")
    rows = []
    for b in map(str, d["budgets"]):
        f, s, g = d["table"]["fcmae"][b], d["table"]["scratch"][b], d["gain_paired"][b]
        rows.append(
            [
                f"{b} %",
                f"{d['labelled_images'][b]:,}",
                f"{f['mean']:.2f} ± {f['std']:.2f}",
                f"{s['mean']:.2f} ± {s['std']:.2f}",
                f"{g['mean']:+.2f} ± {g['std']:.2f}",
            ]
        )
    seeds = d["config"]["seeds"]
    per_seed = []
    for b in map(int, d["budgets"]):
        for arm in ("fcmae", "scratch"):
            per_seed.append([f"{b} %", arm, *[f"{d['runs'][f'{arm}_b{b}_s{s}']['final_acc1']:.2f}" for s in seeds]])
    return (
        table(["labels", "images", "FCMAE + fine-tune", "scratch", "FCMAE - scratch (paired)"], rows)
        + f"\n\nVal top-1 (%) after the last of {d['config']['finetune_steps']} fine-tuning steps, mean ± sample "
        f"std over seeds {', '.join(map(str, seeds))}. Per seed:\n\n"
        + table(["labels", "arm", *[f"seed {s}" for s in seeds]], per_seed)
        + "\n\n"
        + source_line(["finetune_experiment.json"], fmt)
    )


def t_finetune_progress(fmt: str) -> str:
    d = load("finetune_experiment.json")
    seeds, rows = d["config"]["seeds"], []
    for b in map(int, d["budgets"]):
        for arm in ("fcmae", "scratch"):
            runs = [d["runs"][f"{arm}_b{b}_s{s}"] for s in seeds]
            first = [r["acc1_per_eval"][0] for r in runs]
            last = [r["acc1_per_eval"][-1] for r in runs]
            at = sorted({s for s, _ in first})
            rows.append(
                [
                    f"{b} %",
                    arm,
                    f"{runs[0]['repeats']}",
                    "/".join(map(str, at)),
                    f"{statistics.mean(a for _, a in first):.2f}",
                    f"{statistics.mean(a for _, a in last):.2f}",
                    f"{statistics.mean(a for _, a in last) - statistics.mean(a for _, a in first):+.2f}",
                ]
            )
    steps_ = d["config"]["finetune_steps"]
    return (
        table(
            [
                "labels",
                "arm",
                "copies of the subset",
                "first evaluation at step",
                "top-1 there (mean of seeds)",
                f"top-1 at step {steps_}",
                "gain in the last steps",
            ],
            rows,
        )
        + f"\n\nEvery run takes {steps_} steps of batch {d['config']['batch_size']} "
        f"({steps_ * d['config']['batch_size']:,} samples); a subset is copied until its folder holds at "
        f"least {d['splits']['train']:,} images.\n\n" + source_line(["finetune_experiment.json"], fmt)
    )


def t_finetune_knn(fmt: str) -> str:
    d = load("finetune_experiment.json")
    seeds = sorted(d["pretrain"], key=int)
    steps_ = [s for s, _ in d["pretrain"][seeds[0]]["knn_acc1"]]
    rows = [
        [
            f"seed {s}",
            *[f"{v:.2f}" for _, v in d["pretrain"][s]["knn_acc1"]],
            f"{d['pretrain'][s]['loss_first']:.3f} -> {d['pretrain'][s]['loss_last']:.3f}",
        ]
        for s in seeds
    ]
    return (
        table(["k-NN top-1 at step", *map(str, steps_), "pretraining loss"], rows)
        + "\n\nStep 0 is the random encoder. "
        + source_line(["finetune_experiment.json"], fmt)
    )


def t_finetune_tune(fmt: str) -> str:
    d = load("finetune_experiment_tune.json")
    rows = []
    for r in d["results"].values():
        flags = " ".join(str(x) for x in r["flags"])
        rows.append([f"`{flags}`", *[f"{v:.2f}" for _, v in r["knn_acc1"]]])
    at = [s for s, _ in next(iter(d["results"].values()))["knn_acc1"]]
    return (
        table(["pretraining flags", *[f"k-NN at step {s}" for s in at]], rows)
        + f"\n\nSeed {d['seed']}; {d['schedule']}; {d['knn']}.\n\n"
        + source_line(["finetune_experiment_tune.json"], fmt)
    )


def t_peer_downstream(fmt: str) -> str:
    """fcmae against the plain loops of the field's libraries: mean +- std over seeds, every seed."""
    d = load("peer_downstream.json")
    names = {"detect": "detection (Mask R-CNN)", "segment": "segmentation (UPerNet)"}
    arms = {"fcmae": "fcmae, small-data preset", "plain": "plain loop (torchvision / transformers)"}
    rows = []
    for key, v in d["summary"].items():
        if not isinstance(v, dict):
            continue
        task, arm = key.split("/")
        for metric, x in v.items():
            if not isinstance(x, dict):
                continue
            scale = 1 if metric == "mIoU" else 100
            seeds = ", ".join(f"{y * scale:.1f}" for y in x["values"])
            mean = f"{x['mean'] * scale:.1f} +- {x['std'] * scale:.1f}"
            rows.append([names[task], arms[arm], metric.replace("_", " "), mean, seeds, minutes(v["wall_s_mean"])])
    s = d["setup"]
    runs = []  # where each task's rows ran (an update may rerun one task and keep the other's rows)
    for task in names:
        got = [r for r in d["rows"] if r["task"] == task]
        if got and "machine" in got[0]:
            where = device_text(got[0]["machine"])
            runs.append(
                f"{names[task]}: {where}, {got[0]['run_date'][:10]}, {got[0]['jobs_at_a_time']} run(s) at a time"
            )
    note = (
        f"{s['n_train']} training / {s['n_val']} validation images of {s['size']} px, batch 2, "
        f"{s['det_steps']} detection / {s['seg_steps']} segmentation steps, seeds {s['seeds']}; AP in percent "
        "(pycocotools), mIoU in percent over the 4 classes (background included); wall time per run, "
        + ("; ".join(runs) if runs else f"{s['jobs']} run(s) at a time")
        + ", one thread each."
    )
    if d.get("kept_rows_from"):
        k = d["kept_rows_from"]
        note += f" The {k['rows']} rows not rerun were kept from `{k['command']}` ({k['date'][:10]})."
    header = ["task", "arm", "metric", "mean +- std", "per seed", "wall per run"]
    return table(header, rows) + "\n\n" + note + "\n\n" + source_line(["peer_downstream.json"], fmt)


def t_detect_ablation(fmt: str) -> str:
    """The one-seed study of the recipe before the fixes (box and mask AP50, percent)."""
    d = load("detect_ablation_study.json")
    rows = [
        [f"`{r['arm']}`", d["arms"][r["arm"]], f"{100 * r['bbox_AP50']:.1f}", f"{100 * r['segm_AP50']:.1f}"]
        for r in d["rows"]
        if r["rc"] == 0
    ]
    note = f"Seed {', '.join(map(str, d['seeds']))} only. {d['setup']}. Data: {d['data']}. Code: {d['code']}."
    return (
        table(["arm", "what changes", "box AP50", "mask AP50"], rows)
        + "\n\n"
        + note
        + "\n\n"
        + source_line(["detect_ablation_study.json"], fmt)
    )


SEG_ABLATION = [  # file stem prefix, what the arm changes (fcmae's segmentation, 150 steps, 128 px)
    ("ade20k_pipeline", "mmseg's ADE20K pipeline: rescale x0.5-2.0, crop, flip, photometric (the preset before)"),
    ("no_layer_decay", "that pipeline, layer decay 0.9 -> none"),
    ("no_rescale", "rescale off (ratio 1,1): crop = whole image, flip, photometric"),
    ("no_rescale_no_photometric", "rescale and photometric off: flips only (the preset now)"),
    ("no_rescale_no_photometric_no_layer_decay", "flips only, and no layer decay"),
]


def device_text(device: str) -> str:
    """machine_text for a row that records only the device string, 'CPU: <model> (<n> cores)'."""
    cores = re.search(r"\((\d+) cores\)", device)
    return machine_text({"machine": {"device": device, "cores": cores and int(cores.group(1)), "gpu": "none"}})


def t_segment_ablation(fmt: str) -> str:
    """What each factor of the segmentation recipe changes on the small-data benchmark (mIoU, percent)."""
    folder = "segment_small_data_ablation"
    rows, names = [], []
    for stem, what in SEG_ABLATION:
        files = sorted(p.name for p in (RESULTS / folder).glob(f"{stem}_seed*.json"))
        got = []
        for name in files:
            d = load(f"{folder}/{name}")
            got += [
                (r["seed"], r["mIoU"], machine_text(d))
                for r in d["rows"]
                if r["task"] == "segment" and r["arm"] == "fcmae"
            ]
            names.append(f"{folder}/{name}")
        got.sort()
        mean = sum(g[1] for g in got) / len(got)
        seeds = ", ".join(f"{g[1]:.1f} (seed {g[0]})" for g in got)
        rows.append([what, seeds, f"{mean:.1f}", "; ".join(sorted({g[2] for g in got}))])
    plain = [r for r in load("peer_downstream.json")["rows"] if r["task"] == "segment" and r["arm"] == "plain"]
    seeds = ", ".join(f"{r['mIoU']:.1f} (seed {r['seed']})" for r in sorted(plain, key=lambda r: r["seed"]))
    mean = sum(r["mIoU"] for r in plain) / len(plain)
    where = device_text(plain[0]["machine"])
    rows.append(["transformers' UperNet in the plain loop (flips only, no layer decay)", seeds, f"{mean:.1f}", where])
    head = ["fcmae segment, small-data preset with", "mIoU per seed", "mean", "machine"]
    return table(head, rows) + "\n\n" + source_line([*names, "peer_downstream.json"], fmt)


def t_detect_factors(fmt: str) -> str:
    """benchmarks/detect_ablation.py: one factor of the detection preset changed per arm, several seeds."""
    d = load("detect_ablation.json")
    rows = []
    for arm, v in d["summary"].items():
        box, mask = v["bbox_AP50"], v["segm_AP50"]
        rows.append(
            [
                arm,
                d["arms"][arm]["what"] + (f" (`{d['arms'][arm]['flags']}`)" if d["arms"][arm]["flags"] else ""),
                f"{100 * box['mean']:.1f} +- {100 * box['std']:.1f}",
                ", ".join(f"{100 * x:.1f}" for x in box["values"]),
                f"{100 * mask['mean']:.1f} +- {100 * mask['std']:.1f}",
            ]
        )
    s = d["setup"]
    note = (
        f"Box and mask AP50 in percent on the {s['images']} training images of {s['size']} px after {s['steps']} "
        f"steps of batch 2, seeds {s['seeds']}, one thread each, {d['machine']['jobs_at_a_time']} run(s) at a time."
    )
    head = ["arm", "what changes", "box AP50", "per seed", "mask AP50"]
    return table(head, rows) + "\n\n" + note + "\n\n" + source_line(["detect_ablation.json"], fmt)


def t_detect_quality(fmt: str) -> str:
    """The calibration of the detection learning-speed test (box and mask AP50 on its training images)."""
    d = load("detect_quality_calibration.json")
    rows = [[r["arm"], r["seed"], f"{r['bbox_AP50']:.3f}", f"{r['segm_AP50']:.3f}"] for r in d["rows"]]
    note = f"Floor: {d['floor']} ({d['floor_rule']}); the test runs seed 0."
    body = table(["recipe", "seed", "box AP50", "mask AP50"], rows) + "\n\n" + note
    return body + "\n\n" + source_line(["detect_quality_calibration.json"], fmt)


TABLES = {name[2:]: fn for name, fn in globals().items() if name.startswith("t_") and callable(fn)}


# --------------------------------------------------------------------------------------------- the files
def targets() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def render(path: Path, text: str) -> tuple[str, list[str]]:
    """The text with every table rewritten, and the problems found (unknown or unclosed markers)."""
    problems = []
    fmt = "readme" if path.name == "README.md" and path.parent == ROOT else "docs"
    closed = {m.start() for m in MARKER.finditer(text)}
    for m in OPEN.finditer(text):
        if m.start() not in closed:
            problems.append(
                f"{path.relative_to(ROOT)}: <!-- table:{m.group(1)} --> has no matching <!-- /table:{m.group(1)} -->"
            )

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in TABLES:
            problems.append(f"{path.relative_to(ROOT)}: unknown table {name!r} (known: {', '.join(sorted(TABLES))})")
            return m.group(0)
        return f"<!-- table:{name} -->\n{TABLES[name](fmt).rstrip()}\n<!-- /table:{name} -->"

    return MARKER.sub(sub, text), problems


def broken_links(path: Path, text: str) -> list[str]:
    """Relative links (not http, mailto or #anchors) that point at no file."""
    bad = []
    for target in LINK.findall(re.sub(r"```.*?```", "", text, flags=re.DOTALL)):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        if not (path.parent / target.split("#")[0]).exists():
            bad.append(f"{path.relative_to(ROOT)}: link to {target} points at nothing")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 naming every stale table")
    args = p.parse_args(argv)
    problems, stale, written, seen = [], [], [], set()
    for path in targets():
        text = path.read_text()
        new, found = render(path, text)
        problems += found + broken_links(path, new)
        names = [m.group("name") for m in MARKER.finditer(text)]
        seen.update(names)
        if new != text:
            changed = [
                n
                for n, a, b in zip(names, MARKER.finditer(text), MARKER.finditer(new), strict=True)
                if a.group(0) != b.group(0)
            ]
            if args.check:
                stale += [
                    f"{path.relative_to(ROOT)}: table {n!r} differs from what benchmarks/make_tables.py writes"
                    for n in changed
                ]
            else:
                path.write_text(new)
                written.append(f"{path.relative_to(ROOT)} ({', '.join(changed)})")
    unused = sorted(set(TABLES) - seen)
    for line in problems + stale:
        print(line, file=sys.stderr)
    if unused:
        print(f"tables placed nowhere: {', '.join(unused)}", file=sys.stderr)
    if stale:
        print("run: python benchmarks/make_tables.py", file=sys.stderr)
    if not args.check:
        print("\n".join(f"wrote {w}" for w in written) or "every table is up to date")
    elif not (stale or problems):
        print(f"{len(seen)} tables up to date in README.md and docs/")
    return 1 if stale or problems else 0


if __name__ == "__main__":
    sys.exit(main())
