"""``python -m fcmae.hub export|push``: Hub-ready exports of any fcmae run, and their upload.

Classifiers, encoders and full FCMAEs export through ``fcmae.weights.hub`` (timm, transformers and
fcmae formats). A segmentation run (UperNet, ``finetune/segment.py``) exports as a transformers
``UperNetForSemanticSegmentation`` folder and a detection run (``finetune/detect.py``) as its
weights, config and model card: the entry point tells them apart by the checkpoint's metadata,
since the weights layer does not know the tasks.
"""
import sys

from .tasks import segment_model
from .training.config import exit_on_user_error
from .weights.formats import load_fcmae_weights  # noqa: F401  (public: fcmae.hub.load_fcmae_weights)
from .weights.hub import export, export_and_push, parse_formats, push  # noqa: F401
from .weights.hub import main as weights_main


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if segment_model.is_segmenter_export(argv):
        return exit_on_user_error(segment_model.export_main, argv[1:])
    return exit_on_user_error(weights_main, argv)


if __name__ == "__main__":
    main()
