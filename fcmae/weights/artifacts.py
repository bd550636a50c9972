"""The registry of artifact kinds: what fcmae saves, and everything done with a saved one.

A kind (encoder, full FCMAE, classifier, segmenter, detector) has its safetensors format tag, the
files a run folder holds it in, a loader, its exporters (format -> writer) and the export options
that mean something for it, and, where the task registers them, prediction and feature extraction.
The registry sits in the weights layer and every task registers its own kind (``register``), so
no import climbs a layer; ``identify`` reads a source's metadata once and names its kind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .source import DIR_FILES, find_weights, read_metadata

# flags of `fcmae export` and what they mean to an exporter
EXPORT_OPTIONS = {
    "model": "architecture (default: the one the checkpoint records)",
    "num_classes": "classes of the exported classifier (default: the checkpoint's; 0: features only)",
    "label_names": "class names: a JSON list or mapping, or a text file with one name a line",
    "license": "license of the model card (default apache-2.0; cc-by-nc-4.0 for weights derived from the official "
    "ConvNeXt V2 ones)",
    "datasets": "Hub dataset id(s) trained on, for the model card",
    "tag": "timm pretrained tag (default fcmae / fcmae_ft, plus the dataset name)",
    "repo_id": "OWNER/NAME, for the model card's loading examples",
    "onnx_size": "ONNX: the image size of the example input, H or H,W (default: the run's input size)",
}


@dataclass(frozen=True)
class Kind:
    """An artifact kind. An export reads the source once (``prepare(found, options) -> context``),
    clears the output folder of an earlier export (``outputs``), runs the writer of each format
    (``exporters[format](context, out, formats)``) and writes the model card (``card``)."""

    name: str
    format: str  # the safetensors metadata "format" tag
    files: tuple[str, ...]  # in a run folder, in the order looked for
    load: Callable  # source -> the loaded artifact
    exporters: Mapping[str, Callable]  # format -> fn(context, out, formats)
    default_formats: tuple[str, ...]
    options: frozenset[str]  # EXPORT_OPTIONS that mean something for this kind
    prepare: Callable  # (Found, options) -> context
    card: Callable | None  # (context, out, formats) -> README.md text
    outputs: tuple[str, ...]  # what an export of this kind writes into its folder
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # "both" -> ("timm", "transformers")
    predict: Callable | None = None  # (argv, prog) -> exit status (registered by the task)
    features: Callable | None = None  # source -> (module giving (N, D) features, eval transform, info)


KINDS: dict[str, Kind] = {}
TAGS = {
    "fcmae-encoder": "encoder",
    "fcmae": "fcmae",
    "fcmae-classifier": "classifier",
    "fcmae-segmenter": "segmenter",
    "fcmae-detector": "detector",
}


def register(kind: Kind) -> Kind:
    KINDS[kind.name] = kind
    TAGS[kind.format] = kind.name
    return kind


def attach(name: str, **hooks) -> Kind:
    """Add a task's hooks (``predict``, ``features``) to a registered kind."""
    return register(replace(kind(name), **hooks))


def kind(name: str) -> Kind:
    if name not in KINDS:
        raise ValueError(f"No artifact kind {name!r} is registered (known: {', '.join(KINDS)}).")
    return KINDS[name]


@dataclass
class Found:
    """A source resolved: its kind, the file that holds it and that file's metadata."""

    kind: Kind
    path: Path
    metadata: dict


def _run_files() -> tuple[str, ...]:
    names = [n for k in KINDS.values() for n in k.files] + list(DIR_FILES)
    return tuple(dict.fromkeys(names))


def identify(source) -> Found:
    """The kind of ``source`` (a run folder, a weights file, an exported folder, ``hf-hub:``): from the
    format tag in its metadata (an export's config.json for exported folders), else a ConvNeXt's
    head: a classifier with one, an encoder without."""
    source = os.fspath(source)
    path = Path(source)
    if not source.startswith("hf-hub:") and path.is_dir() and (path / "config.json").is_file():
        config = json.loads((path / "config.json").read_text())
        if TAGS.get(config.get("format")) in KINDS:  # an exported folder that says what it holds
            return Found(KINDS[TAGS[config["format"]]], find_weights(path, ("model.safetensors",)), config)
    weights = find_weights(source, _run_files())
    meta = read_metadata(weights)
    name = TAGS.get(meta.get("format"))
    if name is None:
        name = "classifier" if _has_classifier(weights) else "encoder"
    if name not in KINDS:
        raise ValueError(f"{source} holds a {name}, but no task registered that kind (import fcmae.tasks).")
    return Found(KINDS[name], weights, meta)


def _has_classifier(path: Path) -> bool:
    from .load import open_weights

    return "head.fc.weight" in open_weights(path).state_dict


def parse_formats(found_kind: Kind, formats) -> list[str]:
    """``formats`` (comma-separated or a list; the kind's aliases expanded), checked against the kind."""
    items = formats.split(",") if isinstance(formats, str) else list(formats or found_kind.default_formats)
    out = []
    for f in (x.strip() for x in items if x.strip()):
        for g in found_kind.aliases.get(f, (f,)):
            if g not in found_kind.exporters:
                known = ", ".join([*found_kind.exporters, *found_kind.aliases])
                raise ValueError(f"--format {g}: a {found_kind.name} exports as {known}.")
            out += [g] if g not in out else []
    if not out:
        raise ValueError("No export format given.")
    return out


def check_options(found_kind: Kind, options: dict) -> dict:
    """The options given (not None), each one that means nothing for this kind an error naming it."""
    given = {k: v for k, v in options.items() if v not in (None, [], ())}
    for name in given:
        if name not in EXPORT_OPTIONS:
            raise TypeError(f"unknown export option {name!r}")
        if name not in found_kind.options:
            flag = "--dataset" if name == "datasets" else f"--{name.replace('_', '-')}"
            raise ValueError(
                f"{flag} does not apply to a {found_kind.name} export (its options: "
                f"{', '.join(_flag(o) for o in sorted(found_kind.options)) or 'none'})."
            )
    return given


def _flag(name: str) -> str:
    return "--dataset" if name == "datasets" else f"--{name.replace('_', '-')}"


def prepare_out(out: Path, overwrite: bool, owned: tuple[str, ...], source: Path) -> Path:
    """``out``, empty or holding only an earlier export (``owned`` names, removed with ``overwrite``):
    push uploads the whole folder, so it must hold this export and nothing else."""
    import shutil

    if out.resolve() in (source.resolve().parent, source.resolve().parent.parent):
        raise ValueError(f"--out {out} is the checkpoint's own directory; export to a new folder.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose a new --out or pass --overwrite.")
        for name in owned:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        if any(out.iterdir()):
            others = sorted(p.name for p in out.iterdir())
            raise FileExistsError(
                f"{out} holds files that are not from an export ({others}); push uploads the "
                "whole folder: choose an empty --out."
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def export(source, out, formats=None, *, overwrite: bool = False, **options) -> Path:
    """Write ``out`` from ``source`` in ``formats`` (default: the kind's), with the export ``options``
    that mean something for its kind (any other given option is a ValueError). Returns ``out``."""
    from .files import write_atomic_text

    found = identify(source)
    formats = parse_formats(found.kind, formats)
    context = found.kind.prepare(found, check_options(found.kind, options))
    out = prepare_out(Path(out), overwrite, found.kind.outputs, found.path)
    for fmt in formats:
        found.kind.exporters[fmt](context, out, formats)
    if found.kind.card is not None:
        write_atomic_text(out / "README.md", found.kind.card(context, out, formats))
    return out
