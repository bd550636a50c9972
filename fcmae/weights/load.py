"""Loading weights strictly: read a source once, convert it to fcmae's names once, load it into a
model, and report what was loaded and what was deliberately left out."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapt import adapt_stem, stem_channels
from .convert import convert_state_dict, describe_architecture, infer_model_name
from .source import find_weights, read_metadata

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
HEAD_KEYS = ("head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias")


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did: the layout it recognised and what it left out, and why."""

    layout: str
    missing: list[str] = field(default_factory=list)  # allowed only: head of an encoder-only source
    ignored: list[str] = field(default_factory=list)  # source keys deliberately not loaded (decoder, ...)
    adapted: str | None = None  # how the stem was fitted to the model's in_chans, if it was

    def __str__(self) -> str:
        s = f"loaded {self.layout} checkpoint"
        if self.adapted:
            s += f"; {self.adapted}"
        if self.missing:
            s += f"; kept fresh (not in checkpoint): {', '.join(self.missing)}"
        if self.ignored:
            s += f"; ignored {len(self.ignored)} source keys ({_summarise(self.ignored)})"
        return s


def _summarise(keys: list[str]) -> str:
    tops = sorted({k.split(".")[0] for k in keys})
    return ", ".join(tops[:6]) + (", ..." if len(tops) > 6 else "")


