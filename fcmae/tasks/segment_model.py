"""UPerNet semantic segmentation on a ConvNeXt (V2) encoder, for ``finetune/segment.py``.

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

import argparse
import functools
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import CONFIGS, create_model
from ..training.config import exit_on_user_error
from ..training.layer_decay import exempt_from_weight_decay, layer_id, num_layers
from ..weights import LoadReport, load_checkpoint
from ..weights.convert import HF_RENAMES, rename_keys
from ..weights.files import write_atomic_text
from ..weights.formats import to_transformers_state_dict
from ..weights.source import find_weights, read_metadata

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
STAGES = ["stage1", "stage2", "stage3", "stage4"]
OUTPUT_NORMS = "hidden_states_norms."  # the per-stage LayerNorms: fresh, not part of a pretrained encoder
AUX_LOGITS = "_train_logits"
FORMAT = "fcmae-segmenter"  # safetensors metadata "format" of a fine-tuned segmenter
RUN_FILES = ("best.safetensors", "last.safetensors")  # a segmentation run's weights, in the order looked for
EXPORT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")


def build_segmenter(model_name: str, num_classes: int, head_channels: int = 512, drop_path: float = 0.0,
                    aux_weight: float = 0.4, dropout: float = 0.1, class_names: list[str] | None = None):
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
        num_channels=3, patch_size=4, num_stages=4, depths=list(cfg.depths), hidden_sizes=list(cfg.dims),
        drop_path_rate=drop_path, layer_norm_eps=1e-6, out_features=STAGES)  # 1e-6: ConvNeXt's eps everywhere
    config = UperNetConfig(
        backbone_config=backbone, num_labels=num_classes, hidden_size=head_channels, pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=True, auxiliary_in_channels=cfg.dims[2], auxiliary_channels=256, auxiliary_num_convs=1,
        auxiliary_concat_input=False, auxiliary_loss_weight=aux_weight, loss_ignore_index=IGNORE_INDEX,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
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
        raise RuntimeError(f"fcmae -> transformers backbone names do not match: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}.")
    segmenter.backbone.load_state_dict(weights, strict=False)
    report.missing = [f"backbone.{k}" for k in own if k.startswith(OUTPUT_NORMS)]
    report.ignored += ["head.norm.weight", "head.norm.bias"] if had_final_norm else []
    log.info("%s", report)
    return report


# ----------------------------------------------------------------------------- loss

def segmentation_loss(logits: torch.Tensor, aux_logits: torch.Tensor | None, labels: torch.Tensor,
                      aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
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

def backbone_lr_scale(name: str, depths, layer_decay: float, decay_type: str = "single") -> float:
    """lr scale of segmenter parameter ``name``: 1 outside the backbone and for the output norms.
    ``single`` / ``group``: fcmae's fine-tuning rules (``fcmae.training.layer_decay``) on the backbone's
    fcmae names. ``stage``: mmseg's ``stage_wise`` ConvNeXt rule, which the official ConvNeXt UPerNet
    configs use (num_layers 6 for 9 blocks in stage 3 (T), 12 for 27 (S, B, L)): stem and downsamples
    decay^(K+1), stage i blocks decay^(K-i)."""
    if not name.startswith("backbone.") or name.startswith("backbone." + OUTPUT_NORMS):
        return 1.0
    fname = next(iter(rename_keys({name.removeprefix("backbone."): None}, HF_RENAMES)))
    if decay_type == "stage":
        k = 6 if depths[2] <= 9 else 12
        parts = fname.split(".")
        stage_id = int(parts[1]) + 1 if parts[0] == "stages" and parts[2] == "blocks" else 0
        return layer_decay ** (k + 1 - stage_id)
    n = num_layers(depths, decay_type)
    return layer_decay ** (n + 1 - layer_id(fname, depths, decay_type))


def param_groups(segmenter, lr: float, weight_decay: float, layer_decay: float = 0.9,
                 decay_type: str = "single") -> list[dict]:
    """AdamW groups keyed by (lr scale, decayed or not), each with ``lr_scale``, ``lr`` (= lr x scale)
    and ``weight_decay``; 1-D parameters, biases and GRN are not decayed. Frozen parameters left out."""
    if decay_type not in ("single", "group", "stage"):
        raise ValueError(f"layer_decay_type must be single, group or stage; got {decay_type!r}.")
    depths = list(CONFIGS[model_name_of(segmenter)].depths)
    groups: dict[tuple[float, bool], dict] = {}
    for name, p in segmenter.named_parameters():
        if not p.requires_grad:
            continue
        scale = backbone_lr_scale(name, depths, layer_decay, decay_type)
        exempt = exempt_from_weight_decay(name, p)
        group = groups.setdefault((scale, exempt), {"params": [], "lr_scale": scale, "lr": lr * scale,
                                                    "weight_decay": 0.0 if exempt else weight_decay})
        group["params"].append(p)
    return list(groups.values())


# ----------------------------------------------------------------------------- outputs

def segmenter_metadata(model_name: str, class_names: list[str], input_size: int, head_channels: int,
                       **extra) -> dict[str, str]:
    """safetensors metadata of a fine-tuned segmenter: what ``load_segmenter`` needs to rebuild it."""
    meta = {"format": FORMAT, "model": model_name, "num_classes": str(len(class_names)),
            "class_names": json.dumps(list(class_names)), "input_size": str(input_size),
            "head_channels": str(head_channels)}
    return {**meta, **{k: str(v) for k, v in extra.items()}}


def segmenter_file(source: str | Path) -> Path:
    """The weights file ``source`` means: itself, or a segmentation run's best (else last) weights."""
    return find_weights(source, RUN_FILES)


