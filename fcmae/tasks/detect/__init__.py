"""Mask R-CNN detection and instance segmentation: ``config`` (fields, the COCO 3x recipe, the
deprecated size names), ``model`` (torchvision's Mask R-CNN on a ConvNeXt FPN backbone, encoder load,
layer decay), ``loop`` (fine-tuning and --eval-only), ``evaluation`` (COCOeval), ``artifact``
(weights, load-back, the ``detector`` kind and its export), ``predict`` (drawn detections of images)."""

from ...weights.artifacts import attach
from . import predict
from .artifact import export_detector, load_detector
from .config import DetectConfig
from .loop import detect, main

attach("detector", predict=predict.main)

__all__ = ["DetectConfig", "detect", "export_detector", "load_detector", "main"]
