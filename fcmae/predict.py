"""``python -m fcmae.predict ...`` (and ``fcmae-predict``): the same as ``fcmae predict ...``."""

import sys

from .cli.predict import main as _main


def main(argv: list[str] | None = None) -> None:
    sys.exit(_main(argv, prog="fcmae predict"))


if __name__ == "__main__":
    main()
