"""Model registry: ``@register_model`` entry points, ``create_model`` and ``list_models``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, e.g. ``"convnextv2_*"``."""
    import fnmatch

    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def model_entry(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        import difflib

        close = difflib.get_close_matches(name, _MODELS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown model {name!r}.{hint} Known models: {', '.join(list_models())}.")
    return _MODELS[name]


def create_model(
    name: str,
    num_classes: int = 1000,
    drop_path_rate: float = 0.0,
    head_init_scale: float = 1.0,
    in_chans: int = 3,
    **kwargs,
) -> nn.Module:
    """Build a registered model with fresh weights (std 0.02 truncated normal, zero biases).
    ``in_chans``: image channels the stem takes (3 for RGB); to start such a model from RGB weights,
    see ``fcmae.weights.adapt.adapt_stem``."""
    return model_entry(name)(
        num_classes=num_classes,
        drop_path_rate=drop_path_rate,
        head_init_scale=head_init_scale,
        in_chans=in_chans,
        **kwargs,
    )
