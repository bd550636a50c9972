"""The layouts an export writes, and the way back for a full FCMAE.

timm: fcmae's names are timm's, so the state dict only changes shape (atto..nano MLP as 1x1 convs),
checked against the timm model itself. transformers: the inverse of ``checkpoints.HF_RENAMES`` plus GRN as
(1, 1, 1, C), checked by a strict load into the transformers model. fcmae: the whole FCMAE (encoder +
decoder) and ``load_fcmae_weights``, which reads it back from a file, a folder or ``hf-hub:``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..models import create_fcmae
from .card import PAPER, flatten_config, read_run_info, redact
from .convert import OFFICIAL_RENAMES, convert_state_dict, normalise_shapes, rename_keys
from .files import save_safetensors, write_atomic_text
from .load import LoadReport, read_state_dict
from .source import find_weights

log = logging.getLogger(__name__)

DECODER_PARTS = ("proj.", "mask_token", "decoder.", "pred.")
_TO_HF = [  # the inverse of checkpoints.HF_RENAMES: fcmae (timm) names -> transformers ConvNext(V2)
    (r"^head\.norm\.", "layernorm."),
    (r"^head\.fc\.", "classifier."),
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
    (r"\.conv_dw\.", ".dwconv."),
    (r"\.norm\.", ".layernorm."),
    (r"\.mlp\.fc1\.", ".pwconv1."),
    (r"\.mlp\.fc2\.", ".pwconv2."),
    (r"\.mlp\.grn\.", ".grn."),
    (r"\.gamma$", ".layer_scale_parameter"),
]


def to_timm_state_dict(net) -> dict[str, torch.Tensor]:
    """fcmae's state dict in timm's shapes (atto..nano: MLP as 1x1 convs (out, in, 1, 1)), checked key by key
    against the timm model of the same name, built on the meta device (no memory, no init cost)."""
    import timm

    if not net.name or not timm.is_model(net.name):
        raise ValueError(f"timm has no model {net.name!r}: export it with --format transformers or fcmae.")
    with torch.device("meta"):
        ref = timm.create_model(net.name, num_classes=net.num_classes, in_chans=net.stem[0].in_channels).state_dict()
    sd = net.state_dict()
    if set(sd) != set(ref):
        raise RuntimeError(f"fcmae's {net.name} and timm's differ in parameter names: {sorted(set(sd) ^ set(ref))[:8]}")
    return {k: v.reshape(ref[k].shape) for k, v in sd.items()}  # reshape fails loudly on a size mismatch


def write_timm(net, out: Path, *, tag: str, license: str, label_names, input_size: int, crop_pct: float, mean, std):
    """model.safetensors + config.json as timm's push_to_hf_hub writes them, with every pretrained_cfg
    field set here (none inherited from timm's registry: its tag, license and test size are not ours).
    num_classes stays out of model_args: transformers' timm wrapper passes it as well (twice)."""
    in_chans = net.stem[0].in_channels
    pretrained_cfg = dict(
        tag=tag,
        custom_load=False,
        input_size=[in_chans, input_size, input_size],
        fixed_input_size=False,
        interpolation="bicubic",
        crop_pct=crop_pct,
        crop_mode="center" if crop_pct < 1 else "squash",
        mean=list(mean),
        std=list(std),
        num_classes=net.num_classes,
        pool_size=[input_size // net.total_stride] * 2,
        first_conv="stem.0",
        classifier="head.fc",
        license=license,
        **PAPER,
    )
    config = dict(
        architecture=net.name,
        num_classes=net.num_classes,
        num_features=net.num_features,
        global_pool="avg",
        model_args=dict(in_chans=in_chans),
        pretrained_cfg=pretrained_cfg,
    )
    if label_names:
        pretrained_cfg["label_names"] = config["label_names"] = list(label_names)
    # "model": fcmae's loaders name the architecture from it (timm ignores it)
    save_safetensors(to_timm_state_dict(net), out / "model.safetensors", metadata={"format": "pt", "model": net.name})
    write_atomic_text(out / "config.json", json.dumps(config, indent=2))


def to_transformers_state_dict(net) -> dict[str, torch.Tensor]:
    """fcmae names -> transformers ConvNext(V2) names; GRN to (1, 1, 1, C). The backbone is prefixed
    with ``convnextv2.`` / ``convnext.`` only when there is a classifier (…ForImageClassification)."""
    prefix = ("convnextv2." if net.cfg.grn else "convnext.") if net.num_classes else ""
    out = {}
    for k, v in rename_keys(net.state_dict(), _TO_HF).items():
        out[k if k.startswith("classifier.") else prefix + k] = v.reshape(1, 1, 1, -1) if ".grn." in k else v
    return out


def write_transformers(net, out: Path, *, label_names, input_size: int, crop_pct: float, mean, std) -> None:
    """A native ConvNextV2ForImageClassification (ConvNextV2Model if num_classes is 0) with
    layer_norm_eps 1e-6 (transformers' 1e-12 default is wrong for ConvNeXt). The converted weights
    are loaded strictly into the transformers model before it is saved, so a bad rename fails here."""
    import transformers

    if net.cfg.stem_patch != 4 or len(net.cfg.depths) != 4:
        raise ValueError(f"transformers has no isotropic ConvNeXt ({net.name}); export it with fcmae's own layout.")
    kind = "ConvNextV2" if net.cfg.grn else "ConvNext"
    n = net.num_classes
    names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(n)]
    config = getattr(transformers, f"{kind}Config")(
        num_channels=net.stem[0].in_channels,
        patch_size=4,
        num_stages=4,
        hidden_sizes=list(net.cfg.dims),
        depths=list(net.cfg.depths),
        layer_norm_eps=1e-6,
        drop_path_rate=0.0,
        image_size=input_size,
        id2label=dict(enumerate(names)),
        label2id={s: i for i, s in enumerate(names)},
    )
    hf = getattr(transformers, f"{kind}ForImageClassification" if n else f"{kind}Model")(config)
    hf.load_state_dict(to_transformers_state_dict(net), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out), safe_serialization=True)
    transformers.ConvNextImageProcessor(  # ConvNeXt eval: below 384 resize to size / crop_pct, crop; else warp
        size={"shortest_edge": input_size}, crop_pct=crop_pct, resample=3, image_mean=list(mean), image_std=list(std)
    ).save_pretrained(str(out))


