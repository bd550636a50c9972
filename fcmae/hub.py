"""``python -m fcmae.hub export|push ...`` (and ``fcmae-hub``): the same as ``fcmae export|push ...``.
``fcmae.hub.load_fcmae_weights`` (continue pretraining from a pushed FCMAE) stays importable from here,
as published model cards show it."""

import sys

from .cli.hub import run
from .weights.formats import load_fcmae_weights
from .weights.hub import export, export_and_push, parse_formats, push

__all__ = ["export", "export_and_push", "load_fcmae_weights", "main", "parse_formats", "push"]


def main(argv: list[str] | None = None) -> None:
    run(sys.argv[1:] if argv is None else list(argv), prog="python -m fcmae.hub")


if __name__ == "__main__":
    main()
