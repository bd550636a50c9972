"""UPerNet semantic segmentation on a ConvNeXt (V2) encoder: the network, the pretrained encoder's
load, the loss and the layer-wise lr decay.

The network is transformers' ``UperNetForSemanticSegmentation`` with a ``ConvNextV2Backbone`` built
from fcmae's registered sizes: the four stage outputs (strides 4..32), each through a LayerNorm
(``hidden_states_norms``, as the official ConvNeXt segmentation backbone adds), into a UPerHead
(pyramid pooling 1, 2, 3, 6) and an auxiliary FCN head on stage 3 (mmseg's ConvNeXt UPerNet configs).
A pretrained fcmae encoder is loaded strictly into the backbone; the exported folder is plain
transformers (``AutoModelForSemanticSegmentation.from_pretrained``).

Two mmseg details transformers' UperNet lacks are added as hooks, so parameter names stay transformers'
own: Dropout2d(0.1) before each head's classifier, and the auxiliary logits kept for the loss (its
forward only returns them inside its own loss, whose normalisation is not mmseg's; see
``segmentation_loss``).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ...models import CONFIGS, create_model
from ...training.layer_decay import lr_scale_fn
from ...weights import LoadReport, load_checkpoint, open_pretrained
from ...weights.convert import HF_RENAMES, rename_keys
from ...weights.formats import to_transformers_state_dict

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
STAGES = ["stage1", "stage2", "stage3", "stage4"]
OUTPUT_NORMS = "hidden_states_norms."  # the per-stage LayerNorms: fresh, not part of a pretrained encoder
AUX_LOGITS = "_train_logits"


def build_segmenter(
    model_name: str,
    num_classes: int,
    head_channels: int = 512,
    drop_path: float = 0.0,
    aux_weight: float = 0.4,
    dropout: float = 0.1,
    class_names: list[str] | None = None,
):
    """A fresh ``transformers.UperNetForSemanticSegmentation`` for a registered ConvNeXt (V2, or V1).
    ``head_channels``: UPerHead width (512 in mmseg); auxiliary FCN head: 256 channels, one conv, on
    stage 3. Nothing is downloaded: the backbone is built from its config."""
    from transformers import ConvNextConfig, ConvNextV2Config, UperNetConfig, UperNetForSemanticSegmentation

    cfg = CONFIGS.get(model_name)
    if cfg is None or len(cfg.depths) != 4 or cfg.stem_patch != 4:
        known = ", ".join(n for n, c in CONFIGS.items() if len(c.depths) == 4)
        raise ValueError(f"UPerNet needs a four-stage ConvNeXt; {model_name!r} is not one. Choose one of {known}.")
    names = class_names or [f"class {i}" for i in range(num_classes)]
    backbone = (ConvNextV2Config if cfg.grn else ConvNextConfig)(
        num_channels=3,
        patch_size=4,
        num_stages=4,
        depths=list(cfg.depths),
        hidden_sizes=list(cfg.dims),
        drop_path_rate=drop_path,
        layer_norm_eps=1e-6,
        out_features=STAGES,
    )  # 1e-6: ConvNeXt's eps everywhere
    config = UperNetConfig(
        backbone_config=backbone,
        num_labels=num_classes,
        hidden_size=head_channels,
        pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=True,
        auxiliary_in_channels=cfg.dims[2],
        auxiliary_channels=256,
        auxiliary_num_convs=1,
        auxiliary_concat_input=False,
        auxiliary_loss_weight=aux_weight,
        loss_ignore_index=IGNORE_INDEX,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    net = UperNetForSemanticSegmentation(config)
    net.fcmae_model_name = model_name
    for head in (net.decode_head, net.auxiliary_head):
        if dropout > 0:  # mmseg BaseDecodeHead: Dropout2d(0.1) on the features before conv_seg
            head.classifier.register_forward_pre_hook(functools.partial(_dropout2d, p=dropout))
    net.auxiliary_head.register_forward_hook(_keep_train_logits)
    return net


def block_classes() -> tuple[type, ...]:
    """The backbone's block classes (transformers' ConvNeXt V1/V2 layers): the units FSDP shards."""
    from transformers.models.convnext.modeling_convnext import ConvNextLayer
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2Layer

    return ConvNextV2Layer, ConvNextLayer


def _dropout2d(module, args, p):
    return (F.dropout2d(args[0], p, module.training),)


def _keep_train_logits(module, args, output):
    if module.training:
        setattr(module, AUX_LOGITS, output)


def model_name_of(segmenter) -> str:
    """The registered fcmae model a segmenter's backbone is (by depths, widths, V1/V2)."""
    if getattr(segmenter, "fcmae_model_name", None):
        return segmenter.fcmae_model_name
    bc = segmenter.config.backbone_config
    grn = bc.model_type == "convnextv2"
    for name, cfg in CONFIGS.items():
        if list(cfg.depths) == list(bc.depths) and list(cfg.dims) == list(bc.hidden_sizes) and cfg.grn == grn:
            return name
    raise ValueError(f"No registered ConvNeXt has depths {bc.depths} and widths {bc.hidden_sizes}.")


# ----------------------------------------------------------------------------- the pretrained encoder


