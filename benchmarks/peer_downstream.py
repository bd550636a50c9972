"""fcmae's downstream fine-tuning against plain loops of the field's own libraries, side by side.

    python benchmarks/peer_downstream.py                  # the committed run (about 2 h on a 2-core CPU)
    python benchmarks/peer_downstream.py --quick          # smoke run: tiny data, a few steps, one seed
    python benchmarks/peer_downstream.py --tasks detect --seeds 0,1,2 --det-steps 240 --size 256
    python benchmarks/peer_downstream.py --tasks segment --keep-other-rows   # rerun one task, keep the other's rows

Detection: ``fcmae detect --config configs/detect/small_data.yaml`` (Mask R-CNN FPN on ConvNeXt, the
preset a user with small data is pointed to, given only --data, --train-short-side, --max-steps and
--seed) against benchmarks/peer_loops.py's plain loop (torchvision's MaskRCNN on timm's
convnextv2_atto with torchvision's FPN, torchvision's defaults, AdamW 1e-4, flips only).
Segmentation: ``fcmae segment --config configs/segment/small_data.yaml`` (UPerNet) against the plain
loop on transformers' UperNetForSemanticSegmentation. Both arms of a task start from the same encoder
(a 10-step FCMAE pretraining run on the detection training images: near its initialisation) and see
the same generated images (benchmarks/shapes_data.py: circle / square / triangle told apart by
outline only, random colours, noisy backgrounds) for the same number of steps at batch 2, one thread
each; each is scored once at the end on the validation images: bbox AP / AP50 and segm AP by
pycocotools, mIoU (percent, background included) from the confusion matrix. ``--jobs 2`` runs two
runs at a time (each still one thread).

Prints a table (mean +- std over seeds per arm), writes OUT.json (rows, summary, the machine and
library versions, the command, the date) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, pyplot, spread  # noqa: E402
from shapes_data import make_detection, make_segmentation  # noqa: E402

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONPATH": str(ROOT),
    "PYTHONUNBUFFERED": "1",
}
METRICS = {"detect": ("bbox_AP50", "bbox_AP", "segm_AP"), "segment": ("mIoU",)}
COMMON = ["--batch-size", "2", "--num-workers", "0", "--report-to", "none", "--save-every", "100000", "--overwrite"]


def sh(cmd, log: Path) -> subprocess.CompletedProcess:
    cmd = list(map(str, cmd))
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True)
    log.write_text(shlex.join(cmd) + "\n\n" + proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc


def last_eval(run: Path, key: str) -> dict:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return next(r for r in reversed(rows) if key in r)


def fcmae_detect(data: Path, enc: Path, out: Path, a, seed: int) -> dict:
    cmd = [sys.executable, "-m", "fcmae", "detect", "--config", ROOT / "configs/detect/small_data.yaml"]
    cmd += [*a.fcmae_detect_args, "--from-fcmae", enc, "--data", data, "--train-short-side", a.size]
    cmd += ["--max-steps", a.det_steps, "--seed", seed, *COMMON, "--log-every", "20", "--output-dir", out]
    sh(cmd, out.with_suffix(".log"))
    m = last_eval(out, "bbox_mAP")
    return {"bbox_AP": m["bbox_mAP"], "bbox_AP50": m["bbox_mAP_50"], "segm_AP": m.get("segm_mAP"), "cmd": cmd}


def fcmae_segment(data: Path, enc: Path, out: Path, a, seed: int) -> dict:
    cmd = [sys.executable, "-m", "fcmae", "segment", "--config", ROOT / "configs/segment/small_data.yaml"]
    cmd += [*a.fcmae_segment_args, "--from-fcmae", enc, "--data", data, "--num-classes", 4]
    cmd += ["--class-names", data / "class_names.txt", "--input-size", a.size, "--max-steps", a.seg_steps]
    cmd += ["--seed", seed, *COMMON, "--log-every", "20", "--output-dir", out]
    sh(cmd, out.with_suffix(".log"))
    return {"mIoU": last_eval(out, "mIoU")["mIoU"], "cmd": cmd}


def plain(task: str, data: Path, enc: Path, out: Path, a, seed: int) -> dict:
    steps = a.det_steps if task == "detect" else a.seg_steps
    cmd = [sys.executable, ROOT / "benchmarks" / "peer_loops.py", task, "--data", data, "--encoder", enc]
    cmd += ["--steps", steps, "--size", a.size, "--seed", seed, "--out", out.with_suffix(".json")]
    sh(cmd, out.with_suffix(".log"))
    m = json.loads(out.with_suffix(".json").read_text())
    if task == "segment":
        return {"mIoU": m["mIoU"], "cmd": cmd}
    return {"bbox_AP": m["bbox_mAP"], "bbox_AP50": m["bbox_mAP_50"], "segm_AP": m["segm_mAP"], "cmd": cmd}


def summary(rows: list[dict]) -> dict:
    out = {}
    for task, metrics in METRICS.items():
        for arm in ("fcmae", "plain"):
            got = [r for r in rows if r["task"] == task and r["arm"] == arm]
            if not got:
                continue
            out[f"{task}/{arm}"] = {m: spread([r[m] for r in got]) for m in metrics}
            out[f"{task}/{arm}"]["wall_s_mean"] = statistics.mean(r["wall_s"] for r in got)
    for task, metrics in METRICS.items():
        f, p = out.get(f"{task}/fcmae"), out.get(f"{task}/plain")
        if f and p:
            out[f"{task}/fcmae_at_least_plain"] = f[metrics[0]]["mean"] >= p[metrics[0]]["mean"]
    return out


def table(s: dict) -> str:
    lines = [f"{'task / arm':<18} {'metric':<10} {'mean':>8} {'std':>8}   per seed"]
    for key, v in s.items():
        if not isinstance(v, dict):
            continue
        for m, x in v.items():
            if isinstance(x, dict):
                values = ", ".join(f"{y:.4f}" for y in x["values"])
                lines.append(f"{key:<18} {m:<10} {x['mean']:>8.4f} {x['std']:>8.4f}   {values}")
    lines += [f"{k}: {v}" for k, v in s.items() if not isinstance(v, dict)]
    return "\n".join(lines)


def plot(rows: list[dict], s: dict, path: Path, title: str) -> None:
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot")
        return
    panels = [(t, m) for t, ms in METRICS.items() for m in ms if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
    for ax, (task, m) in zip(axes[0], panels, strict=True):
        for i, arm in enumerate(("plain", "fcmae")):
            v = s.get(f"{task}/{arm}", {}).get(m)
            if not v:
                continue
            ax.bar(i, v["mean"], yerr=v["std"], color=("tab:gray", "tab:blue")[i], alpha=0.7, capsize=4)
            ax.scatter([i] * len(v["values"]), v["values"], color="k", s=12, zorder=3)
        ax.set_xticks([0, 1], ["plain", "fcmae"])
        ax.set_title(f"{task}: {m}", fontsize=9)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def prepare(a, work: Path) -> tuple[Path, Path, Path]:
    """The generated sets and the shared near-random encoder, made once in ``work``."""
    det_data, seg_data = work / f"detect{a.size}", work / f"segment{a.size}"
    if not (det_data / "annotations" / "instances_val2017.json").is_file():
        make_detection(det_data, a.n_train, a.n_val, a.size, seed=0)
    if not (seg_data / "class_names.txt").is_file():
        make_segmentation(seg_data, a.n_train, a.n_val, a.size, seed=0)
    enc_run = work / "pretrain10"
    if not (enc_run / "encoder.safetensors").is_file():
        cmd = [sys.executable, "-m", "fcmae", "pretrain", "--data", det_data / "train2017"]
        cmd += ["--model", "convnextv2_atto", "--input-size", 64, "--batch-size", 4, "--max-steps", 10]
        cmd += ["--decoder-dim", 32, "--num-workers", 0, "--report-to", "none", "--num-recon", 0]
        cmd += ["--save-every", 10, "--overwrite", "--output-dir", enc_run]
        sh(cmd, work / "pretrain10.log")
    return det_data, seg_data, enc_run / "encoder.safetensors"


def one(job, a, work: Path, det_data: Path, seg_data: Path, enc: Path) -> dict:
    task, seed, arm = job
    data = det_data if task == "detect" else seg_data
    out = work / f"{task}_{arm}_s{seed}"
    t0 = time.time()
    if arm == "plain":
        m = plain(task, data, enc, out, a, seed)
    else:
        m = (fcmae_detect if task == "detect" else fcmae_segment)(data, enc, out, a, seed)
    row = {"task": task, "arm": arm, "seed": seed, "steps": a.det_steps if task == "detect" else a.seg_steps, **m}
    row.update(wall_s=round(time.time() - t0, 1), cmd=shlex.join(map(str, m["cmd"])))
    print(json.dumps({k: v for k, v in row.items() if k != "cmd"}), flush=True)
    return row


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 16/8 images of 64 px, 4 steps, seed 0")
    p.add_argument("--tasks", default="detect,segment")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--det-steps", type=int, default=150)
    p.add_argument("--seg-steps", type=int, default=150)
    p.add_argument("--arms", default="fcmae,plain", help="fcmae, plain or both (an ablation runs fcmae alone)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    p.add_argument("--fcmae-detect-args", default="", help="extra flags for fcmae detect (quoted)")
    p.add_argument("--fcmae-segment-args", default="", help="extra flags for fcmae segment (quoted)")
    p.add_argument(
        "--keep-other-rows",
        action="store_true",
        help="keep OUT.json's rows for the (task, seed, arm) runs not made now (each row keeps its command and date)",
    )
    p.add_argument("--workdir", default="runs/peer_downstream")
    p.add_argument("--out", default="benchmarks/results/peer_downstream")
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.n_train, a.n_val, a.det_steps, a.seg_steps, a.seeds = 64, 16, 8, 4, 4, "0"
        a.workdir, a.out = a.workdir + "_quick", a.out + "_quick"
    a.fcmae_detect_args, a.fcmae_segment_args = shlex.split(a.fcmae_detect_args), shlex.split(a.fcmae_segment_args)
    return a


def main(argv=None) -> None:
    a = parse(argv)
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    det_data, seg_data, enc = prepare(a, work)
    arms = a.arms.split(",")
    jobs = [(t, s, arm) for t in a.tasks.split(",") for s in map(int, a.seeds.split(",")) for arm in arms]
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(lambda j: one(j, a, work, det_data, seg_data, enc), jobs))
    import timm
    import torch
    import torchvision
    import transformers

    info = {**machine("cpu"), "torchvision": torchvision.__version__, "timm": timm.__version__}
    info.update(transformers=transformers.__version__, jobs_at_a_time=a.jobs)
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    here = dict(run_date=date, machine=info["device"], jobs_at_a_time=a.jobs, torch_version=torch.__version__)
    rows = [dict(r, **here) for r in rows]
    out, kept, earlier = Path(a.out), [], None
    if a.keep_other_rows and out.with_suffix(".json").is_file():  # earlier runs' rows for other jobs
        earlier = json.loads(out.with_suffix(".json").read_text())
        same = ("size", "n_train", "n_val", "det_steps", "seg_steps")
        if any(earlier["setup"][k] != getattr(a, k) for k in same):
            raise SystemExit(f"--keep-other-rows: {out}.json was run with other {', '.join(same)}; rerun every job")
        then = dict(
            run_date=earlier["date"],
            machine=earlier["machine"]["device"],
            jobs_at_a_time=earlier["machine"].get("jobs_at_a_time"),
            torch_version=earlier["machine"]["torch"],
        )
        kept = [{**then, **r} for r in earlier["rows"] if (r["task"], r["seed"], r["arm"]) not in set(jobs)]
    rows = kept + rows
    s = summary(rows)
    print(table(s))
    out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: (v if not isinstance(v, list) else shlex.join(v)) for k, v in vars(a).items()}
    record = {"command": shlex.join([sys.executable, *sys.argv]), "date": date}
    record.update(machine=info, torch_threads=1, setup=setup, summary=s, rows=rows)
    if kept:  # each row says when, where and how (cmd) it ran
        record["kept_rows_from"] = {"command": earlier["command"], "date": earlier["date"], "rows": len(kept)}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    title = f"{a.n_train} train / {a.n_val} val shapes at {a.size} px, batch 2, det {a.det_steps} / seg {a.seg_steps}"
    plot(rows, s, out.with_suffix(".png"), f"{title} steps, seeds {a.seeds}; torch {torch.__version__}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
