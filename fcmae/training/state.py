"""Training state on disk: atomic checkpoints, their position record, resume discovery and the
checks that make a resume on another number of processes either exact or refused.

A checkpoint is a directory ``checkpoints/step_{N:08d}`` holding Accelerate's state (model,
optimizer, scaler, every process's RNG states) and ``position.json``: the position (step, epoch,
micro-batches consumed in the epoch, counts; plain types only), the format version, and the facts
a resume compares (processes, batch per process, accumulation, global batch). It is written under a
temporary name and renamed once complete, so a crash mid-write leaves the previous checkpoint as the
newest complete one.
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

POSITION_FORMAT = 2  # 1: position only (fcmae 0.1); 2: + format and the facts below
FACTS = ("world_size", "batch_size", "grad_accum", "effective_batch", "stream")


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
        raise FileNotFoundError(
            f"--resume {resume}: no complete checkpoint there (a directory with {POSITION}, "
            "or a run directory with checkpoints/step_*)."
        )
    return found[-1]


def trim_log(path: Path, keep) -> None:
    """Keep the rows of a JSON-lines log for which ``keep(row)`` holds: a resumed run drops the rows
    of the steps it repeats, so the log reads as one uninterrupted run."""
    if path.is_file():
        rows = [r for r in path.read_text().splitlines() if r.strip()]
        write_atomic_text(path, "".join(r + "\n" for r in rows if keep(json.loads(r))))


def save_checkpoint(accelerator, ckpt_root: str | os.PathLike, position, keep_last: int, facts: dict) -> Path:
    """Every process calls this. Writes Accelerate's state and ``position`` (a dataclass of plain
    types) with ``facts`` atomically."""
    position = {**asdict(position), "format": POSITION_FORMAT, **facts}
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


def read_position(ckpt: Path) -> tuple[dict, dict]:
    """(position fields, facts) of a checkpoint. A format-1 checkpoint's process count is read from
    its per-process RNG files (Accelerate writes ``random_states_{rank}.pkl``); its batch is unknown."""
    saved = json.loads((ckpt / POSITION).read_text())
    version = saved.pop("format", 1)
    if version > POSITION_FORMAT:
        raise ValueError(
            f"{ckpt} was written by a newer fcmae (position format {version}; this one reads up to "
            f"{POSITION_FORMAT}): upgrade fcmae to resume it."
        )
    facts = {k: saved.pop(k) for k in FACTS if k in saved}
    if version == 1:
        facts["world_size"] = len(list(ckpt.glob("random_states_*.pkl"))) or None
    return saved, facts


def load_position(ckpt: Path, run) -> dict:
    """The position saved in ``ckpt``, checked against this launch (``check_elastic``)."""
    saved, facts = read_position(ckpt)
    return check_elastic(saved, facts, run, ckpt)


def check_elastic(saved: dict, facts: dict, run, ckpt: Path) -> dict:
    """A checkpoint written by W processes resumes with W' (``--elastic keep-global-batch``, the default)
    when the global batch is the same: every global step then holds the same samples, and the
    micro-batch position converts exactly. What cannot be the same run is refused in one line."""
    cfg, sched = run.cfg, run.sched
    old_world, old_eff = facts.get("world_size") or run.world, facts.get("effective_batch")
    old_accum = facts.get("grad_accum") or cfg.grad_accum
    if old_world != run.world:
        if cfg.elastic == "refuse":
            raise ValueError(
                f"{ckpt} was written by {old_world} processes and this launch has {run.world} (--elastic "
                "refuse): launch it with the same number of processes."
            )
        blocker = cfg.elastic_blocker()
        if blocker:
            raise ValueError(
                f"{ckpt} was written by {old_world} processes and this launch has {run.world}: {blocker}; "
                f"launch it with {old_world} processes."
            )
    if old_eff is not None and old_eff != sched.eff_batch:
        if cfg.elastic != "allow-batch-change":
            old = f"{old_world} x {facts.get('batch_size')} x {old_accum}"
            raise ValueError(
                f"{ckpt} was trained with a global batch of {old_eff} ({old} processes x batch x "
                f"accumulation); this launch gives {sched.eff_batch} ({run.world} x {cfg.batch_size} x "
                f"{cfg.grad_accum}). Set --batch-size / --grad-accum so that processes x batch x "
                f"accumulation = {old_eff}, or pass --elastic allow-batch-change (the lr, the steps per "
                "epoch and the samples of each step then change: not the same run)."
            )
        samples = saved["batch"] // old_accum * old_eff
        saved["batch"] = samples // sched.eff_batch * cfg.grad_accum
        run.say(
            f"--elastic allow-batch-change: global batch {old_eff} -> {sched.eff_batch}; continuing at step "
            f"{saved['step']}, {samples} samples into epoch {saved['epoch']}"
        )
    elif old_accum != cfg.grad_accum:
        saved["batch"] = saved["batch"] // old_accum * cfg.grad_accum  # the same optimizer steps of the epoch
    if old_world != run.world:
        run.say(f"elastic resume: {old_world} -> {run.world} processes, global batch {sched.eff_batch} kept")
    return saved


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
