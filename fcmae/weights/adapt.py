"""Start a model that takes N image channels from RGB weights: adapt the stem, as timm does.

timm's ``adapt_input_conv`` (timm.models, used by its ``load_pretrained`` whenever ``in_chans`` differs
from the weights') turns a 3-channel first convolution into an N-channel one: for N = 1 it sums the
RGB filters, so a grey image gives what the RGB model gives on the same grey image in every channel;
otherwise it repeats the RGB filters ceil(N / 3) times, keeps the first N and scales them by 3 / N,
so that the filters' total weight stays about that of the RGB stem (exactly when 3 divides N). fcmae calls
timm's function itself, so an adapted fcmae model and timm's ``create_model(..., in_chans=N,
pretrained=True)`` start from the same stem.
"""

from __future__ import annotations

import torch

STEM_KEY = "stem.0.weight"  # fcmae's (timm's) name of the stem convolution, (C1, in_chans, k, k)


def stem_channels(state_dict: dict[str, torch.Tensor], key: str = STEM_KEY) -> int | None:
    """Input channels of the stem convolution in ``state_dict`` (fcmae names), None if it has no stem."""
    w = state_dict.get(key)
    return int(w.shape[1]) if w is not None and w.ndim == 4 else None


def adapt_stem(
    state_dict: dict[str, torch.Tensor], in_chans: int, key: str = STEM_KEY
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Fit the stem of ``state_dict`` (fcmae's names, e.g. after ``convert_state_dict``) to a model
    taking ``in_chans`` channels.

    Returns ``(state_dict, message)``: the same dict and None when the channel counts already agree
    (or there is no stem); else a new dict whose ``key`` holds timm's ``adapt_input_conv(in_chans,
    weight)`` and a one-line description of what was done. Only 3-channel (RGB) stems are adapted,
    as timm does; any other mismatch raises ``ValueError`` naming both counts.
    """
    from timm.models import adapt_input_conv

    if in_chans < 1:
        raise ValueError(f"in_chans must be a positive channel count; got {in_chans}.")
    have = stem_channels(state_dict, key)
    if have is None or have == in_chans:
        return state_dict, None
    if have != 3:
        raise ValueError(
            f"The checkpoint's stem ({key}) takes {have} input channels and the model {in_chans}: only "
            f"3-channel (RGB) stems can be adapted. Create the model with in_chans={have}, or start "
            "from RGB weights."
        )
    out = dict(state_dict)
    out[key] = adapt_input_conv(in_chans, state_dict[key])
    how = "sum over the RGB channels" if in_chans == 1 else "repeat and rescale"
    return out, f"adapted the stem from 3 to {in_chans} input channels (timm adapt_input_conv: {how})"
