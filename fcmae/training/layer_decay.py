"""Layer-wise learning-rate decay of a ConvNeXt encoder: every encoder parameter gets a layer id
``i`` out of ``L`` and its lr is scaled by ``decay ** (L + 1 - i)``, so the head trains at the full
rate and the stem at the smallest. The numberings the ConvNeXt papers' codebases use:

- ``single`` (official ConvNeXt V2 fine-tuning, atto..tiny): every block is a layer, ``L = sum(depths)``.
  The stem and each downsample share the id of the first block of their stage; after the last
  stage (final norm, head) ``L + 1``.
- ``group`` (official fine-tuning, base and larger): ``L = 12``. Stem 0; stage 1 -> 1; downsample 1
  and stage 2 -> 2; downsample 2 -> 3; stage-3 block b -> 3 + b // 3; downsample 3 and stage 4 -> 12;
  after it 13.
- ``stage`` (mmsegmentation's ``stage_wise`` rule of the ConvNeXt UPerNet configs): ``L`` is 6 for
  stage-3 depth <= 9 (T), else 12; stem and downsamples 0, stage-i blocks i + 1.
- ``layer_wise`` (mmdetection's ``LearningRateDecayOptimizerConstructor``, the ConvNeXt Mask R-CNN
  configs and mmdetection's ConvNeXt-V2 project): the ``group`` ids with ``L = 3 + ceil(d3 / 3)``
  (12 for base, 6 for tiny), stage 4 -> L, after it L + 1.

Names are fcmae's (timm's): ``stem.*``, ``stages.i.downsample.*``, ``stages.i.blocks.j.*``, ``head.*``.
A task whose encoder lives under another name (a detector's ``backbone.body.``, a transformers
backbone) passes ``encoder_name`` to map its parameter names to these; others get scale 1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

_DOWNSAMPLE = re.compile(r"^stages\.(\d+)\.downsample\.")
_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")
DECAY_TYPES = ("single", "group", "stage", "layer_wise")


def num_layers(depths, decay_type: str) -> int:
    if decay_type == "single":
        return sum(depths)
    if decay_type == "group":
        return 12
    if decay_type == "stage":
        return 6 if depths[2] <= 9 else 12
    if decay_type == "layer_wise":
        return 3 + math.ceil(depths[2] / 3)
    raise ValueError(f"layer_decay_type must be one of {', '.join(DECAY_TYPES)}; got {decay_type!r}.")


def _position(name: str) -> tuple[int | None, int | None]:
    """(stage, block) of an encoder parameter: block None for the stem and downsamples, stage None after
    the last stage (final norm, head)."""
    if name.startswith("stem."):
        return 0, None
    if m := _DOWNSAMPLE.match(name):
        return int(m.group(1)), None
    if m := _BLOCK.match(name):
        return int(m.group(1)), int(m.group(2))
    return None, None


def layer_id(name: str, depths, decay_type: str) -> int:
    """The layer id of encoder parameter ``name`` in a ConvNeXt with stage depths ``depths``."""
    n = num_layers(depths, decay_type)
    stage, block = _position(name)
    if stage is None:
        return n + 1
    if decay_type == "single":
        return sum(depths[:stage]) + (block or 0) + 1
    if decay_type == "stage":
        return 0 if block is None else stage + 1
    if len(depths) != 4 or depths[2] > 27:
        raise ValueError(
            f"layer_decay_type {decay_type!r} is defined for four-stage ConvNeXts with at most 27 blocks "
            f"in stage 3 (base and larger); this model has depths {tuple(depths)}. Use 'single'."
        )
    group = {0: 0, 1: 2, 2: 3, 3: 12}[stage] if block is None else {0: 1, 1: 2, 2: 3 + block // 3, 3: 12}[stage]
    return {12: n, 13: n + 1}.get(group, group) if decay_type == "layer_wise" else group


def lr_scale_fn(
    depths, decay: float, decay_type: str, encoder_name: Callable[[str], str | None] = lambda name: name
) -> Callable[[str], float]:
    """``name -> lr scale`` for ``fcmae.training.optim.param_groups``: ``decay ** (L + 1 - id)`` for
    encoder parameters (``encoder_name(name)`` gives their fcmae name, None for the rest, which get 1)."""
    depths, n = list(depths), num_layers(depths, decay_type)

    def scale(name: str) -> float:
        own = encoder_name(name)
        return 1.0 if own is None else decay ** (n + 1 - layer_id(own, depths, decay_type))

    return scale
