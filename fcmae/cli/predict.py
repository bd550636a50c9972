"""``fcmae predict IMAGES --checkpoint SOURCE [FLAGS]``: the prediction of whatever the checkpoint
holds: a classifier's top-5, a segmenter's label maps, a detector's boxes and masks, or an FCMAE's
reconstructions. The flags after the images are those of that kind's prediction
(``fcmae predict --checkpoint SOURCE --help`` lists them)."""

from __future__ import annotations

import argparse
import sys

from ..tasks import register_all
from ..training.config import exit_on_user_error
from ..weights.artifacts import KINDS, identify


def checkpoint_of(argv: list[str]) -> str | None:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--checkpoint")
    return parser.parse_known_args(argv)[0].checkpoint


def main(argv: list[str] | None = None, prog: str = "fcmae predict") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    register_all()
    checkpoint = checkpoint_of(argv)
    if checkpoint is None:
        if any(a in ("-h", "--help") for a in argv):
            kinds = ", ".join(k.name for k in KINDS.values() if k.predict)
            print(f"usage: {prog} IMAGES --checkpoint SOURCE [FLAGS]\n\n{__doc__}\nKinds that predict: {kinds}.")
            return 0
        print(
            f"usage: {prog} IMAGES --checkpoint SOURCE [FLAGS]\n{prog}: error: the following arguments are "
            "required: --checkpoint",
            file=sys.stderr,
        )
        return 2

    def run() -> int:
        found = identify(checkpoint)
        if found.kind.predict is None:
            raise ValueError(
                f"{checkpoint} holds a {found.kind.name}, which does not predict; `fcmae embed` gives its features."
            )
        return found.kind.predict(argv, prog=prog)

    return exit_on_user_error(run)