def read_state_dict(source, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a path (.safetensors, or a pickle read with ``weights_only=True``), a directory
    holding an exported model, an ``hf-hub:owner/name`` id, or a dict; wrappers unwrapped."""
    if isinstance(source, (str, os.PathLike)):
        source = find_weights(source)
        if source.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(source))
        else:
            try:  # the official training checkpoints keep their argparse.Namespace of args next to the weights
                with torch.serialization.safe_globals([argparse.Namespace]):
                    obj = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(
                    f"Could not read checkpoint {source}: {e}. fcmae reads safetensors files and "
                    "PyTorch pickles of plain types (weights_only=True)."
                ) from e
    else:
        obj = source
    if not isinstance(obj, dict):
        raise TypeError(f"A checkpoint must hold a dict of tensors, got {type(obj).__name__}.")
    order = ("model_ema",) + WRAPPER_KEYS if use_ema else WRAPPER_KEYS
    while not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in order if isinstance(obj.get(k), dict)), None)
        if inner is None:
            raise ValueError(f"No tensors found in checkpoint (top-level keys: {sorted(obj)[:10]}).")
        obj = inner
    sd = {
        k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items() if isinstance(v, torch.Tensor)
    }
    return sd


@dataclass
class Weights:
    """A source read and converted once: its file, layout, encoder tensors in fcmae's names, the
    source keys that belong to no encoder part (an FCMAE decoder), and its safetensors metadata."""

    source: str
    path: Path | None
    layout: str
    state_dict: dict[str, torch.Tensor]
    ignored: list[str]
    metadata: dict[str, str]

    def model_name(self, what: str = "the checkpoint") -> str:
        return infer_model_name(self.state_dict, self.metadata, what)


def open_weights(source, use_ema: bool = False, names: tuple[str, ...] | None = None) -> Weights:
    """Read ``source`` (see ``read_state_dict``; ``names``: the files to look for in a directory)."""
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = find_weights(source, names) if names else find_weights(source)
    layout, sd, ignored = convert_state_dict(read_state_dict(path or source, use_ema=use_ema))
    return Weights(
        str(source) if path else "<state dict>", path, layout, sd, ignored, read_metadata(path) if path else {}
    )


def load_checkpoint(
    model: nn.Module, source, *, drop_head: bool = False, use_ema: bool = False, adapt_in_chans: bool = False
) -> LoadReport:
    """Load ``source`` into a ``ConvNeXt`` strictly, whatever its layout.

    ``source``: a file path, a directory with an exported model, ``hf-hub:owner/name[@rev]``, a
    ``Weights`` from ``open_weights``, or a state dict (wrappers ``model`` / ``state_dict`` /
    ``model_ema`` unwrapped). A missing head and final norm are allowed only when the source has no
    head at all (an encoder-only checkpoint);
    ``drop_head=True`` discards the source's classifier (for a new class count). Anything else
    missing, unexpected or mis-shaped raises ``ValueError`` listing the keys. ``adapt_in_chans=True``
    lets an RGB stem load into a model built with another ``in_chans``, adapted as timm's
    ``adapt_input_conv`` does (``fcmae.weights.adapt.adapt_stem``).
    """
    w = source if isinstance(source, Weights) else open_weights(source, use_ema=use_ema)
    layout, sd, ignored = w.layout, dict(w.state_dict), list(w.ignored)
    own = model.state_dict()
    adapted = None
    if adapt_in_chans:
        sd, adapted = adapt_stem(sd, stem_channels(own) or 3)
    fc = [k for k in ("head.fc.weight", "head.fc.bias") if k in sd]
    if fc and (drop_head or "head.fc.weight" not in own):
        ignored += fc  # a feature extractor (num_classes=0) or a new classifier: the source's fc is not wanted
        sd = {k: v for k, v in sd.items() if k not in fc}
    if not any(k.startswith("head.") for k in own):  # a feature extractor: the source's final norm is not wanted
        ignored += [k for k in sd if k.startswith("head.")]
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    has_head = any(k.startswith("head.") for k in sd)
    missing = [k for k in own if k not in sd]
    allowed = [k for k in missing if (k in HEAD_KEYS and not has_head) or (drop_head and k.startswith("head.fc."))]
    missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sd
        if k in own and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(_misfit(model, sd, own, layout, drop_head, missing, unexpected, shapes))
    model.load_state_dict(sd, strict=False)
    report = LoadReport(layout, missing=allowed, ignored=ignored, adapted=adapted)
    log.info("%s", report)
    return report


def _misfit(model, sd: dict, own: dict, layout: str, drop_head: bool, missing, unexpected, shapes) -> str:
    """The message of a checkpoint that does not fit the model: the keys, and the fix."""
    src_arch, own_arch = describe_architecture(sd), getattr(model, "name", None) or type(model).__name__
    msg = [f"Checkpoint ({layout} layout) does not fit the model: it holds {src_arch}, the model is {own_arch}."]
    titled = (
        ("missing from checkpoint", missing),
        ("unexpected in checkpoint", unexpected),
        ("shape mismatch", shapes),
    )
    for title, keys in titled:
        if keys:
            msg.append(f"{title} ({len(keys)}): " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
    src_c, own_c = stem_channels(sd), stem_channels(own)
    if src_c and own_c and src_c != own_c:
        fix = (
            "pass adapt_in_chans=True to adapt the RGB stem as timm does (adapt_input_conv)"
            if src_c == 3
            else f"create the model with in_chans={src_c}"
        )
        msg.append(f"The checkpoint's stem takes {src_c} input channels, the model's {own_c}: {fix}.")
    other = "" if drop_head else ", or pass drop_head=True to replace only the classifier"
    msg.append(f"Create the model that matches the checkpoint (fcmae.list_models() lists them){other}.")
    return "\n".join(msg)


def load_encoder(model: nn.Module, source, what: str = "--from-fcmae") -> LoadReport:
    """Load a pretrained encoder into ``model`` strictly, except its head and final norm, which
    stay as the model created them (fresh; a source's own are discarded). An RGB stem is adapted to
    the model's ``in_chans`` (reported); another architecture raises ``ValueError`` naming both."""
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    try:
        report = load_checkpoint(model, source, drop_head=True, adapt_in_chans=True)
    except ValueError as e:
        raise ValueError(
            f"{what}: {e}\nPass the --model the checkpoint was trained as, or leave --model out to "
            "take the checkpoint's."
        ) from None
    model.load_state_dict(fresh_head, strict=False)
    kept = [k for k in fresh_head if k not in report.missing]
    report.ignored += [k for k in kept if k.startswith("head.norm.")]  # the source's final norm: not used
    report.missing = sorted(fresh_head)
    return report


def open_pretrained(source: str | None, model: str | None, what: str = "--from-fcmae") -> tuple[Weights | None, str]:
    """(the pretrained weights ``source`` names, or None; the model to build: ``model``, else the
    one the weights hold). Errors name ``what`` (the flag) and say how to fix it."""
    weights = None
    if source:
        try:
            weights = open_weights(source)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise type(e)(f"{what} {source}: {e}") from None
        model = model or weights.model_name(f"{what} {source}")
    if model is None:
        raise ValueError(f"Name the model: --model NAME (e.g. convnextv2_atto), or give {what} to take its model.")
    return weights, model
