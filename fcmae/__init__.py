"""fcmae: FCMAE pretraining of ConvNeXt V2, fine-tuning, and publishing."""
from .weights import LoadReport, load_checkpoint
from .version import __version__
from .models import FCMAE, ConvNeXt, create_fcmae, create_model, list_models, register_model

__all__ = ["FCMAE", "ConvNeXt", "LoadReport", "create_fcmae", "create_model", "list_models", "load_checkpoint",
           "register_model", "__version__"]