# --------------------------------------------------------------------------- full FCMAE (encoder + decoder)
def fcmae_args_from_state_dict(sd: dict[str, torch.Tensor]) -> dict:
    """Decoder width, depth and patch size read off an FCMAE state dict (fcmae's names)."""
    depth = len({k.split(".")[1] for k in sd if k.startswith("decoder.")})
    stem = sd.get("encoder.stem.0.weight")
    in_chans = stem.shape[1] if stem is not None else 3  # pred has p*p*in_chans outputs
    return dict(
        decoder_dim=sd["proj.weight"].shape[0],
        decoder_depth=depth,
        patch_size=round((sd["pred.weight"].shape[0] / in_chans) ** 0.5),
    )


def write_fcmae(source: Path, net, out: Path, run, as_config: bool) -> dict:
    """fcmae.safetensors (the whole FCMAE, validated by a strict load) and its description."""
    if not source.is_file():
        raise FileNotFoundError(
            f"--format fcmae needs the full FCMAE (encoder + decoder): {source} does not exist. "
            "Pass the pretraining run directory or its fcmae.safetensors as --checkpoint."
        )
    _, sd = _fcmae_state_dict(source)
    args = fcmae_args_from_state_dict(sd)
    mae = create_fcmae(
        net.name, decoder_dim=args["decoder_dim"], decoder_depth=args["decoder_depth"], in_chans=net.in_chans
    )
    load_fcmae_weights(mae, sd)
    enc = net.state_dict()
    if any(not torch.equal(v, enc[k]) for k, v in mae.encoder.state_dict().items()):
        raise ValueError(
            f"The encoder in {source} differs from the exported model's weights (another step or "
            "run?): export them separately, or pass fcmae.safetensors itself as --checkpoint."
        )
    meta = run.metadata if source == run.path else read_run_info(source).metadata
    config = redact(flatten_config(json.loads(meta["config"]))) if "config" in meta else run.config
    args.update(mask_ratio=config.get("mask_ratio", 0.6), norm_pix_loss=config.get("norm_pix_loss", True))
    description = dict(
        library="fcmae",
        format="fcmae",
        architecture=net.name,
        weights="fcmae.safetensors",
        step=int(meta["step"]) if "step" in meta else None,
        fcmae_args=args,
    )
    metadata = {"format": "fcmae", "model": net.name, "config": json.dumps(config)}
    if "step" in meta:
        metadata["step"] = meta["step"]
    save_safetensors(mae.state_dict(), out / "fcmae.safetensors", metadata)
    write_atomic_text(out / ("config.json" if as_config else "fcmae_config.json"), json.dumps(description, indent=2))
    return args


