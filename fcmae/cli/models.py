"""``fcmae models``: every registered model with its parameters and GFLOPs next to the published
figures (fcmae.models.table)."""

from __future__ import annotations


def main(argv: list[str] | None = None, prog: str = "fcmae models") -> int:
    from ..models.table import main as table

    return table(argv, prog=prog)
