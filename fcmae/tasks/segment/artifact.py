"""What segmentation saves and how it comes back: ``best.safetensors`` / ``last.safetensors`` (the
UperNet with its model, class names, input size and head width in the metadata), loaded strictly by
``load_segmenter``; and the ``segmenter`` artifact kind: exported as a transformers
``UperNetForSemanticSegmentation`` folder (``AutoModelForSemanticSegmentation.from_pretrained``
loads it) or as ONNX, with a model card."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ...weights.artifacts import Found, Kind, register
from ...weights.artifacts import export as export_kind
from ...weights.onnx import write_onnx
from ...weights.source import find_weights, read_metadata
from .model import build_segmenter

log = logging.getLogger(__name__)

FORMAT = "fcmae-segmenter"  # safetensors metadata "format" of a fine-tuned segmenter
RUN_FILES = ("best.safetensors", "last.safetensors")  # a segmentation run's weights, in the order looked for
EXPORT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")  # transformers
OUTPUTS = EXPORT_FILES + ("model.onnx", "onnx_config.json")
ONNX_EXAMPLE = "256,320"  # batch 2, stride-32 map 8 x 10: no side 0 or 1 for torch.export to specialise


def segmenter_metadata(
    model_name: str, class_names: list[str], input_size: int, head_channels: int, **extra
) -> dict[str, str]:
    """safetensors metadata of a fine-tuned segmenter: what ``load_segmenter`` needs to rebuild it."""
    meta = {
        "format": FORMAT,
        "model": model_name,
        "num_classes": str(len(class_names)),
        "class_names": json.dumps(list(class_names)),
        "input_size": str(input_size),
        "head_channels": str(head_channels),
    }
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
        raise ValueError(
            f"{path} is not a fine-tuned fcmae segmenter (its metadata has no format {FORMAT!r}); pass "
            "best.safetensors or last.safetensors of a segmentation run."
        )
    names = json.loads(meta["class_names"])
    net = build_segmenter(meta["model"], len(names), int(meta["head_channels"]), class_names=names)
    net.load_state_dict(load_file(str(path)), strict=True)
    return net.eval(), meta


@dataclass
class SegmenterExport:
    path: Path
    net: object
    meta: dict
    names: list[str]
    license: str
    datasets: list[str]
    repo_id: str | None
    onnx_size: str | None


def prepare(found: Found, options: dict) -> SegmenterExport:
    net, meta = load_segmenter(found.path)
    datasets = [d for x in options.get("datasets") or () for d in str(x).split(",") if d]
    return SegmenterExport(
        found.path,
        net,
        meta,
        json.loads(meta["class_names"]),
        options.get("license") or "apache-2.0",
        datasets,
        options.get("repo_id"),
        options.get("onnx_size"),
    )


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
    SegformerImageProcessor(
        size={"height": input_size, "width": input_size},
        resample=2,  # PIL bilinear
        image_mean=list(IMAGENET_DEFAULT_MEAN),
        image_std=list(IMAGENET_DEFAULT_STD),
        do_reduce_labels=False,
    ).save_pretrained(str(out))
    return out


def write_transformers(ctx: SegmenterExport, out: Path, formats) -> None:
    export_transformers(ctx.net, out, ctx.names, int(ctx.meta["input_size"]))
    log.info("exported segmenter %s (%s, %d classes) to %s", ctx.path, ctx.meta["model"], len(ctx.names), out)


def write_onnx_export(ctx: SegmenterExport, out: Path, formats) -> None:
    """model.onnx: logits (N, K, H, W) at the input size, for any image of at least 32 x 32 px (UperNet's
    pyramid pooling runs on the stride-32 map, empty below that); the pooling is exported size-free
    (fcmae.tasks.segment.onnx)."""
    from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from .onnx import MIN_SIDE, prepare_for_onnx

    size = ctx.onnx_size or ONNX_EXAMPLE
    config = dict(
        architecture="UperNet",
        encoder=ctx.meta["model"],
        num_classes=len(ctx.names),
        label_names=ctx.names,
        mean=list(IMAGENET_DEFAULT_MEAN),
        std=list(IMAGENET_DEFAULT_STD),
        output="logits (N, K, H, W) at the input size",
    )
    write_onnx(ctx.net, out, 3, size, config, multiple=1, min_side=MIN_SIDE, prepare=prepare_for_onnx)


def card(ctx: SegmenterExport, out: Path, formats) -> str:
    meta, names, repo = ctx.meta, ctx.names, ctx.repo_id or str(out)
    score = (
        f"mIoU {float(meta['mIoU']):.2f} (step {meta.get('step', '?')}, {meta.get('eval_mode', 'whole')} "
        "inference) on the validation split"
        if "mIoU" in meta
        else "no validation score recorded"
    )
    head = "\n".join(
        [
            "---",
            "library_name: transformers",
            f"license: {ctx.license}",
            "pipeline_tag: image-segmentation",
            "tags: [image-segmentation, upernet, convnextv2, fcmae]",
        ]
        + ([f"datasets: [{', '.join(ctx.datasets)}]"] if ctx.datasets else [])
        + ["---"]
    )
    onnx = (
        (
            "\n`model.onnx`: the same network for ONNX Runtime (input `x`, images normalised with ImageNet's "
            "mean and std, any size of at least 32 x 32 px; see `onnx_config.json`).\n"
        )
        if "onnx" in formats
        else ""
    )
    return f"""{head}
# UperNet + {meta["model"]}, fine-tuned with fcmae

Semantic segmentation into {len(names)} classes ({", ".join(names[:8])}{", ..." if len(names) > 8 else ""}),
trained at {meta["input_size"]} px: {score}.

```python
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

processor = AutoImageProcessor.from_pretrained("{repo}")
model = AutoModelForSemanticSegmentation.from_pretrained("{repo}")
inputs = processor(images=image, return_tensors="pt")
labels = model(**inputs).logits.argmax(1)  # (1, H, W) class indices at the processor's size
```
The processor resizes to a square; fcmae's own evaluation keeps the aspect ratio (short side
{meta["input_size"]}): `fcmae predict IMAGE --checkpoint RUN`.
{onnx}"""


def export_segmenter(
    checkpoint,
    out,
    *,
    overwrite: bool = False,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    datasets=(),
    formats=("transformers",),
) -> Path:
    """Write ``out`` (a transformers folder, or ONNX, and a README.md model card) from a segmentation run
    directory or its best/last.safetensors. Returns ``out``."""
    return export_kind(
        segmenter_file(checkpoint),
        out,
        formats,
        overwrite=overwrite,
        repo_id=repo_id,
        license=license,
        datasets=list(datasets),
    )


KIND = register(
    Kind(
        "segmenter",
        FORMAT,
        RUN_FILES,
        load=lambda source: load_segmenter(source)[0],
        exporters={"transformers": write_transformers, "onnx": write_onnx_export},
        default_formats=("transformers",),
        options=frozenset({"license", "datasets", "repo_id", "onnx_size"}),
        prepare=prepare,
        card=card,
        outputs=OUTPUTS,
    )
)
