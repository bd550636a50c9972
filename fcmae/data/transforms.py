"""Image transforms: FCMAE pretraining, timm's fine-tuning recipe, and evaluation. Inputs are RGB
PIL images (fcmae.data.decode.to_rgb), outputs normalised float tensors (3, S, S)."""
from __future__ import annotations

from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

EVAL_CROP_PCT = 0.875  # below 384 px: resize to size / 0.875, centre crop (ConvNeXt V2's official evaluation)
_BICUBIC = transforms.InterpolationMode.BICUBIC


def pretrain_transform(input_size: int = 224):
    """FCMAE augmentation: RandomResizedCrop(scale 0.2..1, bicubic), flip, ImageNet normalisation."""
    if input_size <= 0 or input_size % 32:
        raise ValueError(f"input_size must be a positive multiple of 32 (the encoder's total stride "
                         f"and the mask patch size), got {input_size}.")
    return transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=_BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def train_transform(input_size: int, aa: str | None, reprob: float, remode: str = "pixel", recount: int = 1,
                    color_jitter: float | None = 0.4):
    """timm's ImageNet training transform: RandomResizedCrop (bicubic), flip, RandAugment ``aa``,
    normalisation, RandomErasing (probability ``reprob``, per-pixel noise). ``color_jitter`` applies
    only without ``aa`` (timm switches it off under RandAugment, as the official recipe expects).
    Posterize keeping 0 bits gives a black image, as it always did (see `posterize`)."""
    tf = create_transform(input_size, is_training=True, auto_augment=aa or None, interpolation="bicubic",
                          re_prob=reprob, re_mode=remode, re_count=recount, color_jitter=color_jitter,
                          mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
    return _with_zero_bit_posterize(tf)


def eval_transform(input_size: int, crop_pct: float | None = None):
    """Below 384 px: resize the short side to ``input_size / crop_pct`` then centre crop; at 384 and
    above: resize straight to ``input_size`` x ``input_size`` (no crop). Bicubic, ImageNet mean/std.
    ``crop_pct=1``: resize the short side to ``input_size``, centre crop (FCMAE's reconstructions)."""
    if input_size >= 384 and crop_pct is None:
        resize = [transforms.Resize((input_size, input_size), interpolation=_BICUBIC)]
    else:
        resize = [transforms.Resize(int(input_size / (crop_pct or EVAL_CROP_PCT)), interpolation=_BICUBIC),
                  transforms.CenterCrop(input_size)]
    return transforms.Compose([*resize, transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


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
