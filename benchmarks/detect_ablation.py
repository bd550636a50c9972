"""What each factor of fcmae's detection recipe changes, several seeds each, on the hard shapes set.

    python benchmarks/detect_ablation.py --jobs 2                 # 6 arms x 3 seeds (about 30 min, 2 cores)
    python benchmarks/detect_ablation.py --arms preset,multiscale --seeds 0

The setting is tests/test_detect_quality.py's, so the regression floor and this table speak of the
same thing: benchmarks/shapes_data.py's set (circles, squares and triangles told apart by outline
only, random colours, noisy backgrounds) with 24 images of 96 px, ``convnextv2_atto`` from timm's
initialisation fine-tuned with ``configs/detect/small_data.yaml`` for 80 steps of batch 2 (one thread
each), then box and mask AP50 by pycocotools on those 24 images: how much of its training set the model
has learnt in a fixed budget, which is what a slower recipe loses first. Each arm changes one factor
of the preset (``old recipe``: the two fixed defects together, the recipe before the fixes).

Prints a table (mean +- std over seeds per arm), writes OUT.json (rows, summary, the machine and
library versions, the command, the date) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine, pyplot, spread  # noqa: E402
from shapes_data import make_detection  # noqa: E402

ARMS = {  # name -> (flags added to the preset, what it changes)
    "preset": ([], "configs/detect/small_data.yaml as it is"),
    "multiscale": (["--jitter", "multiscale"], "ConvNeXt's COCO multi-scale training resize (short side 0.6-1x)"),
    "torchvision mask init": (["--head-init", "torchvision"], "torchvision's kaiming init of the mask logits"),
    "old recipe": (["--jitter", "multiscale", "--head-init", "torchvision"], "both: the recipe before the fixes"),
    "no layer decay": (["--layer-decay", "1.0"], "layer decay 0.95 -> none (the plain loop has none)"),
    "lr 3e-4": (["--lr", "3e-4"], "AdamW lr 1e-4 -> 3e-4"),
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(data: Path, out: Path, seed: int, flags: list[str], steps: int, size: int, reuse: bool = False) -> dict:
    ann, images = data / "annotations" / "instances_train2017.json", data / "train2017"
    cmd = [sys.executable, "-m", "fcmae", "detect", "--config", ROOT / "configs" / "detect" / "small_data.yaml"]
    cmd += ["--model", "convnextv2_atto", "--train-ann", ann, "--train-images", images, "--val-ann", ann]
    cmd += ["--val-images", images, "--train-short-side", size, "--batch-size", 2, "--max-steps", steps]
    cmd += ["--seed", seed, "--num-workers", 0, "--report-to", "none", "--save-every", 100000, "--overwrite"]
    cmd = [str(c) for c in [*cmd, "--log-every", 20, *flags, "--output-dir", out]]
    log = out.with_suffix(".log")
    done = (out / "final.yaml").is_file() and log.is_file() and log.read_text().split("\n", 1)[0] == shlex.join(cmd)
    t0, wall = time.time(), None
    if not (reuse and done):  # --reuse: a finished run of this very command is read, not rerun
        proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True)
        log.write_text(shlex.join(cmd) + "\n\n" + proc.stdout + "\n" + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {shlex.join(cmd)}\n{proc.stderr[-3000:]}")
        wall = round(time.time() - t0, 1)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    last = [r for r in logged if "bbox_mAP_50" in r][-1]
    return {
        "bbox_AP50": last["bbox_mAP_50"],
        "segm_AP50": last.get("segm_mAP_50"),
        "wall_s": wall,  # None: reused
        "cmd": shlex.join(cmd),
    }


def summary(rows: list[dict]) -> dict:
    out = {}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        got = [r for r in rows if r["arm"] == arm]
        out[arm] = {m: spread([r[m] for r in got]) for m in ("bbox_AP50", "segm_AP50")}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one thread each)")
    p.add_argument("--reuse", action="store_true", help="read runs of the same command finished in --workdir")
    p.add_argument("--workdir", default="runs/detect_ablation")
    p.add_argument("--out", default="benchmarks/results/detect_ablation")
    a = p.parse_args(argv)
    arms = a.arms.split(",")
    unknown = [x for x in arms if x not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    work = Path(a.workdir).resolve()
    data = work / "shapes"
    if not (data / "annotations" / "instances_train2017.json").is_file():
        make_detection(data, n_train=a.images, n_val=8, size=a.size, seed=0)  # as tests/test_detect_quality.py
    jobs = [(arm, seed) for arm in arms for seed in map(int, a.seeds.split(","))]

    def one(job):
        arm, seed = job
        m = run(data, work / f"{arm.replace(' ', '_')}_s{seed}", seed, ARMS[arm][0], a.steps, a.size, a.reuse)
        row = {"arm": arm, "seed": seed, **m}
        print(json.dumps({k: v for k, v in row.items() if k != "cmd"}), flush=True)
        return row

    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(one, jobs))
    s = summary(rows)
    print(f"{'arm':<24} {'box AP50':>16} {'mask AP50':>16}")
    for arm, v in s.items():
        box, mask = v["bbox_AP50"], v["segm_AP50"]
        print(f"{arm:<24} {box['mean']:>8.3f} +- {box['std']:.3f} {mask['mean']:>8.3f} +- {mask['std']:.3f}")
    import timm
    import torchvision

    info = {
        **machine("cpu"),
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "jobs_at_a_time": a.jobs,
    }
    record = {
        "what": __doc__.split("\n")[0],
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": info,
        "torch_threads": 1,
        "setup": {k: v for k, v in vars(a).items()},
        "arms": {k: {"flags": shlex.join(f), "what": w} for k, (f, w) in ARMS.items() if k in arms},
        "summary": s,
        "rows": rows,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(1.3 * len(s) + 2, 3.4))
        for i, v in enumerate(s.values()):
            ax.bar(i, v["bbox_AP50"]["mean"], yerr=v["bbox_AP50"]["std"], color="tab:blue", alpha=0.7, capsize=4)
            ax.scatter([i] * len(v["bbox_AP50"]["values"]), v["bbox_AP50"]["values"], color="k", s=12, zorder=3)
        ax.set_xticks(range(len(s)), list(s), rotation=20, fontsize=7)
        ax.set_ylabel("box AP50 on the training images")
        ax.set_title(f"{a.images} shapes at {a.size} px, {a.steps} steps, seeds {a.seeds}", fontsize=8)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"wrote {out.with_suffix('.json')}" + (f" and {out.with_suffix('.png')}" if plt else ""))


if __name__ == "__main__":
    main()
