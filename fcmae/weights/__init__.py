"""Weights: find a source, recognise its layout, load it strictly, and the registry of artifact kinds
(the ConvNeXt kinds register in ``hub``: encoder, full FCMAE, classifier)."""

from . import hub  # noqa: F401  (registers the encoder, FCMAE and classifier artifact kinds)
from .load import LoadReport, Weights, load_checkpoint, load_encoder, open_pretrained, open_weights

__all__ = ["LoadReport", "Weights", "load_checkpoint", "load_encoder", "open_pretrained", "open_weights"]
