"""The model interface, initialisation, and sizes against the published figures."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath

import fcmae
from fcmae.models import table as model_table

ATTO_DIMS = (40, 80, 160, 320)

# Published figures, written out here (the ConvNeXt V2 paper and README; ConvNeXt V1 paper Tables 1-2 and the
# official README, which give V1 params in whole millions).
PUBLISHED_PARAMS_M = {
    "convnextv2_atto": "3.71",
    "convnextv2_femto": "5.23",
    "convnextv2_pico": "9.07",
    "convnextv2_nano": "15.62",
    "convnextv2_tiny": "28.64",
    "convnextv2_base": "88.72",
    "convnextv2_large": "197.96",
    "convnextv2_huge": "660.29",
    "convnext_tiny": "29",
    "convnext_small": "50",
    "convnext_base": "89",
    "convnext_large": "198",
    "convnext_xlarge": "350",
    "convnext_isotropic_small": "22",
    "convnext_isotropic_base": "87",
    "convnext_isotropic_large": "306",
}


def close_to_published(ours: float, published: str) -> bool:
    """Within 1 %, or equal at the precision the figure was printed with ("22" covers 21.5..22.5)."""
    pub, decimals = float(published), len(published.partition(".")[2])
    return abs(ours - pub) <= max(0.01 * pub, 0.5 * 10**-decimals)


@pytest.fixture(scope="module")
def atto():
    torch.manual_seed(0)
    return fcmae.create_model("convnextv2_atto", num_classes=10).eval()


def test_forward_features_non_square(atto):
    assert atto.forward_features(torch.randn(2, 3, 64, 160)).shape == (2, 320, 2, 5)
    assert atto.num_features == 320


def test_forward_head_pre_logits(atto):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = atto.forward_features(x)
        pre = atto.forward_head(feats, pre_logits=True)
        logits = atto.forward_head(feats)
    # pooled-then-normed, computed here by hand
    expected = F.layer_norm(feats.mean((2, 3)), (320,), atto.head.norm.weight, atto.head.norm.bias, eps=1e-6)
    assert pre.shape == (2, 320) and torch.allclose(pre, expected, atol=1e-6)
    assert torch.allclose(logits, pre @ atto.head.fc.weight.T + atto.head.fc.bias, atol=1e-5)


def test_reset_classifier():
    model = fcmae.create_model("convnextv2_atto").eval()
    x = torch.randn(1, 3, 32, 64)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5) and model.get_classifier().out_features == 5 and model.num_classes == 5
    assert model.get_classifier().weight.std().item() == pytest.approx(0.02, rel=0.3)
    model.reset_classifier(0)
    assert model(x).shape == (1, 320)


def test_forward_intermediates_match_feature_info(atto):
    x = torch.randn(2, 3, 64, 96)
    outs = atto.forward_intermediates(x)
    assert [(f["num_chs"], f["reduction"]) for f in atto.feature_info] == list(zip(ATTO_DIMS, (4, 8, 16, 32)))
    assert [tuple(o.shape) for o in outs] == [(2, c, 64 // r, 96 // r) for c, r in zip(ATTO_DIMS, (4, 8, 16, 32))]
    assert torch.allclose(outs[-1], atto.forward_features(x))


def test_drop_path_rate_grows_linearly_over_blocks():
    model = fcmae.create_model("convnextv2_atto", drop_path_rate=0.3)
    blocks = [b for stage in model.stages for b in stage.blocks]
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]
    assert len(rates) == 12
    assert rates == pytest.approx([0.3 * i / 11 for i in range(12)], abs=1e-6)


def test_head_init_scale():
    torch.manual_seed(1)
    ref = fcmae.create_model("convnextv2_atto")
    torch.manual_seed(1)
    scaled = fcmae.create_model("convnextv2_atto", head_init_scale=0.001)
    assert torch.equal(scaled.stages[2].blocks[0].mlp.fc1.weight, ref.stages[2].blocks[0].mlp.fc1.weight)
    assert torch.allclose(scaled.head.fc.weight, ref.head.fc.weight * 0.001)
    assert scaled.head.fc.weight.std().item() == pytest.approx(2e-5, rel=0.05)


def test_init():
    """Truncated normal std 0.02 for every conv and linear weight, zero biases, unit norms,
    zero GRN (V2), layer scale 1e-6 (V1)."""
    model = fcmae.create_model("convnextv2_atto")
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            w = m.weight
            if w.numel() >= 10_000:  # enough samples to pin the std down to ~1 %
                assert w.std().item() == pytest.approx(0.02, rel=0.03), name
                assert abs(w.mean().item()) < 0.002, name
                checked += 1
            assert not m.bias.any(), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert (m.weight == 1).all() and not m.bias.any(), name
    assert checked >= 20
    grn = [p for n, p in model.named_parameters() if ".grn." in n]
    assert len(grn) == 24 and not any(p.any() for p in grn)
    v1 = fcmae.create_model("convnext_tiny")
    gammas = [p for n, p in v1.named_parameters() if n.endswith(".gamma")]
    assert len(gammas) == 18 and all(torch.all(g == 1e-6) for g in gammas)
    assert not any(".grn." in n for n, _ in v1.named_parameters())


def test_isotropic_runs_at_stride_16():
    model = fcmae.create_model("convnext_isotropic_small", num_classes=3).eval()
    assert [f["reduction"] for f in model.feature_info] == [16]
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 48, 80)).shape == (1, 384, 3, 5)
        assert model(torch.randn(1, 3, 48, 80)).shape == (1, 3)
    with pytest.raises(ValueError, match="16"):
        model(torch.randn(1, 3, 40, 48))


def test_create_model_on_meta_device():
    """Param counts and large-model checks build models on the meta device."""
    with torch.device("meta"):
        model = fcmae.create_model("convnextv2_huge", drop_path_rate=0.1)
    assert next(model.parameters()).is_meta


@pytest.mark.parametrize("name", fcmae.list_models())
def test_params_match_published(name):
    ours = sum(p.numel() for p in model_table.meta_model(name).parameters()) / 1e6
    assert ours == model_table.count_params(name) / 1e6
    assert close_to_published(ours, PUBLISHED_PARAMS_M[name]), (name, ours, PUBLISHED_PARAMS_M[name])


def atto_flops_by_hand(size: int) -> int:
    """Multiply-adds of convolutions and linear layers plus 5 per layer-norm element (fvcore's
    convention), nothing for GELU, GRN, adds and pooling."""
    depths, dims = (2, 2, 6, 2), ATTO_DIMS
    r = size // 4
    total = r * r * dims[0] * 3 * 16 + 5 * r * r * dims[0]  # stem conv + LN
    for i, (d, c) in enumerate(zip(depths, dims)):
        if i:
            total += 5 * r * r * dims[i - 1]  # downsample LN at the previous resolution
            r //= 2
            total += r * r * c * dims[i - 1] * 4  # 2x2 stride-2 conv
        total += d * r * r * (c * 49 + 5 * c + 2 * c * 4 * c)  # dwconv, LN, fc1, fc2
    return total + 5 * dims[-1] + dims[-1] * 1000  # head LN + fc


def test_flops_convention_atto():
    assert model_table.count_flops("convnextv2_atto", 224) == atto_flops_by_hand(224)


@pytest.mark.parametrize("name, published", [("convnextv2_atto", 0.55), ("convnextv2_femto", 0.78)])
def test_gflops_match_published(name, published):
    assert model_table.count_flops(name, 224) / 1e9 == pytest.approx(published, rel=0.01)


def test_model_table_exit_status(monkeypatch, capsys):
    assert model_table.main(["--models", "convnextv2_atto", "--sizes", "224"]) == 0
    assert "0.552" in capsys.readouterr().out
    monkeypatch.setitem(model_table.PUBLISHED, "convnextv2_atto", {"params": "3.71", "224": "0.60"})
    assert model_table.main(["--models", "convnextv2_atto", "--sizes", "224"]) == 1
    assert model_table.compare(22.309, "22")[1] == "rounding" and model_table.compare(22.6, "22")[1] == "NO"
