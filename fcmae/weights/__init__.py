"""Weights: find a source, recognise its layout, load it strictly, and write exports."""
from .convert import LoadReport, load_checkpoint

__all__ = ["LoadReport", "load_checkpoint"]