def load_encoder_into(segmenter, source) -> LoadReport:
    """Load a pretrained encoder into the segmenter's backbone, strictly.

    ``source``: anything ``fcmae.load_checkpoint`` reads (fcmae encoder or FCMAE checkpoint, timm,
    transformers, official layouts; a path, a folder, ``hf-hub:``, or a state dict). Every backbone
    weight except the per-stage output norms (fresh) comes from the source; its classifier and final
    norm are left out. Another architecture raises ``ValueError`` naming both models.
    Returns the ``LoadReport``: ``missing`` = the fresh output norms, ``ignored`` = source keys not used."""
    name = model_name_of(segmenter)
    encoder = create_model(name, num_classes=0)  # the dense ConvNeXt, fcmae's names
    try:
        report = load_checkpoint(encoder, source)
    except ValueError as e:
        raise ValueError(f"The pretrained encoder does not fit the segmenter's backbone ({name}): {e}") from None
    had_final_norm = not any(k.startswith("head.norm.") for k in report.missing)
    weights = {k: v for k, v in to_transformers_state_dict(encoder).items() if not k.startswith("layernorm.")}
    own = segmenter.backbone.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith(OUTPUT_NORMS)]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:  # the rename tables and transformers' backbone disagree: a bug, not a user error
        raise RuntimeError(
            f"fcmae -> transformers backbone names do not match: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    segmenter.backbone.load_state_dict(weights, strict=False)
    report.missing = [f"backbone.{k}" for k in own if k.startswith(OUTPUT_NORMS)]
    report.ignored += ["head.norm.weight", "head.norm.bias"] if had_final_norm else []
    log.info("%s", report)
    return report


# ----------------------------------------------------------------------------- loss


def segmentation_loss(
    logits: torch.Tensor,
    aux_logits: torch.Tensor | None,
    labels: torch.Tensor,
    aux_weight: float = 0.4,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Cross-entropy of the main logits + ``aux_weight`` x that of the auxiliary logits, both resized
    (bilinear, align_corners=False) to the label size. As mmseg's CrossEntropyLoss (avg_non_ignore=False,
    the default the official ConvNeXt configs use): summed over labelled pixels, divided by all pixels.
    transformers' UperNet loss divides by the labelled pixels instead (a NaN when a batch has none),
    hence this one. Logits (B, K, h, w), labels (B, H, W) long with ``ignore_index``."""

    def ce(x):
        if x.shape[-2:] != labels.shape[-2:]:
            x = F.interpolate(x, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(x.float(), labels, ignore_index=ignore_index, reduction="sum") / labels.numel()

    loss = ce(logits)
    return loss + aux_weight * ce(aux_logits) if aux_logits is not None else loss


def train_loss(model, net, images: torch.Tensor, labels: torch.Tensor, aux_weight: float = 0.4) -> torch.Tensor:
    """Forward ``model`` (the segmenter, or its DDP / compiled wrapper) in training mode and return the
    loss. ``net`` is the unwrapped segmenter, whose auxiliary head kept its logits during the forward."""
    logits = model(pixel_values=images).logits
    return segmentation_loss(logits, net.auxiliary_head.__dict__.pop(AUX_LOGITS, None), labels, aux_weight)


# ----------------------------------------------------------------------------- optimiser


def lr_scale(segmenter, layer_decay: float, decay_type: str = "stage"):
    """Layer-wise lr decay of the backbone: ``stage`` (mmseg's ``stage_wise`` ConvNeXt rule, which the
    official ConvNeXt UPerNet configs use), ``single`` or ``group`` (fcmae.training.layer_decay) on
    the backbone's fcmae names; the heads and the per-stage output norms get 1."""
    return lr_scale_fn(CONFIGS[model_name_of(segmenter)].depths, layer_decay, decay_type, encoder_name)


def encoder_name(name: str) -> str | None:
    """The fcmae name of a transformers backbone parameter; None outside the encoder."""
    if not name.startswith("backbone.") or name.startswith("backbone." + OUTPUT_NORMS):
        return None
    return next(iter(rename_keys({name.removeprefix("backbone."): None}, HF_RENAMES)))


def set_grad_checkpointing(segmenter) -> None:
    """Recompute each backbone block's activations in the backward pass (transformers' ConvNeXt V2 has
    no gradient checkpointing of its own): every ConvNeXt layer's forward runs under torch's
    non-reentrant checkpoint. The heads work on the stride-4..32 maps once and are left as they are."""
    from torch.utils.checkpoint import checkpoint

    for layer in segmenter.backbone.modules():
        if isinstance(layer, block_classes()):
            layer.forward = functools.partial(_checkpointed, checkpoint, layer.forward)


def _checkpointed(checkpoint, forward, *args, **kwargs):
    return (
        checkpoint(forward, *args, use_reentrant=False, **kwargs)
        if torch.is_grad_enabled()
        else forward(*args, **kwargs)
    )


def build(cfg, names: list[str]):
    """(segmenter, encoder LoadReport or None): ``cfg.model`` (or the source's) with the encoder of
    ``cfg.from_fcmae`` loaded strictly; the heads and per-stage output norms fresh."""
    weights, name = open_pretrained(cfg.from_fcmae, cfg.model)
    net = build_segmenter(name, len(names), cfg.head_channels, cfg.drop_path, cfg.aux_weight, class_names=names)
    try:
        report = load_encoder_into(net, weights) if weights is not None else None
    except ValueError as e:
        raise ValueError(f"--from-fcmae {cfg.from_fcmae}: {e}") from None
    if cfg.grad_checkpointing:
        set_grad_checkpointing(net)
    return net, report
