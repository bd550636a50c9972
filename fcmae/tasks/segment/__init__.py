"""UPerNet semantic segmentation: ``config`` (fields, mmseg's recipe), ``model`` (transformers' UperNet
on a ConvNeXt backbone, encoder load, loss, layer decay), ``loop`` (fine-tuning and --eval-only),
``evaluation`` (inference modes, mIoU), ``artifact`` (weights, load-back, the ``segmenter`` kind:
transformers and ONNX exports), ``predict`` (palette PNG + overlay of images)."""

from ...weights.artifacts import attach
from . import predict
from .artifact import export_segmenter, is_segmenter, load_segmenter
from .config import SegmentConfig
from .loop import main, segment

attach("segmenter", predict=predict.main)

__all__ = ["SegmentConfig", "export_segmenter", "is_segmenter", "load_segmenter", "main", "segment"]
