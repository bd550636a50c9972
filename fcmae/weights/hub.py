"""Publishing: export a checkpoint as a Hub-ready folder that timm, transformers and fcmae load; push it.

Usage:
    python -m fcmae.hub export --checkpoint outputs/demo --model convnextv2_atto --out hub/atto-fcmae
    python -m fcmae.hub export --checkpoint run/best.safetensors --model convnextv2_tiny --label-names labels.txt \
        --dataset owner/data --format both --out hub/tiny-ft
    python -m fcmae.hub push --folder hub/atto-fcmae --repo-id me/convnextv2-atto-fcmae [--private] [--revision main]

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
An encoder-only checkpoint exports with num_classes 0 and a fresh head.norm (weight 1, bias 0), so
that timm's strict loading finds every key. Push reads its token from HF_TOKEN or the login cache
through huggingface_hub only: fcmae never reads, prints or writes it.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from pathlib import Path

from huggingface_hub import HfApi

from ..models import create_model
from ..version import __version__
from .adapt import stem_channels
from .card import read_label_names, read_run_info, render_card
from .files import write_atomic_text
from .formats import DECODER_PARTS, load_fcmae_weights, write_fcmae, write_timm, write_transformers
from .load import load_checkpoint, open_weights

log = logging.getLogger(__name__)

FORMATS = ("timm", "transformers", "fcmae")
ALIASES = {"both": ("timm", "transformers"), "all": FORMATS}
EXPORT_FILES = ("config.json", "model.safetensors", "README.md", "preprocessor_config.json", "fcmae.safetensors",
                "fcmae_config.json", "transformers")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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


# --------------------------------------------------------------------------- export
def export(checkpoint, out, *, model: str | None = None, num_classes: int | None = None, formats=("timm",),
           label_names=None, license: str = "apache-2.0", datasets=(), tag: str | None = None,
           repo_id: str | None = None, overwrite: bool = False) -> Path:
    """Write a Hub-ready folder ``out`` from ``checkpoint``; returns ``out``. ``label_names``: a list or a
    file (JSON list / mapping, or one name a line); by default read from the run. ``num_classes``
    defaults to the checkpoint's (0 for an encoder); 0 with a classifier checkpoint drops the classifier."""
    formats = parse_formats(formats)
    weights = open_weights(checkpoint)
    path, layout, sd, ignored = weights.path, weights.layout, weights.state_dict, weights.ignored
    run = read_run_info(path)
    name = _model_name(model, run, path)
    src_classes = sd["head.fc.weight"].shape[0] if "head.fc.weight" in sd else 0
    num_classes = src_classes if num_classes is None else int(num_classes)
    if num_classes not in (0, src_classes):
        raise ValueError(f"--num-classes {num_classes}, but {path} has " + (
            f"a {src_classes}-class classifier: export it as is (or with 0 for the features only)." if src_classes
            else "no classifier (an encoder-only checkpoint): export it with --num-classes 0, or fine-tune first."))
    labels = (read_label_names(label_names) if isinstance(label_names, (str, Path)) else label_names) or run.label_names
    labels = [str(x) for x in labels] if labels and num_classes else None
    if labels and len(labels) != num_classes:
        raise ValueError(f"{len(labels)} label names for a {num_classes}-class classifier; give one name per class.")
    in_chans = stem_channels(sd) or 3
    net = create_model(name, num_classes=num_classes, in_chans=in_chans).eval()
    load_checkpoint(net, sd)

    cfg = {**run.config, **{k: run.metadata[k] for k in ("input_size", "crop_pct") if k in run.metadata}}
    size = int(cfg.get("input_size") or 224)
    data = dict(input_size=size, crop_pct=float(cfg.get("crop_pct") or (0.875 if size < 384 else 1.0)),
                mean=tuple(cfg.get("mean") or IMAGENET_MEAN), std=tuple(cfg.get("std") or IMAGENET_STD))
    if len(data["mean"]) != in_chans or len(data["std"]) != in_chans:
        raise ValueError(f"{path} takes {in_chans} input channels, but its run records no per-channel mean/std for "
                         "them: export from the run directory (its config.yaml has --mean/--std).")
    datasets = [d for x in ([datasets] if isinstance(datasets, str) else datasets) for d in x.split(",") if d] or (
        [cfg["dataset_name"]] if cfg.get("dataset_name") else [])
    tag = tag or ("fcmae_ft" if num_classes else "fcmae") + (
        "_" + re.sub(r"[^a-z0-9]+", "_", datasets[0].split("/")[-1].lower()).strip("_") if datasets else "")
    if Path(out).resolve() in (path.resolve().parent, run.run_dir.resolve()):
        raise ValueError(f"--out {out} is the checkpoint's own directory; export to a new folder.")
    out = _prepare_out(Path(out), overwrite)
    if "timm" in formats:
        write_timm(net, out, tag=tag, license=license, label_names=labels, **data)
    if "transformers" in formats:
        write_transformers(net, out / "transformers" if "timm" in formats else out, label_names=labels, **data)
    fcmae_args = None
    if "fcmae" in formats:
        full = path if any(k.startswith(DECODER_PARTS) for k in ignored) else (run.run_dir / "fcmae.safetensors")
        fcmae_args = write_fcmae(full, net, out, run, as_config=formats == ["fcmae"])
    params = sum(v.numel() for v in net.state_dict().values())
    card = render_card(arch=name, cfg=net.cfg, num_classes=num_classes, params=params, formats=formats,
                       license=license, tag=tag, datasets=datasets, run=run, repo_id=repo_id, fcmae_args=fcmae_args,
                       **data)
    write_atomic_text(out / "README.md", card)
    log.info("exported %s (%s layout, %d classes) to %s as %s", path, layout, num_classes, out, ", ".join(formats))
    return out


