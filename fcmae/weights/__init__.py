"""Weights: find a source, recognise its layout, load it strictly, and write exports."""
from .load import LoadReport, Weights, load_checkpoint, load_encoder, open_pretrained, open_weights

__all__ = ["LoadReport", "Weights", "load_checkpoint", "load_encoder", "open_pretrained", "open_weights"]
