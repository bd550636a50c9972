"""Any number of input channels (in_chans N): the FCMAE backends agree, the loss is patchify +
norm-pix MSE over N channels, the encoder is timm's ``in_chans=N`` ConvNeXt V2, RGB weights adapt to N
channels exactly as timm adapts them, and N-channel exports load in timm and transformers."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._manipulate import adapt_input_conv

import fcmae
from fcmae.models.fcmae import create_fcmae
from fcmae.weights.adapt import adapt_stem
from fcmae.weights.formats import (
    fcmae_args_from_state_dict,
    load_fcmae_weights,
    to_timm_state_dict,
    write_timm,
    write_transformers,
)

CHANNELS = [1, 4, 7]


def _minkowski_importable() -> bool:
    from fcmae.sparse.minkowski import import_minkowski

    try:
        import_minkowski()
        return True
    except ImportError:
        return False


BACKENDS = ["dense", "gather"] + (["minkowski"] if _minkowski_importable() else [])


def perturb_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Noise on every parameter (GRN and the mask token start at zero): a mis-wired tensor shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


# --------------------------------------------------------------------------- FCMAE with N channels


def _run(model, backend, imgs, mask, probe, seed=123):
    """Forward and backward with a loss that reaches every encoder parameter."""
    model.backend = backend
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same drop-path draws for every backend
    latent = model.forward_encoder(imgs, mask)
    pred = model.forward_decoder(latent, mask)
    loss = model.forward_loss(imgs, pred, mask) + (latent * probe).sum()
    loss.backward()
    return latent.detach(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ratio", [0.0, 0.6])
@pytest.mark.parametrize("chans", CHANNELS)
def test_backends_agree(chans, ratio):
    torch.manual_seed(chans)
    model = perturb_(create_fcmae("convnextv2_atto", in_chans=chans, decoder_dim=64, drop_path_rate=0.2)).train()
    assert model.in_chans == model.encoder.in_chans == chans
    assert model.encoder.stem[0].weight.shape == (40, chans, 4, 4) and model.pred.out_channels == 32 * 32 * chans
    imgs = torch.randn(2, chans, 64, 96)
    mask = model.gen_random_mask(imgs, ratio)
    probe = torch.randn(2, 320, 2, 3)
    ref = _run(model, "dense", imgs, mask, probe)
    assert ref[1].shape == (2, 32 * 32 * chans, 2, 3)
    for backend in BACKENDS[1:]:
        out = _run(model, backend, imgs, mask, probe)
        assert rel(out[0], ref[0]) < 1e-5, backend
        assert rel(out[1], ref[1]) < 1e-5, backend
        for name, g in ref[2].items():
            assert rel(out[2][name], g) < 1e-5, (backend, name)
    assert ref[2]["encoder.stem.0.weight"].abs().sum() > 0  # the stem's gradient reaches all N channels
    assert (ref[2]["encoder.stem.0.weight"].abs().sum((0, 2, 3)) > 0).all()


def patchify_reference(imgs: np.ndarray, p: int) -> np.ndarray:
    """(N, C, H, W) -> (N, L, p*p*C), patches in row-major grid order, values in (row, col, channel) order."""
    n, c, H, W = imgs.shape
    out = np.zeros((n, (H // p) * (W // p), p * p * c))
    for r in range(H // p):
        for q in range(W // p):
            for i in range(p):
                for j in range(p):
                    out[:, r * (W // p) + q, (i * p + j) * c : (i * p + j + 1) * c] = imgs[:, :, r * p + i, q * p + j]
    return out


@pytest.mark.parametrize("norm_pix", [True, False])
@pytest.mark.parametrize("chans", CHANNELS)
def test_loss_matches_numpy_reference(chans, norm_pix):
    model = create_fcmae("convnextv2_atto", in_chans=chans, decoder_dim=32, norm_pix_loss=norm_pix)
    imgs = torch.randn(2, chans, 64, 96, dtype=torch.float64)
    pred = torch.randn(2, 6, 32 * 32 * chans, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.float64)
    target = patchify_reference(imgs.numpy(), 32)
    if norm_pix:  # each patch by its own mean and unbiased variance, over all its pixels and channels
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred.numpy() - target) ** 2).mean(-1)
    expected = (per_patch * mask.numpy()).sum() / mask.numpy().sum()
    assert abs(model.forward_loss(imgs, pred, mask).item() - expected) < 1e-9 * expected
    # the decoder's (N, p*p*C, h, w) layout gives the same loss
    as_map = pred.transpose(1, 2).reshape(2, 32 * 32 * chans, 2, 3)
    assert abs(model.forward_loss(imgs, as_map, mask).item() - expected) < 1e-9 * expected
    assert np.array_equal(model.patchify(imgs).numpy(), patchify_reference(imgs.numpy(), 32))
    assert torch.equal(model.unpatchify(model.patchify(imgs), (2, 3)), imgs)


def test_wrong_channel_count_is_a_clear_error():
    model = create_fcmae("convnextv2_atto", in_chans=4, decoder_dim=32)
    with pytest.raises(ValueError, match="4-channel images.*in_chans=3"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="4-channel images.*in_chans=3"):
        model.encoder.forward_features(torch.zeros(1, 3, 64, 64))


# --------------------------------------------------------------------------- the encoder is timm's


@pytest.mark.parametrize("chans", CHANNELS)
def test_encoder_matches_timm(chans):
    torch.manual_seed(chans)
    ours = perturb_(fcmae.create_model("convnextv2_atto", num_classes=0, in_chans=chans)).eval()
    theirs = timm.create_model("convnextv2_atto", in_chans=chans, num_classes=0).eval()
    theirs.load_state_dict(to_timm_state_dict(ours), strict=True)
    x = torch.randn(2, chans, 64, 96)
    with torch.no_grad():
        features = theirs.forward_features(x)
        assert rel(ours.forward_features(x), features) < 1e-5
        assert rel(ours(x), theirs(x)) < 1e-5
    # FCMAE's encoder at mask ratio 0 is the same network, whatever the backend
    mae = create_fcmae("convnextv2_atto", in_chans=chans, decoder_dim=32).eval()
    mae.encoder.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("head.")})
    for backend in BACKENDS:
        mae.backend = backend
        with torch.no_grad():
            assert rel(mae.forward_encoder(x, torch.zeros(2, 6)), features) < 1e-5, backend


# --------------------------------------------------------------------------- RGB weights into N channels


@pytest.mark.parametrize("chans", [1, 2, 4, 7])
def test_adapt_stem_is_timms_adapt_input_conv(chans):
    w, b = torch.randn(40, 3, 4, 4), torch.randn(40)
    sd = {"stem.0.weight": w, "stem.0.bias": b}
    out, msg = adapt_stem(sd, chans)
    assert torch.equal(out["stem.0.weight"], adapt_input_conv(chans, w.clone()))
    assert out["stem.0.bias"] is b and sd["stem.0.weight"] is w  # the caller's dict is left as it was
    # the semantics, by hand: sum over RGB for one channel, else repeat, keep N, scale by 3 / N
    if chans == 1:
        expected = w.sum(1, keepdim=True)
    else:
        expected = torch.cat([w] * math.ceil(chans / 3), dim=1)[:, :chans] * (3 / chans)
    assert torch.allclose(out["stem.0.weight"], expected, rtol=0, atol=1e-6)
    assert f"from 3 to {chans} input channels" in msg and "adapt_input_conv" in msg


def test_adapt_stem_leaves_matching_stems_and_refuses_other_mismatches():
    sd = {"stem.0.weight": torch.randn(40, 4, 4, 4)}
    assert adapt_stem(sd, 4) == (sd, None)
    assert adapt_stem({"head.fc.weight": torch.randn(5, 320)}, 4)[1] is None  # no stem: nothing to do
    with pytest.raises(ValueError, match="takes 4 input channels and the model 5"):
        adapt_stem(sd, 5)
    with pytest.raises(ValueError, match="takes 4 input channels and the model 3"):
        adapt_stem(sd, 3)


def test_rgb_checkpoint_into_four_channel_model_matches_timm(tmp_path):
    torch.manual_seed(0)
    rgb = perturb_(fcmae.create_model("convnextv2_atto", num_classes=10)).eval()
    sd, msg = adapt_stem(rgb.state_dict(), 4)
    assert msg == "adapted the stem from 3 to 4 input channels (timm adapt_input_conv: repeat and rescale)"
    ours = fcmae.create_model("convnextv2_atto", num_classes=10, in_chans=4).eval()
    assert fcmae.load_checkpoint(ours, sd).missing == []

    timm_sd = to_timm_state_dict(rgb)  # the RGB weights in timm's layout, adapted by timm's function
    theirs = timm.create_model("convnextv2_atto", in_chans=4, num_classes=10).eval()
    theirs.load_state_dict({**timm_sd, "stem.0.weight": adapt_input_conv(4, timm_sd["stem.0.weight"])}, strict=True)
    # and timm's own pretrained path, which adapts the stem inside load_pretrained
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, str(tmp_path / "rgb.safetensors"))
    loaded = timm.create_model(
        "convnextv2_atto",
        pretrained=True,
        in_chans=4,
        num_classes=10,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "rgb.safetensors"), num_classes=10),
    )
    x = torch.randn(2, 4, 64, 96)
    with torch.no_grad():
        logits = ours(x)
        assert rel(logits, theirs(x)) < 1e-5
        assert rel(logits, loaded.eval()(x)) < 1e-5
        assert rel(ours.forward_features(x), loaded.forward_features(x)) < 1e-5


# --------------------------------------------------------------------------- exports with N channels

DATA = dict(input_size=64, crop_pct=0.875, mean=(0.4, 0.45, 0.5, 0.3), std=(0.2, 0.25, 0.3, 0.1))


@pytest.fixture(scope="module")
def rgbn():
    torch.manual_seed(4)
    return perturb_(fcmae.create_model("convnextv2_atto", num_classes=5, in_chans=4)).eval()


def test_timm_export_builds_a_four_channel_model(rgbn, tmp_path):
    transformers = pytest.importorskip("transformers")  # an optional (dev) dependency
    write_timm(rgbn, tmp_path, tag="fcmae_ft_test", license="mit", label_names=None, **DATA)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"]["in_chans"] == 4 and config["pretrained_cfg"]["input_size"] == [4, 64, 64]
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        t = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()  # strict load inside timm
        assert t.stem[0].in_channels == 4 and t.pretrained_cfg["input_size"] == (4, 64, 64)
        assert rel(t(x), rgbn(x)) < 1e-5
        wrapped = transformers.AutoModelForImageClassification.from_pretrained(str(tmp_path)).eval()
        assert rel(wrapped(pixel_values=x).logits, rgbn(x)) < 1e-4
    back = fcmae.create_model("convnextv2_atto", num_classes=5, in_chans=4)
    fcmae.load_checkpoint(back, tmp_path)
    assert all(torch.equal(v, rgbn.state_dict()[k]) for k, v in back.state_dict().items())
    with pytest.raises(ValueError, match="stem.0.weight"):
        fcmae.load_checkpoint(fcmae.create_model("convnextv2_atto", num_classes=5), tmp_path)


def test_transformers_export_sets_num_channels(rgbn, tmp_path):
    transformers = pytest.importorskip("transformers")
    write_transformers(rgbn, tmp_path, label_names=None, **DATA)
    assert json.loads((tmp_path / "config.json").read_text())["num_channels"] == 4
    hf = transformers.ConvNextV2ForImageClassification.from_pretrained(str(tmp_path)).eval()
    assert hf.config.num_channels == 4
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        assert rel(hf(pixel_values=x).logits, rgbn(x)) < 1e-4
    encoder = fcmae.create_model("convnextv2_atto", num_classes=0, in_chans=4).eval()
    encoder.load_state_dict({k: v for k, v in rgbn.state_dict().items() if not k.startswith("head.fc.")})
    write_transformers(encoder, tmp_path / "encoder", label_names=None, **DATA)
    native = transformers.ConvNextV2Model.from_pretrained(str(tmp_path / "encoder")).eval()
    with torch.no_grad():
        assert rel(native(pixel_values=x).last_hidden_state, encoder.forward_features(x)) < 1e-4


@pytest.mark.parametrize("chans", [1, 4])
def test_full_fcmae_round_trip(chans, tmp_path):
    torch.manual_seed(chans)
    mae = perturb_(create_fcmae("convnextv2_atto", in_chans=chans, decoder_dim=64)).eval()
    sd = {k: v.contiguous() for k, v in mae.state_dict().items()}
    assert fcmae_args_from_state_dict(sd) == dict(decoder_dim=64, decoder_depth=1, patch_size=32)
    save_file(sd, str(tmp_path / "fcmae.safetensors"))
    again = create_fcmae("convnextv2_atto", in_chans=chans, decoder_dim=64).eval()
    load_fcmae_weights(again, tmp_path)
    x = torch.randn(2, chans, 64, 64)
    mask = again.gen_random_mask(x)
    with torch.no_grad():
        assert torch.equal(again(x, mask)[1], mae(x, mask)[1])
