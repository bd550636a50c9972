"""Samples: decode with bad-image accounting, stand-ins for unreadable images, seeded augmentation.

A pretraining sample is `(image, ok)`: a normalised float tensor (C, S, S), and False where the image
at that index could not be decoded. The tensor is then a stand-in (the next decodable image; in
streaming, another image of the same batch), so batches keep their shape. Augmentation is a pure
function of (seed, epoch, index): it depends neither on num_workers nor on the process.

Bad images are counted twice over, on purpose: each worker counts what it decodes (a safety net,
which warns naming the first bad files and raises past the limit), and the training loop counts the
`ok` flags of the batches it receives, on the device, with a `BadImageCounter` or `check_bad_fraction`
on the reduced sums: worker counters never reach the main process.
"""

from __future__ import annotations

import contextlib
import random
import warnings

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN

from .arrays import Reader
from .decode import path_of

MIN_SEEN, ALL_BAD_AFTER, MAX_NAMED = 100, 20, 20


def sample_seed(*words: int) -> int:
    """A 32-bit seed mixed from non-negative integers, e.g. (seed, epoch, index)."""
    return int(np.random.SeedSequence(list(words)).generate_state(1)[0])


@contextlib.contextmanager
def seeded(seed: int):
    """Seed torch, random and numpy for one sample, then restore their states. The restore
    means that with num_workers=0 the main process's RNG (used for the masks) is left untouched."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class TooManyBadFiles(ValueError, RuntimeError):
    """Too many unreadable files: a user error (ValueError: the entry points exit with status 2 and
    one line), still the RuntimeError it always was. Raised inside a DataLoader worker, torch
    re-raises it in the main process with the worker's traceback as its message
    (torch.utils.data's ExceptionWrapper); ``str`` keeps the one line that says what to fix."""

    def __str__(self):
        text = super().__str__()
        if text.startswith("Caught ") and "Traceback" in text:
            return text.rstrip().splitlines()[-1].split(": ", 1)[-1]
        return text


def check_bad_fraction(num_bad: int, num_seen: int, max_bad_fraction: float) -> None:
    """Raise once more than max_bad_fraction of the images seen have failed. The check starts
    after MIN_SEEN images, or after ALL_BAD_AFTER if none has worked yet."""
    if num_bad and (
        (num_seen >= MIN_SEEN and num_bad > max_bad_fraction * num_seen)
        or (num_bad == num_seen and num_seen > ALL_BAD_AFTER)
    ):
        raise TooManyBadFiles(
            f"{num_bad} of {num_seen} images ({num_bad / num_seen:.1%}) could not be read (or had another channel "
            f"count than --in-chans), more than the allowed {max_bad_fraction:.1%}. The warnings above name the "
            "first bad files. Fix or remove them, or raise DataConfig.max_bad_fraction (--max-bad-fraction)."
        )


class BadImageCounter:
    """Main-process count of bad images, fed with the `ok` flags of each batch."""

    def __init__(self, max_bad_fraction: float = 0.01):
        self.max_bad_fraction, self.num_bad, self.num_seen = max_bad_fraction, 0, 0

    def update(self, ok: torch.Tensor) -> None:
        self.num_seen += ok.numel()
        self.num_bad += int((~ok.bool()).sum())
        check_bad_fraction(self.num_bad, self.num_seen, self.max_bad_fraction)


class ImageSamples:
    """What every dataset of images shares: decoding with this process's bad-image counters
    `num_seen`, `num_bad` and `bad_files` (the first MAX_NAMED names), the stand-in rule, and
    per-sample seeded augmentation. ``hf`` is a datasets object with an 'image' column; ``reader``
    (fcmae.data.arrays.Reader) turns its values into RGB images or N-channel arrays."""

    def __init__(self, hf, transform, seed: int = 0, max_bad_fraction: float = 0.01, reader: Reader | None = None):
        self.hf, self.transform, self.seed, self.epoch = hf, transform, seed, 0
        self.reader = reader or Reader()
        self.max_bad_fraction, self.num_seen, self.num_bad, self.bad_files = max_bad_fraction, 0, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def key(self, key) -> tuple[int, int]:
        """(index, epoch) from a sampler's key: an index, or (index, epoch) from `EpochSampler`."""
        return key if isinstance(key, tuple) else (key, self.epoch)

    def decode(self, value, index: int) -> Image.Image | np.ndarray | None:
        """The RGB image or array, or None (counted, and named in a warning) if it cannot be read
        or has the wrong number of channels."""
        self.num_seen += 1
        try:
            image = self.reader(value)
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError...; read_array a ValueError
            image, self.num_bad = None, self.num_bad + 1
            if len(self.bad_files) < MAX_NAMED:
                self.bad_files.append(path_of(value) or f"#{index}")
                more = " (further bad images are counted, not named)" if len(self.bad_files) == MAX_NAMED else ""
                what = f"{self.bad_files[-1]}: {type(e).__name__}: {e}{more}"
                warnings.warn(f"Skipping unreadable image {what}", stacklevel=2)
        check_bad_fraction(self.num_bad, self.num_seen, self.max_bad_fraction)
        return image

    def read(self, index: int, stand_in: bool = True) -> tuple[Image.Image | None, int, bool]:
        """(image, index it came from, ok) for row ``index`` of a map-style dataset. Unreadable: ok
        is False and, with ``stand_in``, the next decodable row stands in (not counted again: it is
        counted when its own turn comes); without, the image is None."""
        image = self.decode(self.hf[index]["image"], index)
        if image is not None or not stand_in:
            return image, index, image is not None
        tries = min(len(self.hf), MIN_SEEN + 1)
        for step in range(1, tries):
            other = (index + step) % len(self.hf)
            with contextlib.suppress(Exception):
                return self.reader(self.hf[other]["image"]), other, False
        raise TooManyBadFiles(
            f"Image {index} and the {tries - 1} after it could not be read (or had another channel "
            f"count than --in-chans), e.g. {self.bad_files[0]}. Check the data."
        )

    def augment(self, image: Image.Image, epoch: int, index: int):
        """``transform(image)`` with the RNGs seeded from (seed, epoch, index)."""
        with seeded(sample_seed(self.seed, epoch, index)):
            return self.transform(image)


class PretrainImages(ImageSamples, torch.utils.data.Dataset):
    """Map-style: `ds[i]` or `ds[(i, epoch)]` -> (image, ok), augmented with seed (seed, epoch, i);
    with ``with_index``, (image, ok, i): the sample's index keys its masks and drop path."""

    with_index = False

    def __len__(self):
        return len(self.hf)

    def __getitem__(self, key):
        index, epoch = self.key(key)
        image, _, ok = self.read(index)
        out = self.augment(image, epoch, index), ok
        return (*out, index) if self.with_index else out


class StreamingPretrainImages(ImageSamples, torch.utils.data.IterableDataset):
    with_index = False  # also yield each sample's position in the global stream

    """This rank's stream, cut into `num_batches` groups of `batch_size`. Worker w of W decodes
    the groups g with g % W == w. The DataLoader collects worker batches round-robin, so it
    returns the groups in stream order, whatever W. Each worker reads the whole stream but decodes
    only its own groups."""

    def __init__(
        self,
        hf,
        transform,
        batch_size,
        num_batches,
        input_size,
        seed=0,
        rank=0,
        world_size=1,
        max_bad_fraction=0.01,
        reader=None,
        mean=IMAGENET_DEFAULT_MEAN,
    ):
        super().__init__(hf, transform, seed, max_bad_fraction, reader)
        self.mean = list(mean or IMAGENET_DEFAULT_MEAN)
        self.batch_size, self.num_batches, self.input_size = batch_size, num_batches, input_size
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.hf.set_epoch(epoch)  # the shuffle's seed is seed + epoch

    def __len__(self):
        return self.num_batches * self.batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # .iter(), not iter(): inside a worker, iter() would split the shards between workers.
        groups, g = self.hf.iter(batch_size=self.batch_size, drop_last_batch=True), -1
        for g, group in zip(range(self.num_batches), groups):
            if g % workers == worker:
                yield from self._group(g * self.batch_size, group["image"])
        if g + 1 < self.num_batches:
            raise RuntimeError(
                f"Rank {self.rank}'s stream ended after {g + 1} batches, but "
                f"{self.num_batches} were expected: is DataConfig.num_examples right?"
            )

    def _group(self, first, values):
        images = [self.decode(v, first + k) for k, v in enumerate(values)]
        good = [im for im in images if im is not None]
        if not good:  # a whole batch unreadable: the mean in every pixel (zeros after normalisation)
            good = [self.reader.stand_in(self.input_size, self.mean)]
        for k, image in enumerate(images):
            index = (first + k) * self.world_size + self.rank  # position in the global stream
            out = self.augment(good[k % len(good)] if image is None else image, self.epoch, index), image is not None
            yield (*out, index) if self.with_index else out