def is_segmenter(source) -> bool:
    """Whether ``source`` (a file or a run directory, not ``hf-hub:``) holds a fine-tuned segmenter."""
    if str(source).startswith("hf-hub:"):
        return False
    try:
        return read_metadata(segmenter_file(source)).get("format") == FORMAT
    except (FileNotFoundError, ValueError):
        return False


def load_segmenter(source: str | Path):
    """(segmenter in eval mode, metadata) from a ``best.safetensors`` / ``last.safetensors`` written with
    ``segmenter_metadata``, or the run directory holding it; loaded strictly."""
    from safetensors.torch import load_file

    path = segmenter_file(source)
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fine-tuned fcmae segmenter (its metadata has no format {FORMAT!r}); pass "
                         "best.safetensors or last.safetensors of a segmentation run.")
    names = json.loads(meta["class_names"])
    net = build_segmenter(meta["model"], len(names), int(meta["head_channels"]), class_names=names)
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval(), meta


def export_transformers(segmenter, out_dir: str | Path, class_names: list[str], input_size: int) -> Path:
    """A folder ``transformers.AutoModelForSemanticSegmentation.from_pretrained`` loads as this UperNet
    (config with id2label / label2id, model.safetensors) with its image processor: transformers maps
    UperNet to SegformerImageProcessor (resize to input_size x input_size, bilinear, ImageNet mean/std),
    as the openmmlab/upernet-convnext-* repos ship. fcmae's own evaluation keeps the aspect ratio
    instead; the network is fully convolutional and takes either."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers import SegformerImageProcessor

    if len(class_names) != segmenter.config.num_labels:
        raise ValueError(f"{len(class_names)} class names for a model with {segmenter.config.num_labels} classes.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    segmenter.config.id2label = dict(enumerate(class_names))
    segmenter.config.label2id = {n: i for i, n in enumerate(class_names)}
    segmenter.save_pretrained(str(out))
    SegformerImageProcessor(size={"height": input_size, "width": input_size}, resample=2,  # PIL bilinear
                            image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD),
                            do_reduce_labels=False).save_pretrained(str(out))
    return out


def export_segmenter(checkpoint, out, *, overwrite: bool = False, repo_id: str | None = None,
                     license: str = "apache-2.0", datasets=()) -> Path:
    """Write ``out``: the transformers folder of ``export_transformers`` and a README.md model card, from a
    segmentation run directory or its best/last.safetensors. Returns ``out``."""
    path = segmenter_file(checkpoint)
    net, meta = load_segmenter(path)
    out = Path(out)
    if out.resolve() == path.parent.resolve():
        raise ValueError(f"--out {out} is the checkpoint's own directory; export to a new folder.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new --out or pass --overwrite.")
        for name in EXPORT_FILES:
            (out / name).unlink(missing_ok=True)
        if any(out.iterdir()):  # push uploads the whole folder: it must hold this export only
            others = sorted(p.name for p in out.iterdir())
            raise FileExistsError(f"{out} holds files that are not from an export ({others}); choose an empty --out.")
    names = json.loads(meta["class_names"])
    export_transformers(net, out, names, int(meta["input_size"]))
    write_atomic_text(out / "README.md", model_card(meta, repo_id or str(out), license, list(datasets)))
    log.info("exported segmenter %s (%s, %d classes) to %s", path, meta["model"], len(names), out)
    return out


def model_card(meta: dict, repo_id: str, license: str, datasets: list[str]) -> str:
    names = json.loads(meta["class_names"])
    score = f"mIoU {float(meta['mIoU']):.2f} (step {meta.get('step', '?')}, {meta.get('eval_mode', 'whole')} " \
            "inference) on the validation split" if "mIoU" in meta else "no validation score recorded"
    head = "\n".join(["---", "library_name: transformers", f"license: {license}", "pipeline_tag: image-segmentation",
                      "tags: [image-segmentation, upernet, convnextv2, fcmae]"]
                     + ([f"datasets: [{', '.join(datasets)}]"] if datasets else []) + ["---"])
    return f"""{head}
# UperNet + {meta['model']}, fine-tuned with fcmae

Semantic segmentation into {len(names)} classes ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}),
trained at {meta['input_size']} px: {score}.

```python
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

processor = AutoImageProcessor.from_pretrained("{repo_id}")
model = AutoModelForSemanticSegmentation.from_pretrained("{repo_id}")
inputs = processor(images=image, return_tensors="pt")
labels = model(**inputs).logits.argmax(1)  # (1, H, W) class indices at the processor's size
```
The processor resizes to a square; fcmae's own evaluation keeps the aspect ratio (short side
{meta['input_size']}): `python finetune/segment.py predict IMAGE --checkpoint RUN`.
"""


def export_main(argv: list[str] | None = None) -> None:
    """``python -m fcmae.hub export --checkpoint SEGMENTATION_RUN --out DIR``: the segmenter branch."""
    parser = argparse.ArgumentParser(prog="python -m fcmae.hub export", description=export_segmenter.__doc__)
    parser.add_argument("--checkpoint", required=True, help="segmentation run directory or its best/last.safetensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", default="transformers", help="transformers (the only format of a segmenter)")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id(s) trained on (model card)")
    parser.add_argument("--repo-id", help="OWNER/NAME, for the model card's loading example")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    def run():
        if args.format != "transformers":
            raise ValueError(f"--format {args.format}: a segmenter exports as transformers (UperNet) only.")
        out = export_segmenter(args.checkpoint, args.out, overwrite=args.overwrite, repo_id=args.repo_id,
                               license=args.license, datasets=args.dataset)
        print(f"exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")

    exit_on_user_error(run)
