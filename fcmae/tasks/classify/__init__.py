"""Image classification: ``config`` (fields, recipe, linear-probe preset), ``model`` (the classifier
from an encoder, layer decay, loss), ``loop`` (fine-tuning and --eval-only), ``evaluation``
(top-1/5), ``artifact`` (weights, metadata, load-back, features), ``predict`` (top-5 of images).
The ``classifier`` artifact kind (fcmae.weights.hub) gets this task's prediction and features."""

from ...weights.artifacts import attach
from . import predict
from .artifact import features, load_classifier
from .config import LINEAR_PROBE, FinetuneConfig, choose_preset
from .loop import finetune, main
from .model import build_classifier

attach("classifier", predict=predict.main, features=features)

__all__ = ["LINEAR_PROBE", "FinetuneConfig", "build_classifier", "choose_preset", "finetune", "load_classifier", "main"]
