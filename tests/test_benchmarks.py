"""The arithmetic the benchmark tables rest on: FLOP counts and the --num-workers advice."""

import sys

import pytest
import torch
from conftest import ROOT
from fvcore.nn import FlopCountAnalysis

import fcmae

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_data
import bench_pretrain


def fvcore_macs(module, x) -> float:
    return FlopCountAnalysis(module, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()


@pytest.mark.parametrize("name,depth", [("convnextv2_atto", 1), ("convnextv2_tiny", 2)])
def test_decoder_flops_match_fvcore(name, depth):
    fm = fcmae.create_fcmae(name, decoder_depth=depth).eval()
    x = torch.zeros(1, fm.proj.in_channels, 7, 7)
    with torch.no_grad():
        ref = fvcore_macs(torch.nn.Sequential(fm.proj, fm.decoder, fm.pred), x)
    assert bench_pretrain._decoder_flops(fm, 224) == pytest.approx(ref, rel=1e-9)


def test_useful_flops_count_visible_sites_only():
    """Encoder MACs scale with the kept fraction (int(49 * 0.4) = 19 of 49 patches at 224)."""
    model = fcmae.create_model("convnextv2_atto", num_classes=0).eval()
    with torch.no_grad():
        enc = fvcore_macs(model, torch.zeros(1, 3, 224, 224))
    assert 0.54e9 < enc < 0.56e9  # the published 0.55 "GFLOPs" of atto are multiply-adds
    dec = bench_pretrain._decoder_flops(fcmae.create_fcmae("convnextv2_atto"), 224)
    got = bench_pretrain.useful_flops("convnextv2_atto", 224, 4, 0.6)
    assert got == pytest.approx(4 * (enc * 19 / 49 + dec), rel=1e-9)


def test_worker_advice():
    rows = [
        dict(workers=0, images_per_sec=120.0, per_worker=120.0),
        dict(workers=1, images_per_sec=100.0, per_worker=100.0),
        dict(workers=2, images_per_sec=190.0, per_worker=95.0),
        dict(workers=4, images_per_sec=350.0, per_worker=87.5),
    ]
    step = dict(model="m", size=224, precision="bf16", channels_last=True, compile=True, backend="gather")
    need = [50.0, 100.0, 150.0, 350.0, 351.0, 700.0]
    got = [r["num_workers"] for r in bench_data.recommend(rows, [step | {"images_per_sec": n} for n in need])]
    # in-process loading (0 workers) never counts: it would stall the step; beyond 4 workers, 87.5 img/s each
    assert got == [1, 1, 2, 4, 5, 8]