def _fcmae_state_dict(source) -> tuple[str, dict[str, torch.Tensor]]:
    """(layout, FCMAE state dict in fcmae's names) from any layout load_checkpoint knows (ours, official)."""
    raw = read_state_dict(source)
    layout, enc, ignored = convert_state_dict(raw)
    dec = [k for k in ignored if k.startswith(DECODER_PARTS)]
    if not dec:
        raise ValueError(
            f"No FCMAE decoder in this checkpoint ({layout} layout, encoder only). To start a new "
            "pretraining from an encoder: fcmae.load_checkpoint(fcmae_model.encoder, source)."
        )
    decoder = normalise_shapes(
        rename_keys({k: raw[k] for k in dec}, OFFICIAL_RENAMES), layout
    )  # a no-op on fcmae's names
    return layout, {**{f"encoder.{k}": v for k, v in enc.items()}, **decoder}


def fcmae_file(source) -> Path:
    """The full FCMAE (encoder + decoder) file ``source`` means (see ``fcmae.weights.source``)."""
    return find_weights(source, names=("fcmae.safetensors",))


def load_fcmae_weights(fcmae_model, source) -> LoadReport:
    """Load a full FCMAE (encoder + decoder) strictly into ``fcmae_model`` (from ``create_fcmae``).

    ``source``: fcmae.safetensors, a folder holding it (a run directory or an export),
    ``hf-hub:OWNER/NAME[@rev]`` (fcmae.safetensors from the Hub or, offline, its cache), an official
    FCMAE training checkpoint, or a state dict. Weights only: optimizer and schedule start afresh."""
    layout, sd = _fcmae_state_dict(source if isinstance(source, dict) else read_state_dict(fcmae_file(source)))
    own = fcmae_model.state_dict()
    bad = (
        [f"missing: {k}" for k in own if k not in sd]
        + [f"unexpected: {k}" for k in sd if k not in own]
        + [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in sd.items()
            if k in own and v.shape != own[k].shape
        ]
    )
    if bad:
        raise ValueError(
            f"The FCMAE checkpoint does not fit the model ({fcmae_model.encoder.name}, decoder_dim "
            f"{fcmae_model.proj.out_channels}, decoder_depth {len(fcmae_model.decoder)}); the checkpoint "
            f"has {fcmae_args_from_state_dict(sd) if 'proj.weight' in sd else 'no decoder'}:\n"
            + "\n".join(bad[:12])
            + "\nCreate the FCMAE with the checkpoint's model and decoder sizes."
        )
    fcmae_model.load_state_dict(sd, strict=True)
    report = LoadReport(f"{layout} FCMAE (encoder + decoder)")
    log.info("%s", report)
    return report
