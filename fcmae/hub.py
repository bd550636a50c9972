"""``python -m fcmae.hub export|push``: Hub-ready exports of any fcmae run, and their upload.

Classifiers, encoders and full FCMAEs export through ``fcmae.weights.hub`` (timm, transformers and
fcmae formats). A segmentation run (UperNet, ``finetune/segment.py``) exports as a transformers
``UperNetForSemanticSegmentation`` folder and a detection run (``finetune/detect.py``) as its
weights, config and model card: the entry point tells them apart by the checkpoint's metadata,
since the weights layer does not know the tasks.
"""
import argparse
import sys

from .tasks import detect, segment_model
from .training.config import exit_on_user_error
from .weights.formats import load_fcmae_weights  # noqa: F401  (public: fcmae.hub.load_fcmae_weights)
from .weights.hub import export, export_and_push, parse_formats, push  # noqa: F401
from .weights.hub import main as weights_main
from .weights.source import find_weights, read_metadata


def export_detector_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m fcmae.hub export", description=detect.export_detector.__doc__)
    parser.add_argument("--checkpoint", required=True, help="detection run directory or its best/last.safetensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", default="detector", help="detector (the only format of a detection run)")
    parser.add_argument("--overwrite", action="store_true")
    args, _ = parser.parse_known_args(argv)
    print(f"exported to {detect.export_detector(args.checkpoint, args.out, overwrite=args.overwrite)}")


def export_checkpoint(argv: list[str]) -> str | None:
    """The ``--checkpoint`` of ``export`` (None for another command)."""
    if argv[:1] != ["export"]:
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--checkpoint")
    return parser.parse_known_args(argv[1:])[0].checkpoint


def is_detector(source) -> bool:
    """Whether ``source`` is a detection run or its weights (their metadata says so)."""
    try:
        path = find_weights(source, ("best.safetensors", "last.safetensors"))
    except (FileNotFoundError, TypeError):
        return False
    return read_metadata(path).get("format") == detect.FORMAT


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    checkpoint = export_checkpoint(argv)
    if checkpoint and segment_model.is_segmenter(checkpoint):
        return exit_on_user_error(segment_model.export_main, argv[1:])
    if checkpoint and is_detector(checkpoint):
        return exit_on_user_error(export_detector_main, argv[1:])
    return exit_on_user_error(weights_main, argv)


if __name__ == "__main__":
    main()
