"""Fuzz the transforms over odd images: every RandAugment op of the default fine-tuning recipe at its
extreme magnitudes (and with its magnitude noise), the whole timm pipeline with RandomErasing, and the
pretraining and evaluation transforms. Images: gray, RGBA, palette, 16-bit, 1x1, 2x3, thin,
non-square, large, all converted with to_rgb as the loaders do.

References: ops other than posterize against timm's own op functions with the same draws; posterize
against the bit mask worked out with numpy (value & ~(2^(8 - bits) - 1), zero for 0 bits kept); the
pretraining and evaluation transforms against the normalised colour of a solid image."""

import copy
import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import auto_augment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from fcmae.data import eval_transform, pretrain_transform, sample_seed, seeded, to_rgb, train_transform

RECIPE = "rand-m9-mstd0.5-inc1"  # the official fine-tuning recipe's RandAugment


def noise(h, w, channels=3, seed=0, dtype=np.uint8, high=256):
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def odd_images():
    """{name: RGB image}, each made the way the loaders make them: to_rgb of whatever was decoded."""
    palette = Image.fromarray(noise(9, 14, 1, 3, high=4)).convert("P")
    made = {
        "gray": Image.fromarray(noise(37, 23, 1, 1), "L"),
        "rgba": Image.fromarray(noise(30, 40, 4, 2), "RGBA"),
        "la": Image.fromarray(noise(11, 7, 2, 4)[..., :2].copy(), "LA"),
        "palette": palette,
        "sixteen_bit": Image.fromarray(noise(12, 20, 1, 5, np.uint16, 65536)),
        "1x1": Image.fromarray(noise(1, 1, 3, 6)),
        "2x3": Image.fromarray(noise(2, 3, 3, 7)),
        "3x2": Image.fromarray(noise(3, 2, 3, 8)),
        "thin": Image.fromarray(noise(1, 61, 3, 9)),
        "tall": Image.fromarray(noise(97, 13, 3, 10)),
        "large": Image.fromarray(noise(480, 640, 3, 11)),
    }
    return {name: to_rgb(image) for name, image in made.items()}


IMAGES = odd_images()


def rand_augment(transform):
    """The RandAugment inside a timm Compose."""
    (found,) = [t for t in transform.transforms if isinstance(t, auto_augment.RandAugment)]
    return found


def with_magnitude(op, magnitude, std=0.0, magnitude_max=None):
    op = copy.copy(op)
    op.prob, op.magnitude, op.magnitude_std, op.magnitude_max = 1.0, magnitude, std, magnitude_max
    return op


def expected(op, image, seed):
    """What ``op`` gives with ``random`` seeded to ``seed``, from timm's op functions and level
    tables, except posterize, whose result is the bit mask applied with numpy."""
    random.seed(seed)
    magnitude = random.gauss(op.magnitude, op.magnitude_std) if op.magnitude_std > 0 else op.magnitude
    magnitude = max(0.0, min(magnitude, op.magnitude_max or 10))  # timm's clip (_LEVEL_DENOM = 10)
    level_fn = auto_augment.LEVEL_TO_ARG[op.name]
    args = level_fn(magnitude, op.hparams) if level_fn is not None else ()
    if op.name.startswith("Posterize"):
        bits = args[0]
        if bits >= 8:
            return image
        mask = ~(2 ** (8 - bits) - 1)  # bits <= 0: no bit of a byte survives
        return Image.fromarray((np.asarray(image).astype(np.int64) & mask).astype(np.uint8))
    return auto_augment.NAME_TO_OP[op.name](image, *args, **dict(op.kwargs))


def test_the_recipe_holds_timms_op_list():
    ours = [op.name for op in rand_augment(train_transform(64, RECIPE, 0.25)).ops]
    timms = [op.name for op in auto_augment.rand_augment_transform(RECIPE, {}).ops]
    assert ours == timms and "PosterizeIncreasing" in ours


