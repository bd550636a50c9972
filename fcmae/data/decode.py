"""Decoding: any image file (or its bytes) to an 8-bit RGB PIL image, or an exception."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
from datasets.utils.file_utils import xopen
from PIL import Image, ImageOps


def decode_rgb(value) -> Image.Image:
    """A decoded RGB PIL image from a {'bytes', 'path'} dict, bytes or a path. Raises on anything
    unreadable (the datasets of fcmae.data.samples catch it and count the image as bad)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = (value, None) if isinstance(value, (bytes, bytearray)) else (None, value)
    if data is None:
        if path is None:
            raise ValueError("the sample has neither bytes nor a path")
        with xopen(path, "rb") as f:  # local or remote (hf://, https://)
            data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated or corrupt file fails here, not inside a transform
    if 0 in image.size:
        raise ValueError(f"empty image of size {image.size}")
    return to_rgb(image)


def path_of(value) -> str | None:
    """The file name of a {'bytes', 'path'} dict (for messages), if it has one."""
    return value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with 8-bit values. Alpha is dropped, as in torchvision's and timm's loaders. 16-bit
    gray (I;16*, and I, which PIL uses for 16-bit files) is rescaled to 8 bits:
    PIL's own conversion would clip everything above 255 to white."""
    with contextlib.suppress(Exception):  # EXIF orientation, if readable: photos the right way up
        image = ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning for palette transparency
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:  # modes without a direct route (e.g. La) go through RGBA
        return image.convert("RGBA").convert("RGB")


def image_paths(items, extensions=None) -> list[Path]:
    """The files given, and the images (or ``extensions`` files) under the folders given (links
    followed, sorted), in the order given: what the prediction and embedding commands read."""
    from .listing import IMAGE_EXTENSIONS, files_under

    extensions = tuple(extensions or IMAGE_EXTENSIONS)
    return [
        Path(p) for item in map(str, items) for p in (files_under(item, extensions) if os.path.isdir(item) else [item])
    ]


def read_images(paths, reader=decode_rgb):
    """(readable images with their paths, [(path, reason)] for those that could not be read)."""
    good, failed = [], []
    for path in paths:
        try:
            good.append((path, reader(str(path))))
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, ...
            failed.append((path, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__))
    return good, failed


def report_unreadable(failed, total: int) -> int:
    """Name each unreadable file with its reason on stderr; the exit status (1 if any failed)."""
    import sys

    for path, reason in failed:
        print(f"error: cannot read {path}: {reason}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {total} images could not be read.", file=sys.stderr)
    return 1 if failed else 0
