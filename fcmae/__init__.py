"""fcmae: FCMAE pretraining of ConvNeXt V2, fine-tuning, and publishing."""

from .models import FCMAE, ConvNeXt, create_fcmae, create_model, list_models, register_model
from .version import __version__
from .weights import LoadReport, load_checkpoint

__all__ = [
    "FCMAE",
    "ConvNeXt",
    "LoadReport",
    "__version__",
    "create_fcmae",
    "create_model",
    "list_models",
    "load_checkpoint",
    "register_model",
]
