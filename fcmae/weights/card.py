"""What a run says about its checkpoint (config, metrics, label names), and the Hub model card built from it.

A checkpoint's training config comes from its safetensors metadata (``config``, written by the
pretraining runner) or from ``config.yaml`` beside it; metrics from ``final.yaml`` / ``*results.json``
/ ``metrics.json`` and the last row of ``log.jsonl`` in the run directory. Keys that look like
credentials are dropped before anything is written, so a token can never reach a card or a config.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from huggingface_hub import ModelCardData

from ..version import __version__
from .source import read_metadata, run_dir_of

SECRET_KEY = re.compile(r"token|secret|passw|api_?key|credential|auth", re.IGNORECASE)
FINAL_FILES = ("final.yaml", "final.json", "metrics.json", "all_results.json", "eval_results.json")
LABEL_FILES = ("label_names.json", "labels.txt", "classes.txt")
METRIC_PREFIXES = ("acc", "top", "loss", "epoch", "step", "eval_")  # numeric safetensors metadata worth a row
PAPER = dict(
    paper_name="ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders", paper_ids="arXiv:2301.00808"
)


@dataclass
class RunInfo:
    """Everything known about a checkpoint besides its tensors."""

    path: Path | None  # the weights file that was read
    run_dir: Path | None
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors metadata
    config: dict = field(default_factory=dict)  # the run's resolved training config, secrets removed
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # {source file: {name: value}}
    label_names: list[str] | None = None


CONFIG_SECTIONS = ("dataset", "encoder", "optim", "schedule", "runtime", "task", "resolved")


def flatten_config(mapping: dict) -> dict:
    """A run config as flat field -> value: config.yaml and the weights' "config" metadata hold it in
    sections (dataset, encoder, optim, schedule, runtime, task, resolved) since fcmae 0.2, flat before."""
    out = {}
    for k, v in mapping.items():
        k = str(k).replace("-", "_")
        if isinstance(v, dict) and k in CONFIG_SECTIONS:
            out.update(flatten_config(v))
        else:
            out[k] = v
    return out


def redact(obj):
    """``obj`` without any mapping key that looks like a credential (token, secret, password, ...)."""
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items() if not SECRET_KEY.search(str(k))}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def read_run_info(path: Path | None) -> RunInfo:
    """Config, metrics and label names of the checkpoint file ``path`` (already resolved)."""
    if path is None:
        return RunInfo(None, None)
    meta = read_metadata(path)
    run_dir = run_dir_of(path)
    config = flatten_config(json.loads(meta["config"]) if "config" in meta else _read_mapping(run_dir / "config.yaml"))
    metrics = {"checkpoint": _scalars({k: _number(v) for k, v in meta.items() if k.startswith(METRIC_PREFIXES)})}
    metrics.update({name: _scalars(_read_mapping(run_dir / name)) for name in FINAL_FILES})
    if (run_dir / "log.jsonl").is_file():
        rows = [r for r in (run_dir / "log.jsonl").read_text().splitlines() if r.strip()]
        metrics["log.jsonl (last row)"] = _scalars(json.loads(rows[-1])) if rows else {}
    key = next((k for k in ("label_names", "class_names") if k in meta), None)  # fine-tuning: class_names
    labels = json.loads(meta[key]) if key else config.get("label_names")
    for name in LABEL_FILES:
        if labels is None and (run_dir / name).is_file():
            labels = read_label_names(run_dir / name)
    return RunInfo(
        path, run_dir, meta, redact(config), {k: v for k, v in metrics.items() if v}, list(labels) if labels else None
    )


def read_label_names(path: str | Path) -> list[str]:
    """Class names from a JSON list, a JSON ``{index: name}`` mapping, or a text file (one a line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Label names file {path} does not exist.")
    text = path.read_text()
    if path.suffix == ".json" or text.lstrip()[:1] in ("[", "{"):
        data = json.loads(text)
        if isinstance(data, dict):
            idx = sorted(int(k) for k in data)
            if idx != list(range(len(idx))):
                raise ValueError(f"{path}: label indices must be 0..N-1 without gaps; got {idx[:10]}...")
            return [str(data[str(i)] if str(i) in data else data[i]) for i in idx]
        return [str(x) for x in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_mapping(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def _number(s: str):
    try:
        return float(s)
    except ValueError:
        return None


def _scalars(d: dict) -> dict[str, float]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def render_card(
    *,
    arch: str,
    cfg,
    num_classes: int,
    params: int,
    formats: list[str],
    license: str,
    tag: str,
    datasets: list[str],
    input_size: int,
    crop_pct: float,
    mean,
    std,
    run: RunInfo,
    repo_id: str | None,
    fcmae_args: dict | None,
) -> str:
    """README.md for an exported folder: YAML front matter (huggingface_hub's ModelCardData), then the
    model, the run's results and config, and how to load it with timm, transformers and fcmae."""
    repo = repo_id or "OWNER/NAME"
    timm_top = "timm" in formats
    library = "timm" if timm_top else "transformers" if "transformers" in formats else None
    what = (
        f"an image classifier ({num_classes} classes)"
        if num_classes
        else "an FCMAE-pretrained encoder without a classifier (a feature extractor to fine-tune)"
    )
    if timm_top:
        conv = " (MLP as 1x1 convolutions, as timm builds this size)" if arch in _CONV_MLP else ""
        weights = f"`model.safetensors` in timm's layout{conv}"
    else:
        weights = (
            "`model.safetensors`, a native transformers ConvNeXt export"
            if library
            else "`fcmae.safetensors` only (see below)"
        )
    lines = f"""---
{_front_matter(cfg, num_classes, formats, library, license, datasets, run)}
---

# {repo.split("/")[-1]}

ConvNeXt{" V2" if cfg.grn else ""} `{arch}` (depths {tuple(cfg.depths)}, dims {tuple(cfg.dims)}, \
{params / 1e6:.2f} M parameters): {what}. Exported with fcmae {__version__}; timm tag `{tag}`.

## Model details

- Weights: {weights}
- Input: {input_size}x{input_size}, bicubic, crop_pct {crop_pct}, mean {tuple(mean)}, std {tuple(std)}
- License: {license}
- Paper: [{PAPER["paper_name"]}](https://arxiv.org/abs/2301.00808)""".split("\n")
    lines += _details(num_classes, formats, fcmae_args) + _results(run)
    lines += ["", "## How to use", ""] + _usage(repo, arch, num_classes, formats, fcmae_args)
    return "\n".join(lines) + "\n"


def _front_matter(cfg, num_classes: int, formats: list[str], library, license: str, datasets, run) -> str:
    """The card's YAML front matter (huggingface_hub's ModelCardData)."""
    tags = ["image-classification", "fcmae", "convnextv2" if cfg.grn else "convnext"]
    tags += [f for f in ("timm", "transformers") if f in formats]
    acc = any("acc" in k.lower() for m in run.metrics.values() for k in m)
    pipeline = "image-classification" if num_classes else "image-feature-extraction"
    metrics = ["accuracy"] if acc else None
    return ModelCardData(
        license=license,
        library_name=library,
        tags=tags,
        datasets=datasets or None,
        metrics=metrics,
        pipeline_tag=pipeline,
    ).to_yaml()


def _details(num_classes: int, formats: list[str], fcmae_args: dict | None) -> list[str]:
    lines = []
    if not num_classes and "timm" in formats:
        lines.append(
            "- `head.norm` holds a fresh LayerNorm (weight 1, bias 0): FCMAE pretraining has no final norm, "
            "and timm's strict loading needs one. `forward_features` is unaffected; pooled features are "
            "LayerNorm-ed without an affine transform."
        )
    if "transformers" in formats and "timm" in formats:
        lines.append("- `transformers/`: the same weights as a native transformers `ConvNextV2` model")
    if fcmae_args:
        args = ", ".join(f"{k} {v}" for k, v in fcmae_args.items())
        lines.append(f"- `fcmae.safetensors`: the full FCMAE (encoder + decoder; {args}) to continue pretraining")
    return lines


def _results(run: RunInfo) -> list[str]:
    lines = []
    if run.metrics:
        lines += ["", "## Results (read from the run)", ""]
        for source, values in run.metrics.items():
            lines += [f"`{source}`:", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.6g} |" for k, v in values.items()] + [""]
    if run.config:
        config = yaml.safe_dump(run.config, sort_keys=False).rstrip()
        lines += ["", "## Training configuration", "", "```yaml", config, "```"]
    return lines


_CONV_MLP = ("convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano")


def _usage(repo: str, arch: str, num_classes: int, formats: list[str], fcmae_args: dict | None) -> list[str]:
    out, auto = [], "AutoModelForImageClassification" if num_classes else "AutoModel"
    if "timm" in formats:
        call = "features = model.forward_features(" if not num_classes else "logits = model("
        out += f"""timm:

```python
import timm

model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config, is_training=False)
{call}transform(image).unsqueeze(0))
```

transformers (through its timm wrapper):

```python
from transformers import AutoImageProcessor, {auto}

processor = AutoImageProcessor.from_pretrained("{repo}")
model = {auto}.from_pretrained("{repo}")
```
""".split("\n")
    if "transformers" in formats:
        sub = ', subfolder="transformers"' if "timm" in formats else ""
        cls = "ConvNextV2ForImageClassification" if num_classes else "ConvNextV2Model"
        out += f"""transformers (native ConvNextV2):

```python
from transformers import AutoImageProcessor, {cls}

processor = AutoImageProcessor.from_pretrained("{repo}"{sub})
model = {cls}.from_pretrained("{repo}"{sub})
```
""".split("\n")
    if "timm" in formats or "transformers" in formats:
        out += f"""fcmae:

```python
import fcmae

model = fcmae.create_model("{arch}", num_classes={num_classes})
fcmae.load_checkpoint(model, "hf-hub:{repo}")
```""".split("\n")
    if fcmae_args:
        dims = f"decoder_dim={fcmae_args['decoder_dim']}, decoder_depth={fcmae_args['decoder_depth']}"
        out += f"""
Continue FCMAE pretraining from the full model (encoder + decoder):

```python
from fcmae import create_fcmae
from fcmae.hub import load_fcmae_weights

mae = create_fcmae("{arch}", {dims})
load_fcmae_weights(mae, "hf-hub:{repo}")
```""".split("\n")
    return out
