"""Typed, sectioned configs: YAML presets and command-line flags over dataclass defaults.

A task's config has six sections: ``dataset`` (fcmae.data.DataConfig: where the images are and how
they are read), ``encoder`` (which ConvNeXt, its initialisation and regularisation), ``optim``,
``schedule``, ``runtime`` (precision, checkpoints, logging, evaluation) and ``task`` (the task's own
fields). Every field name is unique across the sections, so flags and YAML keys stay flat
(``--lr``, ``lr: 1e-4``) and a field reads flat too: ``cfg.lr`` is ``cfg.optim.lr``. YAML may also
be sectioned (``optim: {lr: 1e-4}``). A key that no section knows is an error that names it.

Precedence, lowest first: the sections' defaults, the task's recipe (``DEFAULTS``: each recipe is
stated once, there), a preset the entry point picks (the demo, the linear probe), ``--config FILE``
(YAML), then flags. Every field ``foo_bar`` is a flag ``--foo-bar`` (``--foo_bar`` works too);
booleans take ``--flag`` / ``--no-flag`` or an explicit ``--flag true|false``. A renamed field keeps
its old name as a deprecated alias (``ALIASES``), with its old meaning.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import yaml
from tqdm.auto import tqdm

from ..data.config import DataConfig, help_field
from ..weights.card import CONFIG_SECTIONS
from ..weights.card import flatten_config as flatten

__all__ = [
    "Alias",
    "Config",
    "DataConfig",
    "EncoderConfig",
    "OptimConfig",
    "RunConfig",
    "RuntimeConfig",
    "ScheduleConfig",
    "build",
    "cli",
    "exit_on_user_error",
    "flatten",
    "help_field",
    "load_yaml",
    "parse_args",
    "save_yaml",
]

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
SECTION_NAMES = CONFIG_SECTIONS[:-1]


@dataclass
class EncoderConfig:
    model: str | None = help_field("registered model name (fcmae.list_models(); default: the one --from-fcmae holds)")
    from_fcmae: str | None = help_field(
        "pretrained encoder: a pretraining run dir, encoder/fcmae.safetensors, a "
        "checkpoint dir, an official/timm/transformers checkpoint, hf-hub:owner/name; "
        "none: from scratch"
    )
    drop_path: float = help_field("stochastic depth rate, growing linearly over the blocks", 0.0)
    grad_checkpointing: bool = help_field(
        "recompute activations in the backward pass (less memory, ~30 % more "
        "compute): encoder stages and, where they matter, the heads",
        False,
    )


@dataclass
class OptimConfig:
    batch_size: int = help_field("images per process and micro-batch", 64)
    grad_accum: int = help_field("micro-batches per optimizer step", 1)
    blr: float = help_field("base lr: lr = blr x effective batch / 256", 1e-3)
    lr: float | None = help_field("absolute lr; overrides blr")
    weight_decay: float = help_field("AdamW weight decay (1-D parameters, biases, GRN and layer scale exempt)", 0.05)
    beta1: float = 0.9
    beta2: float = 0.999
    clip_grad: float | None = help_field("clip the gradient norm to this")
    layer_decay: float = help_field("layer-wise lr decay of the encoder (1: none)", 1.0)
    layer_decay_type: str = help_field("how encoder layers are numbered for --layer-decay", "single")


@dataclass
class ScheduleConfig:
    epochs: int = 100
    max_steps: int | None = help_field("stop after this many optimizer steps (the schedule spans them)")
    warmup_epochs: float | None = help_field("linear warmup from 0, in epochs", 0.0)
    warmup_steps: int | None = help_field(
        "linear warmup from 0, in steps (overrides --warmup-epochs; with neither: "
        "min(--warmup-cap, a tenth of the run))"
    )
    warmup_cap: int | None = help_field("without --warmup-steps/--warmup-epochs: warm up min(this, steps / 10)")
    min_lr: float = 0.0
    decay: str = help_field(
        "lr decay after the warmup: cosine | poly (linear to --min-lr) | step (x0.1 at each "
        "--lr-milestones; without milestones: cosine)",
        "cosine",
    )
    lr_milestones: list[int] | None = help_field("--decay step: epochs (of --epochs) where the lr drops x0.1")


PRECISIONS = ("no", "fp16", "bf16", "auto")


def resolve_precision(value: str) -> str:
    """``--mixed-precision`` as Accelerate takes it: ``auto`` is bf16 on a CUDA GPU that supports it,
    else no (a CPU without native bf16 emulates it: a Mask R-CNN step took 2.3x as long on a 2-core
    AMD EPYC, a UPerNet step about 10x)."""
    if value != "auto":
        return value
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


@dataclass
class RuntimeConfig:
    mixed_precision: str = help_field(
        "no | fp16 | bf16 | auto (bf16 on a GPU that has it, else no: CPUs emulate bf16, several times slower)", "no"
    )
    compile: bool = help_field("torch.compile the model (in place: checkpoint names do not change)", False)
    channels_last: bool = False
    cudnn_benchmark: bool = help_field(
        "CUDA: autotune convolutions (--no-cudnn-benchmark: bitwise-repeatable runs)", True
    )
    seed: int = 0
    output_dir: str = "outputs/run"
    overwrite: bool = help_field(
        "start afresh in an --output-dir that holds another run: deletes its checkpoints/, log.jsonl and weights first",
        False,
    )
    save_every: int | None = help_field("checkpoint every N optimizer steps (and at the end)")
    keep_last: int = help_field("checkpoints kept", 2)
    resume: str | None = help_field("auto (newest checkpoint in output_dir) or a checkpoint/run directory")
    log_every: int = help_field("optimizer steps between log rows", 20)
    report_to: str = help_field("auto (tensorboard if installed) | none | tensorboard | wandb | all", "auto")
    push_to_hub: str | None = help_field("OWNER/NAME: export and push to the Hugging Face Hub at the end")
    hub_private: bool = False
    eval_every: int | None = help_field("evaluate every N optimizer steps (and at the end)")
    eval_only: bool = help_field("evaluate --checkpoint on the validation split and exit", False)
    checkpoint: str | None = help_field("--eval-only: the run directory or weights to evaluate")
    dist_timeout: int | None = help_field(
        "seconds a collective may wait before the run fails (default: 300 under "
        "Slurm, so a lost node ends the job and its requeue starts; else 1800)"
    )
    elastic: str = help_field(
        "a checkpoint from another number of processes: refuse | keep-global-batch (same global "
        "batch, same samples) | allow-batch-change",
        "keep-global-batch",
    )


class _NoTask:
    """Placeholder task section of a config without task fields."""


@dataclass(frozen=True)
class Alias:
    """A deprecated field name: ``target`` receives ``convert(value, flags)`` and a warning names the new flag."""

    target: str
    note: str = ""
    convert: Callable | None = None


def _parse_bool(s: str) -> bool:
    if s.lower() in _TRUE | _FALSE:
        return s.lower() in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _unoptional(t):
    if typing.get_origin(t) in (typing.Union, types.UnionType):  # Optional[X] -> X
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _convert(value, t, name: str):
    if value is None or t is typing.Any:
        return value
    if isinstance(value, str) and value.lower() in ("none", "null", "~"):
        return None
    try:
        if t is bool:
            return value if isinstance(value, bool) else _parse_bool(str(value))
        if t is float:
            return float(value)
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if typing.get_origin(t) in (list, tuple):
            items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            inner = (typing.get_args(t) or (typing.Any,))[0]
            return [_convert(v.strip() if isinstance(v, str) else v, inner, name) for v in items]
        return t(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError):
        raise ValueError(f"Config field {name!r} expects {getattr(t, '__name__', t)}, got {value!r}.") from None


_INDEX: dict[type, dict] = {}


class _Defaults(type):
    """``TaskConfig.lr`` on the class: the field's default for that task (its recipe's value)."""

    def __getattr__(cls, name: str):
        if not name.startswith("_") and name in cls.fields():
            return cls.default(name)
        raise AttributeError(f"type object {cls.__name__!r} has no attribute {name!r}")


class Config(metaclass=_Defaults):
    """A sectioned config (see the module docstring). Subclasses set ``TASK`` (their own section's
    dataclass), ``DEFAULTS`` (the recipe: flat field -> value), ``UNUSED`` (shared fields that mean
    nothing to the task: no flag, and a YAML key naming one is an error), ``ALIASES`` and ``HELP``
    (task-specific help lines of shared fields), and may override ``check``."""

    SECTIONS: ClassVar[dict[str, type]] = {
        "dataset": DataConfig,
        "encoder": EncoderConfig,
        "optim": OptimConfig,
        "schedule": ScheduleConfig,
        "runtime": RuntimeConfig,
    }
    TASK: ClassVar[type] = _NoTask
    DEFAULTS: ClassVar[dict] = {}
    UNUSED: ClassVar[frozenset[str]] = frozenset()
    ALIASES: ClassVar[dict[str, Alias]] = {}
    HELP: ClassVar[dict[str, str]] = {}

    def __init__(self, **values):
        """Defaults, the recipe, then ``values`` (flat fields, or section names with a dict or a section)."""
        sections = {name: cls() for name, cls in self.sections().items()}
        object.__setattr__(self, "_sections", sections)
        for name, value in {**self.DEFAULTS, **values}.items():
            setattr(self, name, value)

    @classmethod
    def sections(cls) -> dict[str, type]:
        return {**cls.SECTIONS, **({"task": cls.TASK} if dataclasses.is_dataclass(cls.TASK) else {})}

    @classmethod
    def fields(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        """flat name -> (section, field) of the fields this config takes (not ``UNUSED``); a name in two
        sections is a bug of the subclass."""
        if cls not in _INDEX:
            _INDEX[cls] = cls._index()
        return _INDEX[cls]

    @classmethod
    def _index(cls) -> dict[str, tuple[str, dataclasses.Field]]:
        index = {}
        for section, dc in cls.sections().items():
            for f in dataclasses.fields(dc):
                if f.name in cls.UNUSED:
                    continue
                if f.name in index:
                    raise TypeError(
                        f"{cls.__name__}: field {f.name!r} is in sections {index[f.name][0]} and {section}."
                    )
                index[f.name] = (section, f)
        return index

    @classmethod
    def field_type(cls, name: str):
        section, f = cls.fields()[name]
        return _unoptional(typing.get_type_hints(cls.sections()[section])[f.name])

    @classmethod
    def default(cls, name: str):
        if name in cls.DEFAULTS:
            return cls.DEFAULTS[name]
        f = cls.fields()[name][1]
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    def __getattr__(self, name: str):
        sections = self.__dict__.get("_sections", {})
        if name in sections:
            return sections[name]
        for section in sections.values():
            if name in section.__dataclass_fields__:
                return getattr(section, name)
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def __setattr__(self, name: str, value) -> None:
        sections = self._sections
        if name in sections:
            if isinstance(value, dict):
                for k, v in value.items():
                    self._set_in(name, k, v)
            elif isinstance(value, self.sections()[name]):
                sections[name] = value
            else:
                raise TypeError(f"section {name} takes a mapping or a {self.sections()[name].__name__}")
            return
        index = self.fields()
        if name not in index:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        setattr(sections[index[name][0]], name, value)

    def _set_in(self, section: str, name: str, value) -> None:
        index = self.fields()
        if name not in index:
            raise ValueError(unknown_key(name, index, f"section {section!r}"))
        if index[name][0] != section:
            raise ValueError(f"Config key {name!r} belongs to section {index[name][0]!r}, not {section!r}.")
        setattr(self, name, value)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._sections == other._sections

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._sections.items())})"

    def to_dict(self) -> dict:
        """Plain nested dict, one mapping per section (what config.yaml holds)."""
        index = self.fields()
        return {
            name: {k: v for k, v in dataclasses.asdict(section).items() if k in index}
            for name, section in self._sections.items()
        }

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag and the fix for any inconsistent value."""
        if self.push_to_hub:
            from huggingface_hub.utils import validate_repo_id

            try:  # a typo fails now, not after training
                validate_repo_id(self.push_to_hub)
            except Exception as e:  # noqa: BLE001 - HFValidationError is a ValueError in some versions only
                raise ValueError(f"--push-to-hub {self.push_to_hub!r}: {e}") from None
        self.dataset.validate()
        if self.decay == "step" and self.lr_milestones and not all(0 < m < self.epochs for m in self.lr_milestones):
            raise ValueError(
                f"--lr-milestones {self.lr_milestones} must lie between 0 and --epochs {self.epochs} (epochs where "
                "the lr drops x 0.1; with --max-steps, fractions of --epochs). A 1x schedule: --epochs 12 "
                "--lr-milestones 8,11; none: cosine."
            )
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"--mixed-precision must be no, fp16, bf16 or auto; got {self.mixed_precision!r}.")
        for name in (
            "batch_size",
            "grad_accum",
            "keep_last",
            "log_every",
            "epochs",
            "save_every",
            "max_steps",
            "eval_every",
            "dist_timeout",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {value}.")
        if self.decay not in ("cosine", "poly", "step"):
            raise ValueError(f"--decay must be cosine, poly or step; got {self.decay!r}.")
        if self.elastic not in ("refuse", "keep-global-batch", "allow-batch-change"):
            raise ValueError(
                f"--elastic must be refuse, keep-global-batch or allow-batch-change; got {self.elastic!r}."
            )
        if self.model is not None:
            from ..models.registry import model_entry

            model_entry(self.model)  # an unknown name raises, with a "did you mean"
        if "eval_only" not in self.UNUSED and self.eval_only != bool(self.checkpoint):
            raise ValueError(
                "--eval-only needs --checkpoint (a run directory or its best.safetensors), and "
                "--checkpoint is for --eval-only (to continue a run use --resume)."
            )
        self.check()

    def check(self) -> None:
        """A task's own checks (called by ``validate``)."""

    def elastic_blocker(self) -> str | None:
        """Why a checkpoint of this run cannot resume on another number of processes (None: it can)."""
        return None


class RunConfig(Config):
    """The shared sections alone (no task fields): what every task's config starts from."""


def unknown_key(name: str, index, where: str = "config") -> str:
    close = difflib.get_close_matches(name, index, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"Unknown config field {name!r} in {where}{hint}. Known fields: {', '.join(sorted(index))}."


def load_yaml(path: str | os.PathLike) -> dict:
    """The mapping of a YAML config file: flat keys and sections (``optim: {lr: ...}``), '-' read as '_'."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of field: value, got {type(data).__name__}.")
    out = {}
    for key, value in data.items():
        key = str(key).replace("-", "_")
        out[key] = (
            {str(k).replace("-", "_"): v for k, v in value.items()}
            if isinstance(value, dict) and key in SECTION_NAMES
            else value
        )
    return out


def _resolve_aliases(cls, values: dict, given: dict) -> dict:
    """``values`` with each deprecated key replaced by what it means (``given``: every layer merged,
    for aliases whose meaning depends on another field). A new key in the same layer wins."""
    out = {k: v for k, v in values.items() if k not in cls.ALIASES}
    for k, v in values.items():
        alias = cls.ALIASES.get(k)
        if alias is None:
            continue
        warnings.warn(
            f"--{k.replace('_', '-')} is deprecated: {alias.note or 'use --' + alias.target.replace('_', '-')}",
            FutureWarning,
            stacklevel=4,
        )
        for target, value in (alias.convert(v, given) if alias.convert else {alias.target: v}).items():
            out.setdefault(target, value)
    return out


# what a run's config.yaml records beside its fields: facts resolved at the start (fcmae.training.run),
# skipped when that file is given back as --config, so a run's config.yaml starts a new run
RUN_FACTS = frozenset(
    {
        "world_size",
        "distributed_type",
        "effective_batch_size",
        "abs_lr",
        "steps_per_epoch",
        "total_steps",
        "warmup_steps_resolved",
        "lr_milestone_steps",
        "mixed_precision_resolved",
        "num_classes",
        "classes",
        "categories",
        "dropped",
        "encoder_load",
    }
)


def build(cls, *layers: dict):
    """An instance of config class ``cls`` from its defaults updated by ``layers`` in order (flat or
    sectioned mappings); unknown keys are an error that names the known ones (``RUN_FACTS``, what a
    run's config.yaml adds, are skipped)."""
    index = cls.fields()
    cfg = cls()
    given = {}
    for layer in layers:
        given.update(flatten(layer))
    for layer in layers:
        layer = _resolve_aliases(cls, layer, given)
        for k, v in layer.items():
            if k in cls.sections() and isinstance(v, dict):
                for name, value in v.items():
                    if name not in index:
                        raise ValueError(unknown_key(name, index, f"section {k!r}"))
                    cfg._set_in(k, name, _convert(value, cls.field_type(name), name))
                continue
            if k not in index:
                if k in RUN_FACTS:
                    continue
                raise ValueError(unknown_key(k, index))
            setattr(cfg, k, _convert(v, cls.field_type(k), k))
    return cfg


def parser_for(cls, description: str = "", prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of config class ``cls``: ``--config`` and one flag per field (and alias)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file of field: value, flat or in sections (flags override it)")
    index = cls.fields()
    for section in cls.sections():
        group = parser.add_argument_group(section)
        for name, (_, f) in ((n, v) for n, v in index.items() if v[0] == section):
            _add_flag(
                group, name, cls.field_type(name), cls.HELP.get(name, f.metadata.get("help", "")), cls.default(name)
            )
    aliases = parser.add_argument_group("deprecated")
    for name, alias in cls.ALIASES.items():
        _add_flag(
            aliases,
            name,
            cls.field_type(alias.target) if alias.convert is None else str,
            f"deprecated: {alias.note or 'use --' + alias.target.replace('_', '-')}",
            None,
        )
    return parser


def _add_flag(group, name: str, t, text: str, default) -> None:
    flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
    doc = f"{text} (default: {default!r})".strip().replace("%", "%%")  # argparse formats help with %
    if t is bool:
        group.add_argument(
            *flags, dest=name, nargs="?", const=True, default=argparse.SUPPRESS, type=_parse_bool, help=doc
        )
        group.add_argument(
            f"--no-{name.replace('_', '-')}",
            dest=name,
            action="store_false",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    else:
        group.add_argument(*flags, dest=name, default=argparse.SUPPRESS, help=doc)


def parse_args(cls, argv: list[str] | None = None, description: str = "", choose_preset=None, prog: str | None = None):
    """Parse ``argv`` into ``cls``: defaults < recipe < preset (``choose_preset(flags, yaml) -> dict``)
    < YAML < flags."""
    args = vars(parser_for(cls, description, prog).parse_args(argv))
    config_file = args.pop("config", None)
    file_values = load_yaml(config_file) if config_file else {}
    preset = choose_preset(args, flatten(file_values)) if choose_preset else {}
    return build(cls, preset, file_values, args)


# what a user can cause and fix: a bad flag, path, size, file or checkpoint. Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, FloatingPointError)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a command line tool prints it: one line, no source excerpt."""
    return f"{category.__name__}: {message}\n"


def exit_on_user_error(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a user error exits with status 2 and its message, no traceback
    (``FCMAE_DEBUG=1`` keeps the traceback); a run stopped by a signal, its checkpoint written, exits
    with ``EXIT_PREEMPTED`` (75)."""
    from .preempt import EXIT_PREEMPTED, Preempted

    warnings.formatwarning = _one_line_warning
    try:
        return fn(*args, **kwargs)
    except Preempted:
        sys.exit(EXIT_PREEMPTED)
    except USER_ERRORS as e:
        if os.environ.get("FCMAE_DEBUG"):
            raise
        tqdm.write(f"error: {e}", file=sys.stderr)  # clears a progress bar first
        sys.stderr.flush()
        sys.exit(2)


def cli(cls, run, argv: list[str] | None = None, description: str = "", choose_preset=None, prog: str | None = None):
    """An entry point: parse ``argv`` into ``cls`` and call ``run(cfg)``, user errors exiting with 2."""
    return exit_on_user_error(lambda: run(parse_args(cls, argv, description, choose_preset, prog)))


def images_parser(prog: str, description: str, checkpoint: str, out_dir: str | None = None) -> argparse.ArgumentParser:
    """The parser of a command over images (``fcmae predict`` of each kind): IMAGES (files or folders),
    ``--checkpoint`` (help ``checkpoint``) and, with ``out_dir``, ``--out-dir`` (its default)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--checkpoint", required=True, help=checkpoint)
    if out_dir is not None:
        parser.add_argument("--out-dir", default=out_dir, help=f"where the outputs go (default {out_dir})")
    return parser


def save_yaml(data: dict, path: str | os.PathLike) -> None:
    """Write YAML atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
