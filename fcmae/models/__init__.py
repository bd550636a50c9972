from .convnext import Block, ConvNeXt, ConvNeXtConfig
from .registry import create_model, list_models, register_model
from . import zoo  # noqa: F401  (registers the sizes)
from .zoo import CONFIGS
from .fcmae import FCMAE, create_fcmae

__all__ = ["FCMAE", "create_fcmae", "Block", "ConvNeXt", "ConvNeXtConfig", "CONFIGS", "create_model", "list_models", "register_model"]
