"""``load_checkpoint``: recognise a checkpoint's layout, rename it to fcmae's (timm's) names, load strictly.

Layouts understood (REFERENCE.md section 5): fcmae's own (also the ``encoder.`` part of an FCMAE
model), timm's (1x1-conv MLP of atto..nano included), transformers' ConvNext/ConvNextV2 (with or
without the classifier), the official dense layout (fine-tuned weights and the released
encoder-only ``*_fcmae.pt``), and the official MinkowskiEngine FCMAE training checkpoint.
Every conversion lives here, as rename tables plus a shape normalisation pass.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("model", "state_dict", "model_ema", "module")
DIR_FILES = ("model.safetensors", "encoder.safetensors", "best.safetensors", "fcmae.safetensors", "pytorch_model.bin",
             "model.pt", "model.pth", "checkpoint.pth", "checkpoint.pt")
HEAD_KEYS = ("head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias")

# (pattern, replacement) applied in order to every key; a layout is a list of these
HF_RENAMES = [  # transformers ConvNextV2 / ConvNext
    (r"^(convnextv2|convnext)\.", ""),
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.dwconv\.", ".conv_dw."), (r"\.layernorm\.", ".norm."),
    (r"\.pwconv1\.", ".mlp.fc1."), (r"\.pwconv2\.", ".mlp.fc2."),
    (r"\.grn\.", ".mlp.grn."), (r"\.layer_scale_parameter$", ".gamma"),
    (r"^layernorm\.", "head.norm."), (r"^classifier\.", "head.fc."),
]
OFFICIAL_RENAMES = [  # official dense code: ConvNeXt V1/V2 fine-tuned, released *_fcmae.pt, isotropic V1
    (r"^encoder\.", ""),
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.(\d)\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^blocks\.(\d+)\.", r"stages.0.blocks.\1."), (r"^stem\.(weight|bias)$", r"stem.0.\1"),
    (r"\.ln\.", "."), (r"\.linear\.", "."), (r"\.kernel$", ".weight"),
    (r"\.dwconv\.", ".conv_dw."), (r"\.pwconv1\.", ".mlp.fc1."), (r"\.pwconv2\.", ".mlp.fc2."),
    (r"\.grn\.gamma$", ".mlp.grn.weight"), (r"\.grn\.beta$", ".mlp.grn.bias"),
    (r"^norm\.", "head.norm."), (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
FCMAE_RENAMES = [(r"^encoder\.", "")]  # fcmae's FCMAE model: the encoder is a plain ConvNeXt


@dataclass
class LoadReport:
    """What ``load_checkpoint`` did: the layout it recognised and what it left out, and why."""

    layout: str
    missing: list[str] = field(default_factory=list)  # allowed only: head of an encoder-only source
    ignored: list[str] = field(default_factory=list)  # source keys deliberately not loaded (decoder, ...)

    def __str__(self) -> str:
        s = f"loaded {self.layout} checkpoint"
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
        source = resolve_path(str(source))
        if source.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(source))
        else:
            try:  # the official training checkpoints keep their argparse.Namespace of args next to the weights
                with torch.serialization.safe_globals([argparse.Namespace]):
                    obj = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"Could not read checkpoint {source}: {e}. fcmae reads safetensors files and "
                                 "PyTorch pickles of plain types (weights_only=True).") from e
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
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return sd


def resolve_path(source: str) -> Path:
    if source.startswith("hf-hub:"):
        return _hub_file(source.removeprefix("hf-hub:"))
    path = Path(source).expanduser()
    if path.is_dir():
        for name in DIR_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"No model file in directory {path}; expected one of {', '.join(DIR_FILES)}.")
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    return path


def _hub_file(repo_id: str) -> Path:
    """Download (or, with HF_HUB_OFFLINE=1, find in the local cache) a repo's model file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = repo_id.partition("@")
    offline = None
    for name in DIR_FILES:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision or None))
        except LocalEntryNotFoundError as e:  # first: a subclass of EntryNotFoundError in huggingface_hub >= 1.0
            offline = e
        except EntryNotFoundError:
            continue
    if offline is not None:
        raise FileNotFoundError(f"hf-hub:{repo_id}: no model file in the local cache and the Hub cannot be "
                                "reached (HF_HUB_OFFLINE set or no network).") from offline
    raise FileNotFoundError(f"hf-hub:{repo_id} holds none of {', '.join(DIR_FILES)}.")


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    keys = sd.keys()
    if any(k.startswith(("convnextv2.", "convnext.", "embeddings.")) for k in keys):
        return "transformers"
    if any(k.endswith(".kernel") for k in keys):
        return "official-minkowski"
    if any(k.startswith(("downsample_layers.", "encoder.downsample_layers.")) or re.match(r"blocks\.\d+\.dwconv", k)
           for k in keys):
        return "official"
    if any(k.startswith("encoder.stem.") for k in keys):
        return "fcmae-pretrain"
    if any(k.startswith("stem.") for k in keys):
        return "timm"  # also fcmae's own: the same names
    raise ValueError(f"Unrecognised checkpoint layout (first keys: {list(keys)[:5]}). fcmae reads its own, timm, "
                     "transformers ConvNext(V2) and the official ConvNeXt(V2) layouts.")


def rename_keys(sd: dict, table: list[tuple[str, str]]) -> dict:
    out = {}
    for k, v in sd.items():
        for pat, rep in table:
            k = re.sub(pat, rep, k)
        out[k] = v
    return out


