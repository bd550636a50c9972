"""An output folder belongs to one run: a new run refuses a folder that holds another run's files
(continue that run with ``--resume auto``, or replace it with ``--overwrite``), so the files of two
runs never mix."""

from __future__ import annotations

import shutil
from pathlib import Path

MARKERS = ("checkpoints", "log.jsonl", "config.yaml")  # a run has written here
# every file and folder a run of any task writes (Slurm job logs under slurm/ are kept: the job that
# starts afresh writes there before the run begins)
OWNED = (
    "checkpoints",
    "log.jsonl",
    "config.yaml",
    "final.yaml",
    "*.safetensors",
    "reconstructions",
    "predictions",
    "per_class_iou.json",
    "categories.json",
    "labels.txt",
    "hub",
    "fcmae-*",
    ".*.tmp",
)


def run_files(out: Path) -> list[Path]:
    """The files and folders of an earlier run in ``out``."""
    return sorted({p for pattern in OWNED for p in out.glob(pattern)})


def claim_output_dir(run, project: str) -> None:
    """Refuse, or with ``--overwrite`` clear, an output folder that holds another run. Every process
    checks; the main process deletes, the others wait."""
    cfg, out = run.cfg, run.out
    held = [name for name in MARKERS if (out / name).exists()]
    if not held or cfg.resume:
        return
    if not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a run ({', '.join(held)}): continue it with --resume auto, or start "
            f"afresh with --overwrite (deletes its checkpoints/, log.jsonl, config.yaml, final.yaml, "
            "weights and other outputs), or choose another --output-dir."
        )
    files = run_files(out)
    if run.is_main:
        for path in files:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    run.accelerator.wait_for_everyone()
    run.say(f"--overwrite: replaced the earlier run in {out} (deleted {', '.join(p.name for p in files)})")
