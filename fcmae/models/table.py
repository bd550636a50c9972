"""Parameter and FLOP counts of every registered model, next to the published figures.

Usage:
    python -m fcmae.models.table                          # every model, 224 px and the published 384/512
    python -m fcmae.models.table --models "convnextv2_*" --sizes 224 --json table.json

Params are counted with the 1000-class head. GFLOPs follow the convention the ConvNeXt papers used
(fvcore's ``FlopCountAnalysis`` at batch 1): one multiply-add is one FLOP; convolutions, linear layers
and layer norms (5 FLOPs per element, fvcore's figure) are counted; GELU, GRN, residual adds, layer
scale and pooling are not. They are counted here without fvcore, on the meta device (no memory, no
compute): torch's ``FlopCounterMode`` for the convolutions and matrix products (2 per multiply-add,
halved), plus the layer norms' elements. A size is computed only where a figure was
published for it. The command exits with status 1 if any figure is off, i.e. more than 1 % away
from the published one *and* not equal to it at the published precision (the ConvNeXt V1 paper
gives "22M" for ConvNeXt-S (iso.): 22.31M is that figure, though 1.4 % away from 22).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import create_model, list_models

# Figures as printed, so their precision is known. V2: the ConvNeXt V2 paper (Table 1
# and README). V1: "A ConvNet for the 2020s", Tables 1 and 2, and the official README
# (facebookresearch/ConvNeXt): params in whole millions; the README's 22K table gives 47.0G for
# ConvNeXt-B at 384 where its 1K table gives 45.0G for the same architecture; 45.0 is the one
# fvcore reproduces (45.21G, the same count as convnextv2_base, GRN being uncounted).
PUBLISHED: dict[str, dict[str, str]] = {
    "convnextv2_atto": {"params": "3.71", "224": "0.55"},
    "convnextv2_femto": {"params": "5.23", "224": "0.78"},
    "convnextv2_pico": {"params": "9.07", "224": "1.37"},
    "convnextv2_nano": {"params": "15.62", "224": "2.45", "384": "7.21"},
    "convnextv2_tiny": {"params": "28.64", "224": "4.47", "384": "13.14"},
    "convnextv2_base": {"params": "88.72", "224": "15.38", "384": "45.21"},
    "convnextv2_large": {"params": "197.96", "224": "34.40", "384": "101.10"},
    "convnextv2_huge": {"params": "660.29", "224": "115.00", "384": "337.96", "512": "600.81"},
    "convnext_tiny": {"params": "29", "224": "4.5", "384": "13.1"},
    "convnext_small": {"params": "50", "224": "8.7", "384": "25.5"},
    "convnext_base": {"params": "89", "224": "15.4", "384": "45.0"},
    "convnext_large": {"params": "198", "224": "34.4", "384": "101.0"},
    "convnext_xlarge": {"params": "350", "224": "60.9", "384": "179.0"},
    "convnext_isotropic_small": {"params": "22", "224": "4.3"},
    "convnext_isotropic_base": {"params": "87", "224": "16.9"},
    "convnext_isotropic_large": {"params": "306", "224": "59.7"},
}
TOLERANCE = 0.01


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """The model with parameters on the meta device: shapes without memory or initialisation."""
    with torch.device("meta"):
        return create_model(name, **kwargs)


def count_params(name: str) -> int:
    """Parameters of ``name`` with the 1000-class head."""
    return sum(p.numel() for p in meta_model(name, num_classes=1000).parameters())


def count_flops(name: str, size: int) -> int:
    """FLOPs (multiply-adds) of one ``size`` x ``size`` image through ``name``, fvcore's convention."""
    from torch.utils.flop_counter import FlopCounterMode

    model = meta_model(name, num_classes=1000).eval()
    norm_elements = []
    hooks = [
        m.register_forward_hook(lambda m, args, out: norm_elements.append(args[0].numel()))
        for m in model.modules()
        if isinstance(m, torch.nn.LayerNorm)
    ]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    for hook in hooks:
        hook.remove()
    return counter.get_total_flops() // 2 + 5 * sum(norm_elements)


def compare(ours: float, published: str) -> tuple[float, str]:
    """Relative difference and verdict: 'yes' (within 1 %), 'rounding' (further, but equal at the
    published precision, e.g. 22.31 for "22"), or 'NO'."""
    pub = float(published)
    rel = ours / pub - 1
    if abs(rel) <= TOLERANCE:
        return rel, "yes"
    decimals = len(published.partition(".")[2])
    return rel, "rounding" if abs(ours - pub) <= 0.5 * 10**-decimals + 1e-12 else "NO"


def table(pattern: str = "*", sizes: tuple[int, ...] = (224, 384, 512), log=None) -> list[dict]:
    """One row per (model, quantity): ours, published, relative difference, verdict."""
    rows = []
    for name in list_models(pattern):
        pub = PUBLISHED.get(name, {})
        quantities = [("params (M)", None)] + [(f"GFLOPs {s}", s) for s in sizes if str(s) in pub]
        for label, size in quantities:
            ours = count_params(name) / 1e6 if size is None else count_flops(name, size) / 1e9
            published = pub.get("params" if size is None else str(size))
            rel, verdict = compare(ours, published) if published else (None, "unpublished")
            rows.append(
                dict(
                    model=name,
                    quantity=label,
                    ours=round(ours, 4),
                    published=published,
                    rel_diff=rel,
                    within_1pct=verdict,
                )
            )
            if log:
                log(_format_row(rows[-1]))
    return rows


def _format_row(r: dict) -> str:
    rel = f"{100 * r['rel_diff']:+.2f}%" if r["rel_diff"] is not None else "-"
    return (
        f"{r['model']:26s} {r['quantity']:12s} {r['ours']:10.3f} {r['published'] or '-':>9s} "
        f"{rel:>8s}  {r['within_1pct']}"
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--models", default="*", help="shell-style pattern over registered names")
    parser.add_argument("--sizes", default="224,384,512", help="image sizes, comma-separated")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if not list_models(args.models):
        parser.error(f"no registered model matches {args.models!r}; known: {', '.join(list_models())}")
    print(f"{'model':26s} {'quantity':12s} {'ours':>10s} {'published':>9s} {'diff':>8s}  within 1%")
    rows = table(args.models, sizes, log=lambda s: print(s, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if r["within_1pct"] == "NO"]
    for r in bad:
        print(f"OFF: {r['model']} {r['quantity']}: {r['ours']:.3f} vs published {r['published']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
