"""Training state on disk: atomic checkpoints, resume discovery, and the safetensors exports.

A checkpoint is a directory ``checkpoints/step_{N:08d}`` holding Accelerate's state (model,
optimizer, scaler, every process's RNG states) and ``position.json`` (step, epoch, batches consumed
in the epoch, plain types only). It is written under a temporary name and renamed once complete, so
a crash mid-write leaves the previous checkpoint as the newest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path

from ..weights.files import write_atomic_text
from ..weights.source import POSITION, complete_checkpoints


def fault_point(name: str, step: int) -> None:
    """Test hook: ``FCMAE_FAULT=name:step`` SIGKILLs this process when it reaches that point, so tests
    can crash a run exactly mid-epoch or mid-checkpoint-write. Unset, it does nothing."""
    spec = os.environ.get("FCMAE_FAULT")
    if spec and spec == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``auto``: the newest complete checkpoint in ``output_dir/checkpoints`` (None if there is none);
    a path: that checkpoint directory, or a run directory whose newest checkpoint is taken."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(Path(output_dir) / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if (path / POSITION).is_file():
        return path
    found = complete_checkpoints(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
    if not found:
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint there (a directory with {POSITION}, "
                                "or a run directory with checkpoints/step_*).")
    return found[-1]


def trim_log(path: Path, keep) -> None:
    """Keep the rows of a JSON-lines log for which ``keep(row)`` holds: a resumed run drops the rows
    of the steps it repeats, so the log reads as one uninterrupted run."""
    if path.is_file():
        rows = [r for r in path.read_text().splitlines() if r.strip()]
        write_atomic_text(path, "".join(r + "\n" for r in rows if keep(json.loads(r))))


def save_checkpoint(accelerator, ckpt_root: str | os.PathLike, position, keep_last: int) -> Path:
    """Every process calls this. Writes Accelerate's state and ``position`` (a dataclass of plain
    types) atomically."""
    position = asdict(position)
    root = Path(ckpt_root)
    final = root / f"step_{position['step']:08d}"
    tmp = root / f".tmp_step_{position['step']:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's RNG file is written
    fault_point("checkpoint", position["step"])
    if accelerator.is_main_process:
        write_atomic_text(tmp / POSITION, json.dumps(position, indent=1))
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp_step_*"):  # left by a crash during an earlier write
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
