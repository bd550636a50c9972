"""``python -m fcmae.finetune ...`` (and ``fcmae-finetune``): the same as ``fcmae finetune ...``."""

from .tasks.classify import main as _main


def main(argv: list[str] | None = None) -> None:
    _main(argv, prog="fcmae finetune")


if __name__ == "__main__":
    main()
