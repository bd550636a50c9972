"""``fcmae submit [SLURM OPTIONS] -- TASK [TASK FLAGS]``: a task as a Slurm job that requeues itself on
preemption and at its time limit and continues with ``--resume auto`` (fcmae.training.slurm)."""

from __future__ import annotations

from ..training.config import exit_on_user_error
from ..training.slurm import main as submit


def main(argv: list[str] | None = None, prog: str = "fcmae submit") -> None:
    exit_on_user_error(submit, argv)
