"""``accelerate launch fcmae/pretrain.py ...`` (and ``fcmae-pretrain``): the same as ``fcmae pretrain ...``."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root, not fcmae/, goes first on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from fcmae.tasks.pretrain import DEMO, PretrainConfig, choose_preset
from fcmae.tasks.pretrain import main as _main

__all__ = ["DEMO", "PretrainConfig", "choose_preset", "main"]


def main(argv: list[str] | None = None) -> None:
    _main(argv, prog="fcmae pretrain")


if __name__ == "__main__":
    main()
