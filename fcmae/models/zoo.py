"""The registered sizes (ConvNeXt V2 paper, Table; ConvNeXt V1 paper) as three-line entry points."""

from __future__ import annotations

from .convnext import ConvNeXt, ConvNeXtConfig
from .registry import register_model

_SMALL = (2, 2, 6, 2)
_DEEP = (3, 3, 27, 3)

CONFIGS: dict[str, ConvNeXtConfig] = {
    "convnextv2_atto": ConvNeXtConfig(_SMALL, (40, 80, 160, 320)),
    "convnextv2_femto": ConvNeXtConfig(_SMALL, (48, 96, 192, 384)),
    "convnextv2_pico": ConvNeXtConfig(_SMALL, (64, 128, 256, 512)),
    "convnextv2_nano": ConvNeXtConfig((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnextv2_tiny": ConvNeXtConfig((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextv2_base": ConvNeXtConfig(_DEEP, (128, 256, 512, 1024)),
    "convnextv2_large": ConvNeXtConfig(_DEEP, (192, 384, 768, 1536)),
    "convnextv2_huge": ConvNeXtConfig(_DEEP, (352, 704, 1408, 2816)),
    "convnext_tiny": ConvNeXtConfig((3, 3, 9, 3), (96, 192, 384, 768), grn=False, ls_init_value=1e-6),
    "convnext_small": ConvNeXtConfig(_DEEP, (96, 192, 384, 768), grn=False, ls_init_value=1e-6),
    "convnext_base": ConvNeXtConfig(_DEEP, (128, 256, 512, 1024), grn=False, ls_init_value=1e-6),
    "convnext_large": ConvNeXtConfig(_DEEP, (192, 384, 768, 1536), grn=False, ls_init_value=1e-6),
    "convnext_xlarge": ConvNeXtConfig(_DEEP, (256, 512, 1024, 2048), grn=False, ls_init_value=1e-6),
    # isotropic V1: 16x16 patchify stem without norm, one stage, no downsampling, no layer scale
    # (the official isotropic models are built with layer_scale_init_value=0, i.e. none)
    "convnext_isotropic_small": ConvNeXtConfig((18,), (384,), grn=False, stem_patch=16, stem_norm=False),
    "convnext_isotropic_base": ConvNeXtConfig((18,), (768,), grn=False, stem_patch=16, stem_norm=False),
    "convnext_isotropic_large": ConvNeXtConfig((36,), (1024,), grn=False, stem_patch=16, stem_norm=False),
}


def _build(name: str, **kwargs) -> ConvNeXt:
    return ConvNeXt(CONFIGS[name], name=name, **kwargs)


def _entry(name: str):
    def fn(**kwargs) -> ConvNeXt:
        return _build(name, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = f"{name}: depths {CONFIGS[name].depths}, dims {CONFIGS[name].dims}."
    return register_model(fn)


for _name in CONFIGS:
    _entry(_name)
