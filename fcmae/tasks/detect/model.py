"""Mask R-CNN (or Faster R-CNN) on a ConvNeXt encoder, built from torchvision's detection models: the
network, the pretrained encoder's load and the layer-wise lr decay.

The backbone is the encoder's four stage outputs (strides 4, 8, 16, 32), each through its own
LayerNorm over channels, as the official ConvNeXt detection backbone adds them (ConvNeXt,
object_detection/mmdet/models/backbones/convnext.py, ``norm{i}``), then torchvision's
FeaturePyramidNetwork with a max-pooled fifth level. Everything after the backbone (RPN, RoIAlign,
box and mask heads, the loss and post-processing) is torchvision's own.

Layer-wise learning-rate decay follows mmdetection's ``LearningRateDecayOptimizerConstructor``
(``decay_type='layer_wise'``), the rule of the official ConvNeXt detection configs and of
mmdetection's ConvNeXt-V2 project: stem 0; stage 1 -> 1; downsample 1 and stage 2 -> 2;
downsample 2 -> 3; stage-3 block b -> 3 + b // 3; downsample 3 and stage 4 -> L; everything else
(the extra norms, FPN, heads) -> L + 1, scale 1; scale = decay ** (L + 1 - id). L is 12 in the
base config and 6 in the tiny one: L = 3 + ceil(stage-3 depth / 3), which gives both.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import initLevelMapper

from ...models import create_model
from ...models.layers import LayerNorm2d
from ...training.layer_decay import lr_scale_fn
from ...weights import LoadReport, Weights, load_checkpoint, open_pretrained, open_weights
from ...weights.adapt import adapt_stem

log = logging.getLogger(__name__)

FEATURES = ("0", "1", "2", "3")  # torchvision's names for the FPN levels; LastLevelMaxPool adds "pool"
STRIDES = (4, 8, 16, 32)  # of FEATURES
# 800 x 1333: the COCO test scale of torchvision, Detectron and the ConvNeXt detection configs
LONG_SIDE_RATIO = 1333 / 800


class ConvNeXtFPNBackbone(nn.Module):
    """ConvNeXt stage outputs -> LayerNorm each -> FPN (256 channels, 5 levels).

    ``forward(images (N, C, H, W))`` -> OrderedDict '0', '1', '2', '3', 'pool' of (N, 256, H/s, W/s)
    for s = 4, 8, 16, 32, 64, as torchvision's detection models expect; H and W multiples of 32
    (torchvision's transform pads batches to that).
    """

    def __init__(self, model_name: str, drop_path: float = 0.0, in_chans: int = 3, out_channels: int = 256):
        super().__init__()
        body = create_model(model_name, num_classes=0, drop_path_rate=drop_path, in_chans=in_chans)
        if len(body.feature_info) != 4:
            raise ValueError(
                f"Detection needs a hierarchical ConvNeXt with four stages (strides 4..32); "
                f"{model_name} has {len(body.feature_info)}. Choose a convnextv2_* or convnext_* model."
            )
        body.head = nn.Identity()  # a feature extractor: no final norm, so no parameter is left without a gradient
        self.body = body
        dims = [f["num_chs"] for f in body.feature_info]
        self.norms = nn.ModuleList(LayerNorm2d(d) for d in dims)
        self.fpn = FeaturePyramidNetwork(dims, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body.forward_intermediates(x)
        return self.fpn(OrderedDict((name, norm(f)) for name, norm, f in zip(FEATURES, self.norms, feats)))


def _to_float32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float32(v) for v in x)
    if isinstance(x, dict):
        return type(x)((k, _to_float32(v)) for k, v in x.items())
    return x


def _device_type(x) -> str | None:
    if isinstance(x, torch.Tensor):
        return x.device.type
    values = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    return next((t for t in map(_device_type, values) if t), None)


class _Float32:
    """Runs a torchvision detection head in float32, also under autocast. torchvision decodes boxes in
    the dtype of the regression output (``BoxCoder.decode_single`` casts the reference boxes to it):
    under bf16 autocast, anchors, proposals and detections land on a 4 px grid above 512 px and an
    8 px grid above 1024. The backbone and FPN, most of the compute, stay in the autocast dtype."""

    def forward(self, *args, **kwargs):
        with torch.autocast(_device_type(args) or "cpu", enabled=False):
            return super().forward(*_to_float32(args), **_to_float32(kwargs))


class Float32RPN(_Float32, RegionProposalNetwork):
    pass


class Float32RoIHeads(_Float32, RoIHeads):
    pass


HEAD_INITS = ("small", "torchvision")


def _check_args(num_classes: int, min_size: int, image_mean, image_std, in_chans: int, head_init: str) -> None:
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}; got {head_init!r}.")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and needs at least one object class; got {num_classes}.")
    if min_size < 32:
        raise ValueError(f"min_size (the evaluation short side) must be at least 32 px; got {min_size}.")
    if (image_mean is None) != (image_std is None) or (image_mean is None and in_chans != 3):
        raise ValueError(
            f"Give both image_mean and image_std ({in_chans} values each) for in_chans={in_chans}; "
            "the ImageNet defaults hold for RGB only."
        )


def roi_pool(output_size: int) -> MultiScaleRoIAlign:
    """torchvision's RoIAlign over the four finest FPN levels, its level scales set from the known
    strides. Left unset, torchvision infers them from the first batch it pools (feature size over the
    largest image height, rounded to a power of 2) and keeps them for good: a small image padded to
    a multiple of 32 rounds the wrong way (a 40 px high batch padded to 64 gives 1/2 for the stride-4
    level), so the levels each RoI was pooled from depended on the first batch the process saw, and a
    resumed run pooled differently from the uninterrupted one. mmdetection states the strides too
    (``featmap_strides=[4, 8, 16, 32]``)."""
    pool = MultiScaleRoIAlign(list(FEATURES), output_size=output_size, sampling_ratio=0)
    pool.scales = [1.0 / s for s in STRIDES]
    levels = [s.bit_length() - 1 for s in STRIDES]  # log2
    pool.map_levels = initLevelMapper(levels[0], levels[-1], pool.canonical_scale, pool.canonical_level)
    return pool


def _small_mask_logits(conv: nn.Module) -> None:
    """detectron2's init of the mask logits layer: N(0, 0.001), zero bias."""
    nn.init.normal_(conv.weight, std=0.001)
    nn.init.zeros_(conv.bias)


def build_detector(
    model_name: str,
    num_classes: int,
    min_size: int,
    masks: bool = True,
    drop_path: float = 0.0,
    in_chans: int = 3,
    max_size: int | None = None,
    image_mean=None,
    image_std=None,
    head_init: str = "small",
    **kwargs,
) -> MaskRCNN | FasterRCNN:
    """torchvision Mask R-CNN (``masks``) or Faster R-CNN on ``ConvNeXtFPNBackbone``, fresh weights.

    ``num_classes`` counts the background (torchvision's convention): K object classes -> K + 1.
    ``min_size`` is the evaluation scale (torchvision's name): the short side goes to ``min_size``, the
    long side to at most ``max_size`` (default ``min_size * 1333 / 800``, the COCO convention; mmdetection's
    LSJ config trains at 1024 and still evaluates at 800 x 1333). Training images are taken as the
    dataset hands them over (already jittered, fcmae.data.detection), as torchvision's references do
    with ``_skip_resize``; batches are padded to multiples of 32. ``kwargs`` go to torchvision's
    model (e.g. ``box_score_thresh``).
    Anchors 32..512 over the five levels, RoIAlign over the four finest, 512 sampled RoIs per image,
    score threshold 0.05, NMS 0.5, 100 detections, masks at 0.5: the ConvNeXt Mask R-CNN configs'
    values (torchvision's defaults for most). Not the same: torchvision's RoIAlign is not ``aligned``
    (mmdetection's is), and it applies hard NMS where mmdetection's ConvNeXt-V2 config uses soft-NMS.
    The RPN and RoI heads run in float32 under autocast (``_Float32``), as mmdetection keeps box
    decoding and losses in float32 under fp16. ``head_init`` 'small' draws the mask logits layer from
    N(0, 0.001) with zero bias, as detectron2 does, so every mask logit starts near 0 (mask loss log 2);
    'torchvision' keeps torchvision's (and mmdetection's) kaiming fan_out init, whose std sqrt(2 / K)
    grows as the class count K falls: with 3 classes the first mask loss is about 3.
    """
    _check_args(num_classes, min_size, image_mean, image_std, in_chans, head_init)
    backbone = ConvNeXtFPNBackbone(model_name, drop_path=drop_path, in_chans=in_chans)
    common = dict(
        min_size=min_size,
        max_size=max_size or round(min_size * LONG_SIDE_RATIO),
        image_mean=list(image_mean or IMAGENET_DEFAULT_MEAN),
        image_std=list(image_std or IMAGENET_DEFAULT_STD),
        rpn_anchor_generator=AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
        # sampling_ratio 0 (adaptive) and 1000 proposals per training image: the ConvNeXt Mask R-CNN
        # configs (mmdetection); torchvision's own models use 2 and 2000
        box_roi_pool=roi_pool(7),
        rpn_post_nms_top_n_train=1000,
        _skip_resize=True,
    )
    common.update(kwargs)
    if masks:
        detector = MaskRCNN(backbone, num_classes, **common, mask_roi_pool=roi_pool(14))
        if head_init == "small":
            _small_mask_logits(detector.roi_heads.mask_predictor.mask_fcn_logits)
    else:
        detector = FasterRCNN(backbone, num_classes, **common)
    # the same modules and parameter names, with a float32 forward (see _Float32)
    detector.rpn.__class__, detector.roi_heads.__class__ = Float32RPN, Float32RoIHeads
    return detector


def load_encoder_into(detector: nn.Module, source, use_ema: bool = False, what: str = "--from-fcmae") -> LoadReport:
    """Load a pretrained encoder (any source ``fcmae.load_checkpoint`` reads: an FCMAE run or its
    ``encoder.safetensors``, timm / transformers / official weights, ``hf-hub:``) into the backbone.

    The load is strict over the whole encoder; a source's final norm and classifier are reported
    under ``ignored`` (a feature extractor has neither). RGB weights for a backbone built with
    another ``in_chans`` get their stem adapted as timm's ``adapt_input_conv`` does. The FPN, the
    extra norms and the heads stay fresh. Another architecture raises ValueError naming both.
    """
    body = detector.backbone.body
    weights = source if isinstance(source, Weights) else open_weights(source, use_ema=use_ema)
    state, note = adapt_stem(weights.state_dict, body.in_chans)
    # load_checkpoint decides which head keys a source may lack, so load a complete model, then hand
    # over everything but the head, strictly
    dense = create_model(body.name, num_classes=0, in_chans=body.in_chans)
    try:
        report = load_checkpoint(dense, dataclasses.replace(weights, state_dict=state))
    except ValueError as e:
        raise ValueError(f"{what}: {e}\nBuild the detector with the model the checkpoint was trained as.") from None
    loaded = dense.state_dict()
    body.load_state_dict({k: v for k, v in loaded.items() if not k.startswith("head.")}, strict=True)
    if note:
        log.info("%s: %s", what, note)
    dropped = [k for k in loaded if k.startswith("head.") and k not in report.missing]
    return dataclasses.replace(report, missing=[], ignored=report.ignored + dropped)


def lr_scale(detector: nn.Module, layer_decay: float, decay_type: str = "layer_wise"):
    """mmdetection's 'layer_wise' ConvNeXt rule (or 'single', one id per block) on the encoder; the
    extra norms, FPN and heads get 1 (fcmae.training.layer_decay)."""
    return lr_scale_fn(detector.backbone.body.cfg.depths, layer_decay, decay_type, encoder_name)


def encoder_name(name: str) -> str | None:
    return name.removeprefix("backbone.body.") if name.startswith("backbone.body.") else None


def build(cfg, cats):
    """(detector, encoder LoadReport or None): the encoder of ``--from-fcmae`` loaded strictly."""
    weights, name = open_pretrained(cfg.from_fcmae, cfg.model)
    cfg.model = name
    net = build_detector(
        name, cats.num_classes, cfg.task.eval_size, masks=cfg.masks, drop_path=cfg.drop_path, head_init=cfg.head_init
    )
    if cfg.grad_checkpointing:  # the encoder's blocks; FPN and heads run once per level and are light
        net.backbone.body.set_grad_checkpointing(True)
    what = f"--from-fcmae {cfg.from_fcmae}"
    return net, (load_encoder_into(net, weights, what=what) if weights is not None else None)
