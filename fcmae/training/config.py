"""Dataclass configs with YAML presets and command-line overrides.

Precedence, lowest first: the dataclass defaults, a preset the entry point picks, ``--config FILE``
(YAML), then flags. Every field ``foo_bar`` is a flag ``--foo-bar`` (``--foo_bar`` works too);
booleans take ``--flag`` / ``--no-flag`` or an explicit ``--flag true|false``.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import types
import typing
from pathlib import Path

import yaml
from tqdm.auto import tqdm

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _parse_bool(s: str) -> bool:
    if s.lower() in _TRUE | _FALSE:
        return s.lower() in _TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _field_type(cls, f: dataclasses.Field):
    t = typing.get_type_hints(cls)[f.name]
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


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping of field: value, got {type(data).__name__}.")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build(cls, *layers: dict):
    """An instance of dataclass ``cls`` from its defaults updated by ``layers`` in order; unknown
    keys are an error that names the known ones."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for layer in layers:
        for k, v in layer.items():
            if k not in names:
                close = difflib.get_close_matches(k, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"Unknown config field {k!r}{hint}. Known fields: {', '.join(sorted(names))}.")
            values[k] = _convert(v, _field_type(cls, names[k]), k)
    return cls(**values)


def parse_args(cls, argv: list[str] | None = None, description: str = "", choose_preset=None):
    """Parse ``argv`` into ``cls``: defaults < preset (``choose_preset(flags, yaml) -> dict``) < YAML < flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of field: value (flags override it)")
    for f in dataclasses.fields(cls):
        t = _field_type(cls, f)
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        doc = (f.metadata.get("help", "") + f" (default: {f.default!r})").strip()
        if t is bool:
            parser.add_argument(*flags, dest=f.name, nargs="?", const=True, default=argparse.SUPPRESS,
                                type=_parse_bool, help=doc)
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, help=doc)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    file_values = load_yaml(config_file) if config_file else {}
    preset = choose_preset(args, file_values) if choose_preset else {}
    return build(cls, preset, file_values, args)


# what a user can cause and fix: a bad flag, path, size, file or checkpoint. Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, FloatingPointError)


def exit_on_user_error(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; a user error exits with status 2 and its message, no traceback
    (``FCMAE_DEBUG=1`` keeps the traceback)."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        if os.environ.get("FCMAE_DEBUG"):
            raise
        tqdm.write(f"error: {e}", file=sys.stderr)  # clears a progress bar first
        sys.stderr.flush()
        sys.exit(2)


def cli(cls, run, argv: list[str] | None = None, description: str = "", choose_preset=None):
    """An entry point: parse ``argv`` into ``cls`` and call ``run(cfg)``, user errors exiting with 2."""
    return exit_on_user_error(lambda: run(parse_args(cls, argv, description, choose_preset)))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(data: dict, path: str | os.PathLike) -> None:
    """Write YAML atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the shared fields

def help_field(text: str, default=None):
    """A dataclass field whose ``--help`` line is ``text``."""
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass
class RunConfig:
    """Fields every task has. A task's config subclasses it, adds its own fields and may change
    defaults by declaring a field again; ``validate`` checks the shared ones and ``check`` is the
    task's hook for its own."""

    # model
    model: str | None = help_field("registered model name (fcmae.list_models())")
    input_size: int = 224
    in_chans: int = 3  # input channels: 3 for images; any N for multi-band arrays (.npy, TIFF)
    drop_path: float = 0.0
    # data
    data: str | None = help_field("local data: a folder or parquet/arrow file(s)")
    dataset_name: str | None = help_field("Hub dataset id")
    dataset_config_name: str | None = None
    image_column: str | None = help_field("column holding the images (default: the first Image column)")
    max_bad_fraction: float = 0.01
    num_workers: int = 4
    mean: list[float] | None = help_field("per-channel mean (default ImageNet's; required when --in-chans is not 3)")
    std: list[float] | None = help_field("per-channel std (default ImageNet's; required when --in-chans is not 3)")
    channel_axis: str = "last"  # .npy / TIFF page stacks: (H, W, N) 'last' or (N, H, W) 'first'
    # optimisation
    batch_size: int = 64  # per device
    grad_accum: int = 1
    epochs: int = 100
    max_steps: int | None = help_field("stop after this many optimizer steps (the schedule spans them)")
    blr: float = 1e-3  # lr = blr * effective batch / 256
    lr: float | None = help_field("absolute lr; overrides blr")
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    warmup_steps: int | None = help_field("overrides warmup_epochs")
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    clip_grad: float | None = None
    # runtime
    mixed_precision: str = "no"  # no | fp16 | bf16
    compile: bool = False  # torch.compile the model (in place: checkpoint names do not change)
    channels_last: bool = False
    cudnn_benchmark: bool = True  # CUDA: autotune convolutions for the fixed input size
    seed: int = 0
    output_dir: str = "outputs/run"
    save_every: int | None = help_field("checkpoint every N optimizer steps")
    keep_last: int = 2
    resume: str | None = help_field("auto (newest checkpoint in output_dir) or a checkpoint/run directory")
    log_every: int = 20
    report_to: str = "auto"  # auto (tensorboard if installed) | none | tensorboard | wandb | all
    push_to_hub: str | None = help_field("OWNER/NAME: export and push to the Hugging Face Hub at the end")
    hub_private: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag and the fix for any inconsistent value."""
        if self.push_to_hub:
            from huggingface_hub.utils import validate_repo_id

            try:  # a typo fails now, not after training
                validate_repo_id(self.push_to_hub)
            except Exception as e:  # noqa: BLE001 - HFValidationError is a ValueError in some versions only
                raise ValueError(f"--push-to-hub {self.push_to_hub!r}: {e}") from None
        if self.input_size <= 0 or self.input_size % 32:
            raise ValueError(f"--input-size must be a positive multiple of 32 (the encoder's total stride); got "
                             f"{self.input_size}. Try {max(32, round(self.input_size / 32) * 32)}.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision must be no, fp16 or bf16; got {self.mixed_precision!r}.")
        for name in ("batch_size", "grad_accum", "keep_last", "log_every", "epochs", "save_every", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {value}.")
        if self.in_chans < 1:
            raise ValueError(f"--in-chans must be at least 1; got {self.in_chans}.")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None and self.in_chans != 3:
                raise ValueError(f"--in-chans {self.in_chans} needs --{name} with one value per channel; compute "
                                 "them with: python -m fcmae.data stats DIR")
            if value is not None and len(value) != self.in_chans:
                raise ValueError(f"--{name} has {len(value)} values for {self.in_chans} input channels.")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"--std must be positive; got {self.std}.")
        if self.channel_axis not in ("last", "first"):
            raise ValueError(f"--channel-axis must be last or first; got {self.channel_axis!r}.")
        if self.model is not None:
            from ..models.registry import model_entry

            model_entry(self.model)  # an unknown name raises, with a "did you mean"
        self.check()

    def check(self) -> None:
        """A task's own checks (called by ``validate``)."""
