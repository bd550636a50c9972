"""Layer-wise learning-rate decay for ConvNeXt fine-tuning (official ConvNeXt V2 code).

Every parameter gets a layer id; its learning rate is scaled by
``decay ** (num_layers + 1 - layer_id)``, so the head trains at the full rate and the stem at the
smallest. Two ways of numbering, as in the official ConvNeXt V2 code:

- ``single`` (atto..tiny): every block is a layer, ``num_layers = sum(depths)``. The stem and each
  downsample share the id of the first block of their stage; the final norm and the head get
  ``num_layers + 1`` (scale 1).
- ``group`` (base and larger): 12 groups, ``num_layers = 12``. Stem 0; stage 1 -> 1; downsample 1
  and stage 2 -> 2; downsample 2 -> 3; stage-3 block b -> 3 + b // 3; downsample 3 and stage 4 ->
  12; final norm and head 13.

Names are fcmae's (timm's): ``stem.*``, ``stages.i.downsample.*``, ``stages.i.blocks.j.*``, ``head.*``.
Weight decay exempts 1-D parameters, biases, GRN weight/bias and layer scale.
"""
from __future__ import annotations

import re

from torch import nn

from .optim import NO_DECAY_NAMES

_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample\.")
_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


def num_layers(depths, decay_type: str) -> int:
    if decay_type == "single":
        return sum(depths)
    if decay_type == "group":
        return 12
    raise ValueError(f"layer_decay_type must be 'single' or 'group'; got {decay_type!r}.")


def layer_id(name: str, depths, decay_type: str) -> int:
    """The layer id of parameter ``name`` in a ConvNeXt with stage depths ``depths``."""
    n = num_layers(depths, decay_type)
    stage, block = None, None
    if name.startswith("stem."):
        stage = 0
    elif m := _DOWNSAMPLE.match(name):
        stage = int(m.group(1))
    elif m := _BLOCK.match(name):
        stage, block = int(m.group(1)), int(m.group(2))
    if stage is None:  # final norm, head, anything after the last stage
        return n + 1
    if decay_type == "single":
        return sum(depths[:stage]) + (block or 0) + 1
    if len(depths) != 4 or depths[2] > 27:
        raise ValueError(f"layer_decay_type 'group' is defined for four-stage ConvNeXts with at most 27 blocks in "
                         f"stage 3 (base and larger); this model has depths {tuple(depths)}. Use 'single'.")
    if block is None:  # the stem, or the downsample in front of stage `stage`
        return {0: 0, 1: 2, 2: 3, 3: 12}[stage]
    return {0: 1, 1: 2, 2: 3 + block // 3, 3: 12}[stage]


def lr_scales(model: nn.Module, decay: float, decay_type: str) -> dict[str, float]:
    """``{parameter name: lr scale}`` for every parameter of ``model``."""
    depths = list(model.cfg.depths)
    n = num_layers(depths, decay_type)
    return {name: decay ** (n + 1 - layer_id(name, depths, decay_type)) for name, _ in model.named_parameters()}


def exempt_from_weight_decay(name: str, p) -> bool:
    return p.ndim <= 1 or name.endswith(".bias") or any(s in name for s in NO_DECAY_NAMES)


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                             decay_type: str = "single") -> list[dict]:
    """Optimizer groups keyed by (lr scale, decayed or not), each with ``lr_scale`` (which
    ``fcmae.optim.set_lr`` applies) and ``weight_decay``. Frozen parameters are left out."""
    scales = lr_scales(model, layer_decay, decay_type)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = exempt_from_weight_decay(name, p)
        key = (scales[name], exempt)
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": scales[name], "weight_decay": 0.0 if exempt else weight_decay}
        groups[key]["params"].append(p)
    return list(groups.values())
