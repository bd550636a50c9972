"""Publishing a ConvNeXt (an encoder, a full FCMAE, a classifier): Hub-ready folders that timm,
transformers, ONNX Runtime and fcmae load, and the upload. These three artifact kinds are registered
here (fcmae.weights.artifacts); the segmenter and the detector register with their tasks.

Usage (the export parser of every kind: ``fcmae export`` / ``python -m fcmae.hub export``):
    fcmae export --checkpoint outputs/demo --out hub/atto-fcmae --format all
    fcmae export --checkpoint run/best.safetensors --label-names labels.txt --dataset owner/data \\
        --format both --out hub/tiny-ft
    fcmae push --folder hub/atto-fcmae --repo-id me/convnextv2-atto-fcmae [--private] [--revision main]

--checkpoint is anything fcmae.load_checkpoint reads: a run directory, encoder.safetensors,
fcmae.safetensors, a fine-tuning checkpoint, timm / transformers / official weights, hf-hub:OWNER/NAME.
Formats (--format, comma-separated; both = timm,transformers; all = timm,transformers,fcmae):
  timm          config.json in timm's format, model.safetensors in timm's layout (1x1-conv MLP for
                atto..nano), README.md. timm: create_model("hf-hub:OWNER/NAME", pretrained=True);
                transformers: AutoModelForImageClassification.from_pretrained (its timm wrapper).
  transformers  a native ConvNextV2ForImageClassification (ConvNextV2Model without a classifier) with
                preprocessor_config.json: in transformers/ beside a timm export, else at the top.
  fcmae         fcmae.safetensors, the full FCMAE (encoder + decoder) to continue pretraining
                (load_fcmae_weights), described by fcmae_config.json (config.json when alone).
  onnx          model.onnx (opset 18; dynamic batch, height and width, multiples of 32) with
                onnx_config.json (input size, mean, std, labels); needs `pip install fcmae[onnx]`.
An encoder-only checkpoint exports with num_classes 0 and a fresh head.norm (weight 1, bias 0), so
that timm's strict loading finds every key. Push reads its token from HF_TOKEN or the login cache
through huggingface_hub only: fcmae never reads, prints or writes it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from torch import nn

from ..models import create_model
from ..version import __version__
from .adapt import stem_channels
from .artifacts import EXPORT_OPTIONS, KINDS, Found, Kind, identify, register
from .artifacts import export as export_kind
from .card import read_label_names, read_run_info, render_card
from .formats import DECODER_PARTS, load_fcmae_weights, write_fcmae, write_timm, write_transformers
from .load import load_checkpoint, open_weights
from .onnx import write_onnx

log = logging.getLogger(__name__)

FORMATS = ("timm", "transformers", "fcmae", "onnx")
ALIASES = {"both": ("timm", "transformers"), "all": ("timm", "transformers", "fcmae")}
EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "README.md",
    "preprocessor_config.json",
    "fcmae.safetensors",
    "fcmae_config.json",
    "transformers",
    "model.onnx",
    "onnx_config.json",
)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPTIONS = frozenset({"model", "num_classes", "label_names", "license", "datasets", "tag", "repo_id", "onnx_size"})
__all__ = ["export", "export_and_push", "load_fcmae_weights", "parse_formats", "push"]


def parse_formats(formats) -> list[str]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    out = []
    for f in (x.strip() for x in items if x.strip()):
        for g in ALIASES.get(f, (f,)):
            if g not in FORMATS:
                raise ValueError(f"Unknown export format {g!r}; choose from {', '.join(FORMATS)}, both, all.")
            out += [g] if g not in out else []
    if not out:
        raise ValueError("No export format given.")
    return out


@dataclass
class ConvNeXtExport:
    """A ConvNeXt checkpoint read once for every format of an export."""

    path: Path
    layout: str
    ignored: list[str]
    run: object  # card.RunInfo
    net: object  # the fcmae ConvNeXt, weights loaded
    num_classes: int
    labels: list[str] | None
    data: dict  # input_size, crop_pct, mean, std
    datasets: list[str]
    tag: str
    license: str
    repo_id: str | None
    onnx_size: str | None
    fcmae_args: dict | None = None  # set by the fcmae writer, for the card


def prepare(found: Found, options: dict) -> ConvNeXtExport:
    """Read the checkpoint, build its model and resolve names, labels and preprocessing once."""
    weights = open_weights(found.path)
    path, sd = weights.path, weights.state_dict
    run = read_run_info(path)
    name = _model_name(options.get("model"), run, path)
    src_classes = sd["head.fc.weight"].shape[0] if "head.fc.weight" in sd else 0
    num_classes = src_classes if options.get("num_classes") is None else int(options["num_classes"])
    if num_classes not in (0, src_classes):
        raise ValueError(
            f"--num-classes {num_classes}, but {path} has "
            + (
                f"a {src_classes}-class classifier: export it as is (or with 0 for the features only)."
                if src_classes
                else "no classifier (an encoder-only checkpoint): export it with --num-classes 0, or fine-tune first."
            )
        )
    names = options.get("label_names")
    labels = (read_label_names(names) if isinstance(names, (str, Path)) else names) or run.label_names
    labels = [str(x) for x in labels] if labels and num_classes else None
    if labels and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} label names for a {num_classes}-class classifier; give one name per class.")
    in_chans = stem_channels(sd) or 3
    net = create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
    load_checkpoint(net, sd)
    cfg = {**run.config, **{k: run.metadata[k] for k in ("input_size", "crop_pct") if k in run.metadata}}
    size = int(cfg.get("input_size") or 224)
    data = dict(
        input_size=size,
        crop_pct=float(cfg.get("crop_pct") or (0.875 if size < 384 else 1.0)),
        mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
        std=tuple(cfg.get("std") or IMAGENET_STD),
    )
    if len(data["mean"]) != in_chans or len(data["std"]) != in_chans:
        raise ValueError(
            f"{path} takes {in_chans} input channels, but its run records no per-channel mean/std for "
            "them: export from the run directory (its config.yaml has --mean/--std)."
        )
    datasets = _datasets(options.get("datasets"), cfg)
    tag = options.get("tag") or ("fcmae_ft" if num_classes else "fcmae") + (
        "_" + re.sub(r"[^a-z0-9]+", "_", datasets[0].split("/")[-1].lower()).strip("_") if datasets else ""
    )
    return ConvNeXtExport(
        path,
        weights.layout,
        weights.ignored,
        run,
        net,
        num_classes,
        labels,
        data,
        datasets,
        tag,
        options.get("license") or "apache-2.0",
        options.get("repo_id"),
        options.get("onnx_size"),
    )


def _datasets(given, cfg: dict) -> list[str]:
    given = [given] if isinstance(given, str) else list(given or ())
    return [d for x in given for d in x.split(",") if d] or ([cfg["dataset_name"]] if cfg.get("dataset_name") else [])


def _model_name(model: str | None, run, path: Path) -> str:
    exported = path.parent / "config.json"  # an export (timm's config.json names the architecture)
    recorded = (
        run.metadata.get("model")
        or run.config.get("model")
        or (json.loads(exported.read_text()).get("architecture") if exported.is_file() else None)
    )
    if model and recorded and model != recorded:
        raise ValueError(f"--model {model}, but {path} records model {recorded}: pass --model {recorded}.")
    if not (model or recorded):
        raise ValueError(f"{path} does not record its architecture: pass --model (fcmae.list_models() lists them).")
    return model or recorded


def _timm(ctx: ConvNeXtExport, out: Path, formats) -> None:
    write_timm(ctx.net, out, tag=ctx.tag, license=ctx.license, label_names=ctx.labels, **ctx.data)


def _transformers(ctx: ConvNeXtExport, out: Path, formats) -> None:
    write_transformers(ctx.net, out / "transformers" if "timm" in formats else out, label_names=ctx.labels, **ctx.data)


def _fcmae(ctx: ConvNeXtExport, out: Path, formats) -> None:
    full = ctx.path if any(k.startswith(DECODER_PARTS) for k in ctx.ignored) else ctx.run.run_dir / "fcmae.safetensors"
    ctx.fcmae_args = write_fcmae(full, ctx.net, out, ctx.run, as_config=list(formats) == ["fcmae"])


def _onnx(ctx: ConvNeXtExport, out: Path, formats) -> None:
    config = dict(
        architecture=ctx.net.name,
        num_classes=ctx.num_classes,
        label_names=ctx.labels,
        **ctx.data,
        output="logits" if ctx.num_classes else "pooled features (N, C), timm's pre-logits",
    )
    module = ctx.net if ctx.num_classes else PreLogits(ctx.net).eval()
    write_onnx(module, out, ctx.net.in_chans, ctx.onnx_size or ctx.data["input_size"], config, multiple=32)


class PreLogits(nn.Module):
    """An encoder's exported output: timm's pre-logits (global average, then the head's norm)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def card(ctx: ConvNeXtExport, out: Path, formats) -> str:
    params = sum(v.numel() for v in ctx.net.state_dict().values())
    return render_card(
        arch=ctx.net.name,
        cfg=ctx.net.cfg,
        num_classes=ctx.num_classes,
        params=params,
        formats=list(formats),
        license=ctx.license,
        tag=ctx.tag,
        datasets=ctx.datasets,
        run=ctx.run,
        repo_id=ctx.repo_id,
        fcmae_args=ctx.fcmae_args,
        **ctx.data,
    )


WRITERS = {"timm": _timm, "transformers": _transformers, "fcmae": _fcmae, "onnx": _onnx}


def _convnext_kind(name: str, fmt: str, files: tuple[str, ...], default=("timm",)) -> Kind:
    return register(
        Kind(
            name,
            fmt,
            files,
            load=load_convnext,
            exporters=WRITERS,
            default_formats=default,
            options=OPTIONS,
            aliases=ALIASES,
            prepare=prepare,
            card=card,
            outputs=EXPORT_FILES,
        )
    )


def load_convnext(source):
    """The fcmae ConvNeXt a source holds (its head when it has one), in eval mode."""
    weights = open_weights(source)
    num_classes = weights.state_dict["head.fc.weight"].shape[0] if "head.fc.weight" in weights.state_dict else 0
    net = create_model(
        weights.model_name(str(source)), num_classes=num_classes, in_chans=stem_channels(weights.state_dict) or 3
    )
    load_checkpoint(net, weights)
    return net.eval()


ENCODER = _convnext_kind("encoder", "fcmae-encoder", ("encoder.safetensors",))
FCMAE = _convnext_kind("fcmae", "fcmae", ("fcmae.safetensors",), default=("fcmae",))
CLASSIFIER = _convnext_kind(
    "classifier", "fcmae-classifier", ("best.safetensors", "best_ema.safetensors", "last.safetensors")
)


def export(
    checkpoint,
    out,
    *,
    formats=("timm",),
    overwrite: bool = False,
    model: str | None = None,
    num_classes: int | None = None,
    label_names=None,
    license: str = "apache-2.0",
    datasets=(),
    tag: str | None = None,
    repo_id: str | None = None,
    onnx_size=None,
) -> Path:
    """Write a Hub-ready folder ``out`` from a ConvNeXt ``checkpoint``; returns ``out``. ``label_names``:
    a list or a file (JSON list / mapping, or one name a line); by default read from the run.
    ``num_classes`` defaults to the checkpoint's (0 for an encoder)."""
    parse_formats(formats)
    return export_kind(
        checkpoint,
        out,
        formats,
        overwrite=overwrite,
        model=model,
        num_classes=num_classes,
        label_names=label_names,
        license=license,
        datasets=datasets,
        tag=tag,
        repo_id=repo_id,
        onnx_size=onnx_size,
    )


def push(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> str:
    """create_repo (exist_ok) + upload_folder of ``folder``; returns the commit (or repo) URL. The token is
    huggingface_hub's business (HF_TOKEN or the login cache). ``private`` applies to a new repo only."""
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} is not an export (no README.md): run `fcmae export` first.")
    api = api or HfApi()
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload {folder.name} (fcmae {__version__})",
    )
    url = str(getattr(info, "commit_url", None) or repo_url)
    log.info("pushed %s to %s", folder, url)
    return url


