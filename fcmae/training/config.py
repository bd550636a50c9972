"""Dataclass configs with YAML presets and command-line overrides.

Precedence, lowest first: the dataclass defaults, a preset the entry point picks, ``--config FILE``
(YAML), then flags. Every field ``foo_bar`` is a flag ``--foo-bar`` (``--foo_bar`` works too);
booleans take ``--flag`` / ``--no-flag`` or an explicit ``--flag true|false``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path

import yaml

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
            return list(value) if not isinstance(value, str) else [v for v in value.split(",") if v]
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
                import difflib

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


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(data: dict, path: str | os.PathLike) -> None:
    """Write YAML atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)
