from . import zoo  # noqa: F401  (registers the sizes)
from .convnext import Block, ConvNeXt, ConvNeXtConfig
from .fcmae import FCMAE, create_fcmae
from .registry import create_model, list_models, register_model
from .zoo import CONFIGS

__all__ = [
    "CONFIGS",
    "FCMAE",
    "Block",
    "ConvNeXt",
    "ConvNeXtConfig",
    "create_fcmae",
    "create_model",
    "list_models",
    "register_model",
]
