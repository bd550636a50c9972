"""``fcmae data stats | pack | verify``: per-channel statistics, a folder packed into shards, a packed
folder checked against its manifest (fcmae.data.__main__)."""

from __future__ import annotations


def main(argv: list[str] | None = None, prog: str = "fcmae data") -> int:
    from ..data.__main__ import main as data

    return data(argv, prog=prog)