@pytest.mark.parametrize("recipe", [RECIPE, "rand-m9-mstd0.5"])  # increasing and plain op lists
def test_every_op_at_extreme_magnitudes_on_odd_images(recipe):
    ops = rand_augment(train_transform(64, recipe, 0.25)).ops
    settings = [(0, 0.0, None), (10, 0.0, None), (12, 0.0, None), (20, 0.0, 20)]  # 12: clipped to 10; 20: mmax20
    settings += [(m, 0.5, None) for m in (9, 10)] + [(0, 0.5, None)]  # the recipe's magnitude noise
    black = 0
    for op in ops:
        for magnitude, std, mmax in settings:
            fuzzed = with_magnitude(op, magnitude, std, mmax)
            for name, image in IMAGES.items():
                if std and name == "large":
                    continue  # noise draws on the small images only (time); the large one at fixed magnitudes
                for seed in range(8) if std else range(1):
                    want = expected(fuzzed, image, seed)
                    random.seed(seed)
                    got = fuzzed(image)
                    where = f"{op.name} m={magnitude} std={std} mmax={mmax} on {name}, seed {seed}"
                    assert got.mode == "RGB" and got.size == image.size, where
                    assert np.array_equal(np.asarray(got), np.asarray(want)), where
                    black += op.name.startswith("Posterize") and not np.asarray(got).any()
    assert black > 0  # the 0-bit posterize was reached, and gave black images


def test_fine_tuning_pipeline_with_random_erasing_on_odd_images(monkeypatch):
    bits_drawn = []
    level_fn = auto_augment.LEVEL_TO_ARG["PosterizeIncreasing"]

    def spy(level, hparams):  # records the bits the pipeline asks posterize for; every 50th is the extreme
        bits = (0,) if len(bits_drawn) % 50 == 49 else level_fn(level, hparams)  # (0 bits kept: ~2 % of draws)
        bits_drawn.append(bits[0])
        return bits

    monkeypatch.setitem(auto_augment.LEVEL_TO_ARG, "PosterizeIncreasing", spy)
    size, names = 32, list(IMAGES)
    tf = train_transform(size, RECIPE, reprob=0.25)
    with seeded(0):  # one seed for the run (per-sample seeding, as in the loaders, would double the time)
        for index in range(1500):
            x = tf(IMAGES[names[index % len(names)]])
            assert x.shape == (3, size, size) and x.dtype == torch.float32 and torch.isfinite(x).all(), index
    assert 0 in bits_drawn  # the pipeline went through 0 bits kept (a black image), whatever the draws
    for size in (64, 224):  # other sizes: a few samples of each image
        tf = train_transform(size, RECIPE, reprob=1.0)
        for index, (name, image) in enumerate(IMAGES.items()):
            with seeded(index):
                assert tf(image).shape == (3, size, size), (size, name)


def solid(h, w, colour=(200, 30, 90)):
    return Image.new("RGB", (w, h), colour)


def normalised(colour):
    return (torch.tensor(colour) / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)


SOLID_SIZES = [(1, 1), (2, 3), (3, 2), (1, 61), (97, 13), (480, 640)]


def test_pretraining_transform_on_odd_images():
    for size in (32, 64):
        tf = pretrain_transform(size)
        for index, (name, image) in enumerate(IMAGES.items()):
            for seed in range(20):
                with seeded(sample_seed(seed, 0, index)):
                    x = tf(image)
                assert x.shape == (3, size, size) and torch.isfinite(x).all(), (size, name, seed)
        for h, w in SOLID_SIZES:  # a solid image stays its colour through any crop and resize
            with seeded(h * 1000 + w):
                x = tf(solid(h, w))
            assert torch.allclose(x, normalised((200, 30, 90))[:, None, None].expand_as(x), atol=1.5 / 255 / 0.22)


@pytest.mark.parametrize("size,crop_pct", [(64, None), (64, 1.0), (96, 0.95), (384, None)])
def test_evaluation_transform_on_odd_images(size, crop_pct):
    tf = eval_transform(size, crop_pct)
    for name, image in IMAGES.items():
        if name == "thin" and size == 384:
            continue  # 1x61 warps to 384x384 like any other; covered at 64 and 96 with a crop
        x = tf(image)
        assert x.shape == (3, size, size) and torch.isfinite(x).all(), name
    for h, w in SOLID_SIZES:
        x = tf(solid(h, w))
        assert x.shape == (3, size, size)
        assert torch.allclose(x, normalised((200, 30, 90))[:, None, None].expand_as(x), atol=1.5 / 255 / 0.22)
