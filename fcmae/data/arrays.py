"""N-channel inputs: .npy and multi-band TIFF/GeoTIFF files -> float32 (H, W, N) arrays ->
per-channel transforms -> per-channel statistics.

Values: integer types are scaled to [0, 1] by the range of their dtype (uint8 / 255, uint16 / 65535,
int16 from [-32768, 32767], bool 0/1), so the same statistics and the same normalisation serve 8-bit
and 16-bit sensors; floats are kept as they are (reflectances, dB, indices...), in float32.

Augmentation: only geometric operations, random erasing and a per-channel normalisation. Colour
operations (RandAugment, colour jitter, grayscale) assume three RGB channels in [0, 255]; on other
bands they mean nothing, so they are never applied to arrays, whatever the channel count.

Which reader a sample gets (`Reader`): a .npy file always goes to `read_array`; in a run of
in_chans != 3 every file does (a .tif/.tiff is read band by band, an RGB image is a wrong-count file);
in an RGB run other files are RGB images (fcmae.data.decode), and a TIFF that PIL cannot read
(16-bit or float bands) is read as an array of 3 channels.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import tifffile
import torch
from datasets.utils.file_utils import xopen
from timm.data.random_erasing import RandomErasing
from torchvision import transforms

from .decode import decode_rgb, path_of

ARRAY_EXTENSIONS = (".npy", ".tif", ".tiff")
CHANNEL_AXES = ("last", "first")
EVAL_CROP_PCT = 0.875  # as the RGB evaluation transform: below 384 px, resize to size / 0.875 then crop
_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF and BigTIFF, both byte orders


# ----------------------------------------------------------------------------- decoding


def read_array(value, channel_axis: str = "last", expected_channels: int | None = None) -> np.ndarray:
    """A float32 (H, W, N) array from a .npy or TIFF file: a path, bytes, or a datasets
    {'bytes', 'path'} dict. The format is recognised from the file's first bytes, not its name.

    Layout: a 2-D array is one channel. A 3-D .npy array is (H, W, N) for channel_axis 'last' and
    (N, H, W) for 'first'. A TIFF whose bands are samples of each pixel (SamplesPerPixel > 1, as GDAL
    and most GeoTIFF writers store them, interleaved or planar) says where its bands are, and
    channel_axis is not used; a TIFF stored as a stack of single-band pages does not, so channel_axis
    says which axis holds the bands, as for .npy.

    Raises ValueError naming the file for anything unreadable or of the wrong shape, and for a channel
    count other than expected_channels (the loaders count such files as bad).
    """
    if channel_axis not in CHANNEL_AXES:
        raise ValueError(f"channel_axis must be one of {CHANNEL_AXES}, got {channel_axis!r}.")
    data, name = _read_bytes(value)
    if data.startswith(_NPY_MAGIC):
        try:
            array = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - object arrays (ValueError), truncated files (EOFError, ValueError)...
            raise ValueError(f"{name}: not a readable .npy array ({type(e).__name__}: {e}).") from None
        samples_axis = None
    elif data.startswith(_TIFF_MAGIC):
        array, samples_axis = _read_tiff(data, name)
    else:
        raise ValueError(f"{name}: neither a .npy nor a TIFF file (its first bytes are {data[:8]!r}).")
    array = _channels_last(array, samples_axis, channel_axis, name)
    if expected_channels is not None and array.shape[-1] != expected_channels:
        raise ValueError(
            f"{name}: {array.shape[-1]} channels (shape {array.shape[:2]} x {array.shape[-1]} after "
            f"channel_axis={channel_axis!r}), expected {expected_channels}."
        )
    return scale_to_unit(array, name)


@dataclass(frozen=True)
class Reader:
    """``reader(value)``: the sample as a PIL RGB image or a float32 (H, W, N) array (see the module
    docstring); raises ValueError / OSError for an unreadable file or a wrong channel count, which the
    datasets count as bad. ``stand_in(size, mean)``: the sample a fully unreadable batch gets, the
    mean in every pixel (zero after normalisation)."""

    in_chans: int = 3
    channel_axis: str = "last"

    @property
    def arrays(self) -> bool:
        return self.in_chans != 3

    def __call__(self, value):
        name = (path_of(value) or "").lower()
        if self.arrays or name.endswith(".npy") or _has_npy_magic(value):
            return read_array(value, self.channel_axis, self.in_chans)
        try:
            return decode_rgb(value)
        except Exception:
            if not name.endswith((".tif", ".tiff")):
                raise
            return read_array(value, self.channel_axis, self.in_chans)

    def stand_in(self, size: int, mean):
        if not self.arrays:
            from PIL import Image

            return Image.new("RGB", (size, size), tuple(round(255 * m) for m in mean))
        return np.broadcast_to(np.asarray(mean, np.float32), (size, size, self.in_chans)).copy()


def _has_npy_magic(value) -> bool:
    data = value.get("bytes") if isinstance(value, dict) else value
    return isinstance(data, (bytes, bytearray)) and bytes(data[:6]) == _NPY_MAGIC


def _read_bytes(value) -> tuple[bytes, str]:
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        data, path = bytes(value), None
    else:
        data, path = None, os.fspath(value)
    if data is None:
        if path is None:
            raise ValueError("the sample has neither bytes nor a path")
        with xopen(path, "rb") as f:  # local or remote (hf://, https://), as for images
            data = f.read()
    return data, path or "<bytes>"


def _read_tiff(data: bytes, name: str) -> tuple[np.ndarray, int | None]:
    """(array of the first series, index of its samples axis or None). The first series is the
    full-resolution image; GeoTIFF overviews come after it."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            array, axes = series.asarray(), series.axes
    except Exception as e:  # noqa: BLE001 - tifffile raises TiffFileError, KeyError (missing codec), ValueError...
        hint = (
            " (pip install imagecodecs: tifffile needs it for LZW, JPEG, PackBits... compression)"
            if "imagecodecs" in str(e)
            else ""
        )
        raise ValueError(f"{name}: not a readable TIFF ({type(e).__name__}: {e}){hint}.") from None
    return array, (axes.index("S") if "S" in axes and len(axes) == array.ndim else None)