def _model_name(model: str | None, run, path: Path) -> str:
    exported = path.parent / "config.json"  # an export (timm's config.json names the architecture)
    recorded = run.metadata.get("model") or run.config.get("model") or (
        json.loads(exported.read_text()).get("architecture") if exported.is_file() else None)
    if model and recorded and model != recorded:
        raise ValueError(f"--model {model}, but {path} records model {recorded}: pass --model {recorded}.")
    if not (model or recorded):
        raise ValueError(f"{path} does not record its architecture: pass --model (fcmae.list_models() lists them).")
    return model or recorded


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """Everything in ``out`` is uploaded by push, so it must hold this export and nothing else."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new --out or pass --overwrite.")
        for name in EXPORT_FILES:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        if any(out.iterdir()):
            others = sorted(p.name for p in out.iterdir())
            raise FileExistsError(f"{out} holds files that are not from an export ({others}); push uploads the "
                                  "whole folder: choose an empty --out.")
    out.mkdir(parents=True, exist_ok=True)
    return out


# --------------------------------------------------------------------------- push
def push(folder, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, api: HfApi | None = None) -> str:
    """create_repo (exist_ok) + upload_folder of ``folder``; returns the commit (or repo) URL. The token is
    huggingface_hub's business (HF_TOKEN or the login cache). ``private`` applies to a new repo only."""
    folder = Path(folder)
    if not (folder / "README.md").is_file():
        raise FileNotFoundError(f"{folder} is not an export (no README.md): run `python -m fcmae.hub export` first.")
    api = api or HfApi()
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                             commit_message=commit_message or f"Upload {folder.name} (fcmae {__version__})")
    url = str(getattr(info, "commit_url", None) or repo_url)
    log.info("pushed %s to %s", folder, url)
    return url


def export_and_push(checkpoint, repo_id: str, *, out=None, private: bool = False, revision: str | None = None,
                    commit_message: str | None = None, api: HfApi | None = None, **export_kwargs) -> str:
    """For runners' ``--push-to-hub OWNER/NAME`` (main process only): export to ``out`` (default
    ``<run dir>/hub``, replaced) and push. ``export_kwargs`` go to ``export`` (model, formats, ...)."""
    ckpt = Path(checkpoint)
    out = Path(out) if out else (ckpt if ckpt.is_dir() else ckpt.parent) / "hub"
    export(checkpoint, out, repo_id=repo_id, overwrite=True, **export_kwargs)
    return push(out, repo_id, private=private, revision=revision, commit_message=commit_message, api=api)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="write a Hub-ready folder")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--model", help="architecture (default: the one the checkpoint records)")
    e.add_argument("--num-classes", type=int, help="default: the checkpoint's (0 for an encoder)")
    e.add_argument("--out", required=True)
    e.add_argument("--format", default="timm", help="timm | transformers | fcmae | both | all, comma-separated")
    e.add_argument("--label-names", help="JSON list / mapping, or a text file with one class name a line")
    e.add_argument("--license", default="apache-2.0",
                   help="default apache-2.0; cc-by-nc-4.0 for weights derived from the official ConvNeXt V2 ones")
    e.add_argument("--dataset", action="append", default=[], help="Hub dataset id(s) trained on (model card)")
    e.add_argument("--tag", help="timm pretrained tag (default fcmae / fcmae_ft, plus the dataset name)")
    e.add_argument("--repo-id", help="OWNER/NAME, for the model card's loading examples")
    e.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    p = sub.add_parser("push", help="upload an exported folder to the Hub")
    p.add_argument("--folder", required=True)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", help="branch to push to (created if needed; default main)")
    p.add_argument("--commit-message")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "export":
        out = export(args.checkpoint, args.out, model=args.model, num_classes=args.num_classes, formats=args.format,
                     label_names=args.label_names, license=args.license, datasets=args.dataset, tag=args.tag,
                     repo_id=args.repo_id, overwrite=args.overwrite)
        print(f"exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    else:
        url = push(args.folder, args.repo_id, private=args.private, revision=args.revision,
                   commit_message=args.commit_message)
        print(f"pushed {args.folder} to {url}")


if __name__ == "__main__":
    main()
