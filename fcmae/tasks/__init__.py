"""The tasks, each in the same shape: ``tasks/<task>/`` with ``config`` (its fields, recipe and
presets), ``model``, ``loop`` (the training loop over fcmae.training), ``evaluation``, ``artifact``
(what it saves, how it loads back and exports; its artifact kind registered in
fcmae.weights.artifacts) and ``predict``. A new task is a copy of one folder (docs/architecture.md)."""

from __future__ import annotations

import importlib

TASKS = ("pretrain", "classify", "segment", "detect")


def register_all() -> None:
    """Import every task, so that every artifact kind (and its prediction) is registered."""
    for task in TASKS:
        importlib.import_module(f"fcmae.tasks.{task}")
