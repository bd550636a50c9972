"""Image transforms: FCMAE pretraining, timm's fine-tuning recipe, and evaluation. Inputs are RGB
PIL images (fcmae.data.decode.to_rgb), outputs normalised float tensors (3, S, S); ``mean``/``std``
default to ImageNet's. `by_input` pairs each with its array version (fcmae.data.arrays) for
N-channel samples: the same geometry, no colour operations."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

from .arrays import array_eval_transform, array_train_transform

EVAL_CROP_PCT = 0.875  # below 384 px: resize to size / 0.875, centre crop (ConvNeXt V2's official evaluation)
_BICUBIC = transforms.InterpolationMode.BICUBIC


class ByInput:
    """``image_tf`` for a PIL image, ``array_tf`` for an (H, W, N) array or a tensor: one run may
    mix RGB files and 3-channel .npy arrays (fcmae.data.arrays.Reader says which each sample is)."""

    def __init__(self, image_tf, array_tf):
        self.image_tf, self.array_tf = image_tf, array_tf

    def __call__(self, x):
        if isinstance(x, (np.ndarray, torch.Tensor)):
            return self.array_tf(x)
        if not self.image_tf:
            raise ValueError("an RGB image where N-channel arrays are expected (--in-chans is not 3)")
        return self.image_tf(x)

    def __repr__(self):
        return f"ByInput(image={self.image_tf!r}, array={self.array_tf!r})"


def by_input(kind: str, input_size: int, mean=None, std=None, **kwargs) -> ByInput:
    """The 'pretrain', 'train' (kwargs: aa, reprob, color_jitter) or 'eval' (kwargs: crop_pct)
    transform of images and of arrays. Arrays get RandomResizedCrop (pretraining's scale 0.2..1,
    timm's 0.08..1 for fine-tuning), flip and RandomErasing (``reprob``); never RandAugment or
    colour jitter, which assume RGB."""
    mean, std = list(mean or IMAGENET_DEFAULT_MEAN), list(std or IMAGENET_DEFAULT_STD)
    rgb = len(mean) == 3  # an N-channel run reads every file as an array (arrays.Reader): no image transform
    if kind == "pretrain":
        return ByInput(rgb and pretrain_transform(input_size, mean, std), array_train_transform(input_size, mean, std))
    if kind == "train":
        image = rgb and train_transform(
            input_size, kwargs["aa"], kwargs["reprob"], color_jitter=kwargs.get("color_jitter"), mean=mean, std=std
        )
        return ByInput(image, array_train_transform(input_size, mean, std, (0.08, 1.0), kwargs["reprob"]))
    if kind == "eval":
        crop_pct = kwargs.get("crop_pct")
        return ByInput(
            rgb and eval_transform(input_size, crop_pct, mean, std),
            array_eval_transform(input_size, mean, std, crop_pct),
        )
    raise ValueError(f"kind must be pretrain, train or eval; got {kind!r}.")


def pretrain_transform(input_size: int = 224, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """FCMAE augmentation: RandomResizedCrop(scale 0.2..1, bicubic), flip, normalisation."""
    if input_size <= 0 or input_size % 32:
        raise ValueError(
            f"input_size must be a positive multiple of 32 (the encoder's total stride "
            f"and the mask patch size), got {input_size}."
        )
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=_BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def train_transform(
    input_size: int,
    aa: str | None,
    reprob: float,
    remode: str = "pixel",
    recount: int = 1,
    color_jitter: float | None = 0.4,
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
):
    """timm's ImageNet training transform: RandomResizedCrop (bicubic), flip, RandAugment ``aa``,
    normalisation, RandomErasing (probability ``reprob``, per-pixel noise). ``color_jitter`` applies
    only without ``aa`` (timm switches it off under RandAugment, as the official recipe expects).
    Posterize keeping 0 bits gives a black image, as it always did (see `posterize`)."""
    tf = create_transform(
        input_size,
        is_training=True,
        auto_augment=aa or None,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode=remode,
        re_count=recount,
        color_jitter=color_jitter,
        mean=tuple(mean),
        std=tuple(std),
    )
    return _with_zero_bit_posterize(tf)


def eval_transform(
    input_size: int, crop_pct: float | None = None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD
):
    """Below 384 px: resize the short side to ``input_size / crop_pct`` then centre crop; at 384 and
    above: resize straight to ``input_size`` x ``input_size`` (no crop). Bicubic, then ``mean``/``std``.
    ``crop_pct=1``: resize the short side to ``input_size``, centre crop (FCMAE's reconstructions)."""
    if input_size >= 384 and crop_pct is None:
        resize = [transforms.Resize((input_size, input_size), interpolation=_BICUBIC)]
    else:
        resize = [
            transforms.Resize(int(input_size / (crop_pct or EVAL_CROP_PCT)), interpolation=_BICUBIC),
            transforms.CenterCrop(input_size),
        ]
    return transforms.Compose([*resize, transforms.ToTensor(), transforms.Normalize(mean, std)])


# ----------------------------------------------------------------------------- RandAugment's posterize


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, defined for 0 bits kept (and fewer): the black image.

    RandAugment's posterize keeps ``bits_to_keep`` high bits of every channel: value & ~(2^(8 - bits) - 1).
    timm (1.0.31) maps magnitude 10 of 'PosterizeIncreasing' (magnitude < 2.5 of 'Posterize') to 0 bits,
    and the recipe's magnitude noise (rand-m9-mstd0.5: m ~ N(9, 0.5), clipped to 0..10) reaches 10 in
    ~2 % of posterize draws. Older Pillow applied the mask above, which is 0 for 0 bits: every pixel
    black (timm's policy table notes the same of the TPU posterize). Pillow 13 raises "bits must be
    between or equal to 1 and 8" instead, which kills the loader worker. Clamping to 1 bit would change
    the policy (a 1-bit image is not black); this keeps its meaning. Inputs are RGB or L (to_rgb)."""
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)  # every value & 0
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _with_zero_bit_posterize(transform):
    """``transform`` with `posterize` in place of timm's in each of its augmentation ops.

    The swap is made on the ops of this transform (AugmentOp.aug_fn, bound when timm builds it),
    not in timm's module tables: nothing else in the process changes, and a timm that fixes its
    posterize is still called for every other bit count."""
    stack = [transform]
    while stack:
        t = stack.pop()
        if isinstance(t, auto_augment.AugmentOp) and t.aug_fn is auto_augment.posterize:
            t.aug_fn = posterize
        stack.extend(getattr(t, "transforms", None) or [])  # Compose
        stack.extend(getattr(t, "ops", None) or [])  # RandAugment, AugMixAugment
        for sub_policy in getattr(t, "policy", None) or []:  # AutoAugment: lists of ops
            stack.extend(sub_policy)
    return transform