def normalise_shapes(sd: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if ".grn." in k or (k.endswith(".bias") and v.ndim == 2 and v.shape[0] == 1) or k.endswith(".gamma"):
            v = v.reshape(-1)  # GRN (1,C) / (1,1,1,C), ME biases (1,C) -> (C,)
        elif ".mlp.fc" in k and v.ndim == 4:
            v = v.flatten(1)  # timm's 1x1-conv MLP (atto..nano) -> Linear
        elif layout == "official-minkowski" and k.endswith(".weight") and v.ndim in (2, 3):
            v = _minkowski_kernel(k, v)
        out[k] = v
    return out


def _minkowski_kernel(key: str, kernel: torch.Tensor) -> torch.Tensor:
    """MinkowskiEngine kernels enumerate offsets with the first spatial axis fastest:
    dense weight[o, i, h, w] = kernel[h + k * w, i, o]."""
    if ".conv_dw." in key:  # (k*k, C) -> (C, 1, k, k)
        k = int(kernel.shape[0] ** 0.5)
        return kernel.reshape(k, k, -1).permute(2, 1, 0).unsqueeze(1).contiguous()  # [w, h, c] -> [c, h, w]
    if ".downsample." in key and kernel.ndim == 3:  # (k*k, Cin, Cout) -> (Cout, Cin, k, k)
        k = int(kernel.shape[0] ** 0.5)
        return kernel.reshape(k, k, *kernel.shape[1:]).permute(3, 2, 1, 0).contiguous()
    return kernel  # Linear weights are already (out, in)


def convert_state_dict(sd: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """Rename any known layout to fcmae's ConvNeXt names. Returns (layout, encoder state dict,
    source keys that belong to no encoder part, e.g. an FCMAE decoder)."""
    layout = detect_layout(sd)
    if layout in ("official", "official-minkowski", "fcmae-pretrain"):
        encoder = ("encoder.", "downsample_layers.", "stages.", "stem.", "blocks.", "norm.", "head.")
        ignored = [k for k in sd if not k.startswith(encoder)]
        sd = {k: v for k, v in sd.items() if k.startswith(encoder)}
    else:
        ignored = []
    table = {"transformers": HF_RENAMES, "official": OFFICIAL_RENAMES, "official-minkowski": OFFICIAL_RENAMES, "fcmae-pretrain": FCMAE_RENAMES,
             "timm": []}[layout]
    return layout, normalise_shapes(rename_keys(sd, table), layout), ignored


def describe_architecture(sd: dict[str, torch.Tensor]) -> str:
    """Name the registered model a (converted) state dict belongs to, or describe its shape."""
    from ..models import CONFIGS

    depths, dims = [], []
    for i in range(8):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
        dims.append(sd[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0])
    grn = any(".mlp.grn." in k for k in sd)
    for name, cfg in CONFIGS.items():
        if list(cfg.depths) == depths and list(cfg.dims) == dims and cfg.grn == grn:
            return name
    return f"a ConvNeXt{' V2' if grn else ''} with depths {tuple(depths)} and dims {tuple(dims)}"


def load_checkpoint(model: nn.Module, source, *, drop_head: bool = False, use_ema: bool = False) -> LoadReport:
    """Load ``source`` into a ``ConvNeXt`` strictly, whatever its layout.

    ``source``: a file path, a directory with an exported model, ``hf-hub:owner/name[@rev]``, or a
    state dict (wrappers ``model`` / ``state_dict`` / ``model_ema`` unwrapped). A missing head and
    final norm are allowed only when the source has no head at all (an encoder-only checkpoint);
    ``drop_head=True`` discards the source's classifier (for a new class count). Anything else
    missing, unexpected or mis-shaped raises ``ValueError`` listing the keys.
    """
    layout, sd, ignored = convert_state_dict(read_state_dict(source, use_ema=use_ema))
    own = model.state_dict()
    fc = [k for k in ("head.fc.weight", "head.fc.bias") if k in sd]
    if fc and (drop_head or "head.fc.weight" not in own):
        ignored += fc  # a feature extractor (num_classes=0) or a new classifier: the source's fc is not wanted
        sd = {k: v for k, v in sd.items() if k not in fc}
    has_head = any(k.startswith("head.") for k in sd)
    missing = [k for k in own if k not in sd]
    allowed = [k for k in missing if k in HEAD_KEYS and not has_head or drop_head and k.startswith("head.fc.")]
    missing = [k for k in missing if k not in allowed]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        src_arch, own_arch = describe_architecture(sd), getattr(model, "name", None) or type(model).__name__
        msg = [f"Checkpoint ({layout} layout) does not fit the model: it holds {src_arch}, the model is {own_arch}."]
        for title, keys in (("missing from checkpoint", missing), ("unexpected in checkpoint", unexpected),
                            ("shape mismatch", shapes)):
            if keys:
                msg.append(f"{title} ({len(keys)}): " + ", ".join(keys[:12]) + (" ..." if len(keys) > 12 else ""))
        msg.append("Create the model that matches the checkpoint (fcmae.list_models() lists them)"
                   + ("" if drop_head else ", or pass drop_head=True to replace only the classifier") + ".")
        raise ValueError("\n".join(msg))
    model.load_state_dict(sd, strict=False)
    report = LoadReport(layout, missing=allowed, ignored=ignored)
    log.info("%s", report)
    return report
