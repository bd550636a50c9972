"""``fcmae export`` and ``fcmae push``: one parser for every artifact kind (fcmae.weights.artifacts)."""

from __future__ import annotations

from ..tasks import register_all
from ..training.config import exit_on_user_error
from ..weights import hub


def run(argv: list[str], prog: str = "fcmae") -> None:
    register_all()
    exit_on_user_error(hub.main, argv, prog=prog)


def export(argv: list[str], prog: str = "fcmae export") -> None:
    run(["export", *argv], prog=prog.rsplit(" ", 1)[0])


def push(argv: list[str], prog: str = "fcmae push") -> None:
    run(["push", *argv], prog=prog.rsplit(" ", 1)[0])