def _channels_last(array: np.ndarray, samples_axis: int | None, channel_axis: str, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim != 3:
        raise ValueError(f"{name}: an array of shape {array.shape}; expected (H, W), (H, W, N) or (N, H, W).")
    elif samples_axis is not None:
        array = np.moveaxis(array, samples_axis, -1)
    elif channel_axis == "first":
        array = np.moveaxis(array, 0, -1)
    if 0 in array.shape:
        raise ValueError(f"{name}: an empty array of shape {array.shape}.")
    return array


def scale_to_unit(array: np.ndarray, name: str = "<array>") -> np.ndarray:
    """float32 values: integers mapped linearly from their dtype's [min, max] to [0, 1]
    (uint8 / 255, uint16 / 65535, int16 (x + 32768) / 65535), bool to 0/1, floats unchanged."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        # float64 first: x / 65535 in float32 would round twice
        return ((array.astype(np.float64) - info.min) / (float(info.max) - info.min)).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise ValueError(f"{name}: values of type {array.dtype} are neither integers, bool nor floats.")


# ----------------------------------------------------------------------------- transforms


class ToChannelsFirst:
    """(H, W, N) numpy array -> float32 tensor (N, H, W); a tensor (C, H, W) passes through."""

    def __call__(self, x):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))).float()
        return x.float()


class ChannelNormalize(transforms.Normalize):
    """transforms.Normalize, with a message that says where to get statistics for the channel count."""

    def __init__(self, mean, std):
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if not mean or len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"mean and std need one value per channel, and std > 0; got mean {mean}, std {std}.")
        super().__init__(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-3] != len(self.mean):
            raise ValueError(
                f"an input of {x.shape[-3]} channels, but mean/std have {len(self.mean)} values. "
                "Compute per-channel statistics with: python -m fcmae.data stats DIR"
            )
        return super().forward(x)


def array_train_transform(input_size: int, mean, std, scale=(0.2, 1.0), reprob: float = 0.0):
    """RandomResizedCrop(scale 0.2..1, bicubic, antialiased) + horizontal flip + per-channel
    normalisation: FCMAE's pretraining augmentation (ConvNeXt V2, official main_pretrain.py) without
    the colour space. Input (H, W, N) array or (N, H, W) tensor; output (N, S, S) float32.
    For fine-tuning: scale (0.08, 1) as timm's RandomResizedCrop, and ``reprob`` > 0 adds timm's
    RandomErasing (per-pixel normal noise, in normalised units: it needs no colour space).

    Random draws come from torch's global generator, as in torchvision: the loaders call the transform
    inside their per-sample seeded context (seed, epoch, index), which makes it reproducible."""
    return transforms.Compose(
        [
            ToChannelsFirst(),
            transforms.RandomResizedCrop(
                input_size, scale=tuple(scale), antialias=True, interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            ChannelNormalize(mean, std),
            *([RandomErasing(reprob, mode="pixel", device="cpu")] if reprob > 0 else []),
        ]
    )


def array_eval_transform(input_size: int, mean, std, crop_pct: float | None = None):
    """As the RGB evaluation transform: below 384 px, resize the short side to input_size / crop_pct
    (0.875) then centre crop; at 384 and above, resize straight to input_size (no crop). Bicubic,
    antialiased, then per-channel normalisation."""
    bicubic = transforms.InterpolationMode.BICUBIC
    if input_size >= 384 and crop_pct is None:
        resize = [transforms.Resize((input_size, input_size), interpolation=bicubic, antialias=True)]
    else:
        resize = [
            transforms.Resize(int(input_size / (crop_pct or EVAL_CROP_PCT)), interpolation=bicubic, antialias=True),
            transforms.CenterCrop(input_size),
        ]
    return transforms.Compose([ToChannelsFirst(), *resize, ChannelNormalize(mean, std)])


# ----------------------------------------------------------------------------- statistics


def read_any(path, channel_axis: str = "last", expected_channels: int | None = None) -> np.ndarray:
    """float32 (H, W, N) in the units the transforms see: .npy/.tif/.tiff through read_array,
    other images as RGB through fcmae.data.decode_rgb, divided by 255."""
    if os.fspath(path).lower().endswith(ARRAY_EXTENSIONS):
        return read_array(path, channel_axis, expected_channels)
    try:
        array = np.asarray(decode_rgb(path))
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError...
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e}).") from None
    if expected_channels is not None and expected_channels != 3:
        raise ValueError(f"{path}: 3 channels (an RGB image), expected {expected_channels}.")
    return scale_to_unit(array, path)


@dataclass
class ChannelStats:
    mean: list[float]
    std: list[float]
    files: int  # files read
    bad: int  # files skipped
    pixels: int  # pixels per channel


def channel_stats(
    paths, channel_axis: str = "last", sample: int = 1000, seed: int = 0, max_bad_fraction: float = 0.01
) -> tuple[list[float], list[float]]:
    """(mean, std) per channel over every pixel of a random sample of `sample` files (all of them
    when there are fewer); see `channel_summary`."""
    stats = channel_summary(paths, channel_axis, sample, seed, max_bad_fraction)
    return stats.mean, stats.std


def channel_summary(
    paths, channel_axis: str = "last", sample: int = 1000, seed: int = 0, max_bad_fraction: float = 0.01
) -> ChannelStats:
    """Per-channel mean and std over every pixel of a random sample of `sample` files, each pixel
    weighing the same. Population std (ddof 0), accumulated in float64 with Chan et al.'s pairwise
    update, so large folders lose no precision. Values are those of `read_any` (integers scaled to
    [0, 1]), the units the transforms' mean and std are in.

    The channel count is the first readable file's; unreadable files and files with another count
    are skipped with a warning, and more than max_bad_fraction of them is a ValueError."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("No files to compute statistics over.")
    chosen = (
        range(len(paths))
        if sample >= len(paths)
        else sorted(np.random.default_rng(seed).choice(len(paths), sample, replace=False).tolist())
    )
    count, mean, m2, channels, bad = 0, None, None, None, []
    for i in chosen:
        try:
            x = read_any(paths[i], channel_axis, channels)
        except (ValueError, OSError) as e:  # OSError: a file that vanished or cannot be opened
            bad.append(paths[i])
            if len(bad) <= 10:
                warnings.warn(f"Skipping {e}", stacklevel=2)
            continue
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        channels, n = x.shape[-1], len(x)
        x_mean = x.mean(0)
        x_m2 = ((x - x_mean) ** 2).sum(0)
        if mean is None:
            count, mean, m2 = n, x_mean, x_m2
        else:  # Chan, Golub and LeVeque (1979): merge two (count, mean, M2) summaries
            delta, total = x_mean - mean, count + n
            mean = mean + delta * n / total
            m2 = m2 + x_m2 + delta**2 * count * n / total
            count = total
    if mean is None or len(bad) > max_bad_fraction * len(chosen):
        raise ValueError(
            f"{len(bad)} of {len(chosen)} files could not be read or have another channel count "
            f"(first: {', '.join(bad[:3])}); fix or remove them, or allow more (max_bad_fraction, "
            "--max-bad-fraction)."
        )
    return ChannelStats(mean.tolist(), np.sqrt(m2 / count).tolist(), len(chosen) - len(bad), len(bad), count)
