"""What detection saves and how it comes back: ``best.safetensors`` / ``last.safetensors`` (the
detector with its model, categories, sizes and whether it has masks in the metadata) and the
``detector`` artifact kind: an exported folder (model.safetensors, config.json, a model card) that
``load_detector`` reads back in two lines."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...data import detection as det
from ...weights.artifacts import Found, Kind, register
from ...weights.source import find_weights, read_metadata
from .model import build_detector

FORMAT = "fcmae-detector"
WEIGHT_FILES = ("best.safetensors", "last.safetensors", "model.safetensors")
EXPORT_FILES = ("model.safetensors", "config.json", "README.md")


def detector_metadata(cfg, cats: det.CategoryMap, **extra) -> dict[str, str]:
    """safetensors metadata of a detector: what ``load_detector`` needs to rebuild it. ``input_size``
    is the evaluation short side, the name detector files have always used for it."""
    eval_size = cfg.task.eval_size
    meta = dict(
        format=FORMAT,
        model=cfg.model,
        num_classes=cats.num_classes,
        categories=json.dumps(cats.to_dict()),
        input_size=eval_size,
        eval_short_side=eval_size,
        train_size=cfg.task.train_scale,
        jitter=cfg.jitter,
        masks=json.dumps(cfg.masks),
        **extra,
    )
    return {k: str(v) for k, v in meta.items()}


def _read(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    return json.loads(value) if isinstance(value, str) and value[:1] in "[{tf" else value


def load_detector(source) -> torch.nn.Module:
    """The detector saved in ``source`` (a detection run dir, its best/last.safetensors, or an
    exported detector folder), in eval mode. ``model.categories`` is its ``CategoryMap`` and
    ``model.info`` its metadata (model, input_size (the evaluation short side), masks, ...)."""
    path = find_weights(source, WEIGHT_FILES)
    config = path.with_name("config.json")
    meta = (
        json.loads(config.read_text()) if path.name == "model.safetensors" and config.is_file() else read_metadata(path)
    )
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a detector saved by fcmae (format {meta.get('format')!r}); give a detection "
            "run directory, its best.safetensors, or an exported detector folder."
        )
    cats = _read(meta, "categories")
    cats = det.CategoryMap([c["id"] for c in cats["categories"]], [c["name"] for c in cats["categories"]])
    masks, eval_size = bool(_read(meta, "masks")), int(meta.get("eval_short_side") or meta["input_size"])
    net = build_detector(meta["model"], cats.num_classes, eval_size, masks=masks)
    net.load_state_dict(load_file(str(path)), strict=True)
    net.categories, net.info = cats, {**meta, "input_size": eval_size, "masks": masks, "path": str(path)}
    return net.eval()


@dataclass
class DetectorExport:
    net: torch.nn.Module
    license: str
    datasets: list[str]
    repo_id: str | None


def prepare(found: Found, options: dict) -> DetectorExport:
    datasets = [d for x in options.get("datasets") or () for d in str(x).split(",") if d]
    return DetectorExport(
        load_detector(found.path), options.get("license") or "apache-2.0", datasets, options.get("repo_id")
    )


def write_detector(ctx: DetectorExport, out: Path, formats) -> None:
    """model.safetensors (the weights as saved) and config.json (format, model, classes, categories,
    sizes, masks, and the run's step and box mAP)."""
    net = ctx.net
    shutil.copyfile(net.info["path"], out / "model.safetensors")
    info = {
        "format": FORMAT,
        "model": net.info["model"],
        "num_classes": net.categories.num_classes,
        "categories": net.categories.to_dict(),
        "input_size": net.info["input_size"],
        "eval_short_side": net.info["input_size"],
        "masks": net.info["masks"],
        **{k: net.info[k] for k in ("step", "bbox_mAP", "train_size", "jitter") if k in net.info},
    }
    (out / "config.json").write_text(json.dumps(info, indent=1) + "\n")


def card(ctx: DetectorExport, out: Path, formats) -> str:
    net = ctx.net
    kind = "Mask R-CNN" if net.info["masks"] else "Faster R-CNN"
    names = ", ".join(net.categories.names)
    score = f" Validation box mAP: {float(net.info['bbox_mAP']):.4f}." if "bbox_mAP" in net.info else ""
    head = (
        [
            "---",
            "library_name: fcmae",
            f"license: {ctx.license}",
            "pipeline_tag: object-detection",
            "tags: [object-detection, convnextv2, fcmae, torchvision]",
        ]
        + ([f"datasets: [{', '.join(ctx.datasets)}]"] if ctx.datasets else [])
        + ["---"]
    )
    where = f'snapshot_download("{ctx.repo_id}")' if ctx.repo_id else '"DIR"'
    get = "from huggingface_hub import snapshot_download\n" if ctx.repo_id else ""
    return "\n".join(head) + (
        f"\n\n# {kind} FPN on {net.info['model']}\n\ntorchvision's {kind} on a ConvNeXt FPN backbone whose encoder "
        f"was fine-tuned from FCMAE pretraining with fcmae. {len(net.categories.names)} classes: {names}. Evaluation "
        f"scale: short side {net.info['input_size']}.{score}\n\n## Use\n\n```python\n{get}"
        f"from fcmae.tasks.detect import load_detector\nmodel = load_detector({where})  "
        "# eval mode; model([image (3, H, W) in [0, 1]]) -> boxes, labels, scores"
        + (", masks" if net.info["masks"] else "")
        + "\n```\n\nLabels are 1..K; `model.categories.label_to_cat` maps "
        "them to the dataset's category ids.\n"
    )


def export_detector(checkpoint, out, overwrite: bool = False, **options) -> Path:
    """``out``/model.safetensors, config.json and README.md (a model card with the two-line load-back)
    from a detection run or file."""
    from ...weights.artifacts import export

    return export(find_weights(checkpoint, WEIGHT_FILES), out, ("detector",), overwrite=overwrite, **options)


KIND = register(
    Kind(
        "detector",
        FORMAT,
        WEIGHT_FILES[:2],
        load=load_detector,
        exporters={"detector": write_detector},
        default_formats=("detector",),
        options=frozenset({"license", "datasets", "repo_id"}),
        prepare=prepare,
        card=card,
        outputs=EXPORT_FILES,
    )
)
