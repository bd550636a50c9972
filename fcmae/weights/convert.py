"""Checkpoint layouts: recognise one and rename it to fcmae's (timm's) names.

Layouts understood: fcmae's own (also the ``encoder.`` part of an FCMAE
model), timm's (1x1-conv MLP of atto..nano included), transformers' ConvNext/ConvNextV2 (with or
without the classifier), the official dense layout (fine-tuned weights and the released
encoder-only ``*_fcmae.pt``), and the official MinkowskiEngine FCMAE training checkpoint.
Every conversion lives here, as rename tables plus a shape normalisation pass.
"""

from __future__ import annotations

import re

import torch

from ..models import CONFIGS, list_models

# (pattern, replacement) applied in order to every key; a layout is a list of these
HF_RENAMES = [  # transformers ConvNextV2 / ConvNext
    (r"^(convnextv2|convnext)\.", ""),
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.layernorm\.", ".norm."),
    (r"\.pwconv1\.", ".mlp.fc1."),
    (r"\.pwconv2\.", ".mlp.fc2."),
    (r"\.grn\.", ".mlp.grn."),
    (r"\.layer_scale_parameter$", ".gamma"),
    (r"^layernorm\.", "head.norm."),
    (r"^classifier\.", "head.fc."),
]
OFFICIAL_RENAMES = [  # official dense code: ConvNeXt V1/V2 fine-tuned, released *_fcmae.pt, isotropic V1
    (r"^encoder\.", ""),
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.(\d)\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^blocks\.(\d+)\.", r"stages.0.blocks.\1."),
    (r"^stem\.(weight|bias)$", r"stem.0.\1"),
    (r"\.ln\.", "."),
    (r"\.linear\.", "."),
    (r"\.kernel$", ".weight"),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.pwconv1\.", ".mlp.fc1."),
    (r"\.pwconv2\.", ".mlp.fc2."),
    (r"\.grn\.gamma$", ".mlp.grn.weight"),
    (r"\.grn\.beta$", ".mlp.grn.bias"),
    (r"^norm\.", "head.norm."),
    (r"^head\.(weight|bias)$", r"head.fc.\1"),
]
FCMAE_RENAMES = [(r"^encoder\.", "")]  # fcmae's FCMAE model: the encoder is a plain ConvNeXt


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    keys = sd.keys()
    if any(k.startswith(("convnextv2.", "convnext.", "embeddings.")) for k in keys):
        return "transformers"
    if any(k.endswith(".kernel") for k in keys):
        return "official-minkowski"
    if any(
        k.startswith(("downsample_layers.", "encoder.downsample_layers.")) or re.match(r"blocks\.\d+\.dwconv", k)
        for k in keys
    ):
        return "official"
    if any(k.startswith("encoder.stem.") for k in keys):
        return "fcmae-pretrain"
    if any(k.startswith("stem.") for k in keys):
        return "timm"  # also fcmae's own: the same names
    raise ValueError(
        f"Unrecognised checkpoint layout (first keys: {list(keys)[:5]}). fcmae reads its own, timm, "
        "transformers ConvNext(V2) and the official ConvNeXt(V2) layouts."
    )


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
    table = {
        "transformers": HF_RENAMES,
        "official": OFFICIAL_RENAMES,
        "official-minkowski": OFFICIAL_RENAMES,
        "fcmae-pretrain": FCMAE_RENAMES,
        "timm": [],
    }[layout]
    return layout, normalise_shapes(rename_keys(sd, table), layout), ignored


def describe_architecture(sd: dict[str, torch.Tensor]) -> str:
    """Name the registered model a (converted) state dict belongs to, or describe its shape."""
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


def infer_model_name(sd: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> str:
    """The registered model a converted state dict holds: its metadata's ``model``, else its shapes."""
    if metadata.get("model") in list_models():
        return metadata["model"]
    arch = describe_architecture(sd)
    if arch not in list_models():
        raise ValueError(
            f"{what} holds {arch}, which is no registered model: pass --model (one of "
            f"{', '.join(list_models('convnextv2_*'))}, ...)."
        )
    return arch
