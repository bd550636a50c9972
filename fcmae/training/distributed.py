"""How a run is distributed: replicated (DDP) or sharded (FSDP2), and its name as recorded."""
from __future__ import annotations

from accelerate import Accelerator


def accelerator_kwargs(wrap) -> dict:
    return {}


def shard_model(accelerator: Accelerator, model, wrap):
    return model


def distributed_name(accelerator: Accelerator) -> str:
    return str(accelerator.distributed_type.value)