def export_and_push(
    source,
    repo_id: str,
    *,
    out=None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
    formats=None,
    **options,
) -> str:
    """For a run's ``--push-to-hub OWNER/NAME`` (main process only): export ``source`` as its kind to
    ``out`` (default ``<run dir>/hub``, replaced) and push. Options the kind does not take are left out
    (a run passes what it knows of itself)."""
    src = Path(source)
    out = Path(out) if out else (src if src.is_dir() else src.parent) / "hub"
    found = identify(source)
    options = {k: v for k, v in options.items() if k in found.kind.options}
    export_kind(source, out, formats, overwrite=True, repo_id=repo_id, **options)
    return push(out, repo_id, private=private, revision=revision, commit_message=commit_message, api=api)


def main(argv: list[str] | None = None, prog: str = "fcmae") -> None:
    """``export`` and ``push``: one parser for every artifact kind (user errors raise; the commands
    turn them into one line and exit status 2)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_arguments(
        sub.add_parser("export", help="write a Hub-ready folder of any fcmae artifact", allow_abbrev=False)
    )
    p = sub.add_parser("push", help="upload an exported folder to the Hub", allow_abbrev=False)
    p.add_argument("--folder", required=True)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to (created if needed; default main)")
    p.add_argument("--commit-message")
    args = vars(parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.pop("command") == "export":
        out = export_kind(args.pop("checkpoint"), args.pop("out"), args.pop("format"), **args)
        print(f"exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    else:
        url = push(
            args["folder"],
            args["repo_id"],
            private=args["private"],
            revision=args["revision"],
            commit_message=args["commit_message"],
        )
        print(f"pushed {args['folder']} to {url}")


def add_export_arguments(parser) -> None:
    kinds = "; ".join(
        f"{k.name}: {', '.join([*k.exporters, *k.aliases])} (default {','.join(k.default_formats)})"
        for k in KINDS.values()
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a run folder, a weights file, an export, hf-hub:OWNER/NAME"
    )
    parser.add_argument(
        "--out", required=True, help="the folder to write (empty, or an earlier export with --overwrite)"
    )
    parser.add_argument("--format", help=f"comma-separated; per kind: {kinds}")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    for name, text in EXPORT_OPTIONS.items():
        flag = "--dataset" if name == "datasets" else f"--{name.replace('_', '-')}"
        kw = dict(action="append") if name == "datasets" else dict(type=int) if name == "num_classes" else {}
        parser.add_argument(flag, dest=name, help=text, **kw)
