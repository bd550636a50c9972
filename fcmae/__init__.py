"""fcmae: FCMAE pretraining of ConvNeXt V2, fine-tuning, and publishing."""
from .models import ConvNeXt, create_model, list_models, register_model

__version__ = "0.1.0"
__all__ = ["ConvNeXt", "create_model", "list_models", "register_model", "__version__"]
