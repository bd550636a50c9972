"""FCMAE pretraining: ``config`` (fields, recipe, demo), ``model`` (the FCMAE and its initialisation),
``loop`` (the training loop), ``evaluation`` (k-NN monitor, reconstructions), ``artifact`` (encoder
and FCMAE files, features), ``predict`` (reconstructions of given images). The ``encoder`` and
``fcmae`` artifact kinds (fcmae.weights.hub) get this task's prediction and features."""

from ...weights.artifacts import attach
from . import predict
from .artifact import features
from .config import DEMO, PretrainConfig, choose_preset
from .loop import main, pretrain

attach("encoder", predict=predict.main, features=features)
attach("fcmae", predict=predict.main, features=features)

__all__ = ["DEMO", "PretrainConfig", "choose_preset", "main", "pretrain"]
