"""FCMAE: backends agree, sparse semantics hold, the loss is right, bf16 and torch.compile work."""

import numpy as np
import pytest
import torch

import fcmae
from fcmae.models import ConvNeXt, ConvNeXtConfig
from fcmae.models.fcmae import FCMAE, create_fcmae

BACKENDS = ["dense", "gather"]


def perturbed(name="convnextv2_atto", seed=0, **kw):
    """An FCMAE whose every parameter (GRN and mask token included, which start at zero) is non-trivial."""
    torch.manual_seed(seed)
    m = create_fcmae(name, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def run(model, backend, imgs, mask, probe, seed=123):
    """Forward and backward with a loss that reaches every encoder parameter even at ratio 0."""
    model.backend = backend
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same drop-path draws for every backend
    latent = model.forward_encoder(imgs, mask)
    pred = model.forward_decoder(latent, mask)
    loss = model.forward_loss(imgs, pred, mask) + (latent * probe).sum()
    loss.backward()
    return latent.detach(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# ratio 0.9 needs at least 10 patches to keep one: 96x128 (12 patches)
CASES = [((64, 64), 0.0), ((64, 64), 0.6), ((96, 128), 0.0), ((96, 128), 0.6), ((96, 128), 0.9)]


@pytest.mark.parametrize("hw,ratio", CASES)
@pytest.mark.parametrize("drop_path", [0.0, 0.3])
def test_backends_agree(hw, ratio, drop_path):
    model = perturbed(drop_path_rate=drop_path).train()
    imgs = torch.randn(3, 3, *hw)
    mask = model.gen_random_mask(imgs, ratio)
    probe = torch.randn(3, model.encoder.num_features, hw[0] // 32, hw[1] // 32)
    ref = run(model, "dense", imgs, mask, probe)
    out = run(model, "gather", imgs, mask, probe)
    assert rel(out[0], ref[0]) < 1e-5
    assert rel(out[1], ref[1]) < 1e-5
    for name, g in ref[2].items():
        assert g is not None and out[2][name] is not None, name
        assert rel(out[2][name], g) < 1e-5, name
    # drop path really was active: a different seed changes the output
    if drop_path:
        assert rel(run(model, "dense", imgs, mask, probe, seed=7)[0], ref[0]) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_pixels_do_not_leak(backend):
    model = perturbed(backend=backend).eval()
    imgs = torch.randn(4, 3, 96, 128)
    mask = model.gen_random_mask(imgs, 0.6)
    pixel_mask = mask.reshape(4, 1, 3, 1, 4, 1).expand(4, 1, 3, 32, 4, 32).reshape(4, 1, 96, 128)
    changed = imgs + 100 * torch.randn_like(imgs) * pixel_mask  # only masked pixels move
    with torch.no_grad():
        a, b = model.forward_encoder(imgs, mask), model.forward_encoder(changed, mask)
    visible = (1 - mask).reshape(4, 1, 3, 4).bool().expand_as(a)
    assert torch.allclose(a[visible], b[visible], rtol=0, atol=1e-6)
    assert (a[~visible] == 0).all() and (b[~visible] == 0).all()
    # one sample changed entirely: the others are untouched (GRN statistics are per sample)
    other = imgs.clone()
    other[1] = torch.randn(3, 96, 128)
    with torch.no_grad():
        c = model.forward_encoder(other, mask)
    keep = torch.tensor([True, False, True, True])
    assert torch.allclose(c[keep], a[keep], rtol=0, atol=1e-6)
    assert not torch.allclose(c[1], a[1])


def test_grn_statistics_are_visible_sites_per_sample():
    """An independent check of the GRN semantics: a one-block network evaluated by hand."""
    torch.manual_seed(0)
    enc = ConvNeXt(ConvNeXtConfig((1,), (8,), stem_patch=32, stem_norm=False), num_classes=0)
    enc.head = torch.nn.Identity()
    model = FCMAE(enc, patch_size=32, decoder_dim=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    imgs, mask = torch.randn(2, 3, 64, 96), torch.tensor([[0, 1, 0, 0, 1, 1.0], [1, 1, 0, 1, 0, 0.0]])
    blk = enc.stages[0].blocks[0]
    x = enc.stem(imgs) * (1 - mask).reshape(2, 1, 2, 3)
    expected = torch.zeros(2, 8, 2, 3)
    for n in range(2):  # brute force over visible sites of one sample
        sites = [(i, j) for i in range(2) for j in range(3) if mask[n, i * 3 + j] == 0]
        y = blk.conv_dw(x[n : n + 1])[0]  # masked inputs are zero
        h = {s: blk.mlp.act(blk.mlp.fc1(blk.norm(y[:, s[0], s[1]]))) for s in sites}
        gx = torch.sqrt(sum(h[s] ** 2 for s in sites))
        nx = gx / (gx.mean() + 1e-6)
        for s in sites:
            out = blk.mlp.grn.weight * (h[s] * nx) + blk.mlp.grn.bias + h[s]
            expected[n, :, s[0], s[1]] = x[n, :, s[0], s[1]] + blk.mlp.fc2(out)
    for backend in BACKENDS:
        model.backend = backend
        with torch.no_grad():
            assert rel(model.forward_encoder(imgs, mask), expected) < 1e-5, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_zero_equals_dense_forward_features(backend):
    model = perturbed(backend=backend).eval()
    dense = fcmae.create_model("convnextv2_atto").eval()
    report = fcmae.load_checkpoint(dense, model.encoder.state_dict())
    assert sorted(report.missing) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    imgs = torch.randn(2, 3, 64, 96)
    mask = torch.zeros(2, 6)
    with torch.no_grad():
        assert rel(model.forward_encoder(imgs, mask), dense.forward_features(imgs)) < 1e-5


def patchify_reference(imgs, p):
    n, c, H, W = imgs.shape
    out = np.zeros((n, (H // p) * (W // p), p * p * c))
    for r in range(H // p):
        for q in range(W // p):
            for i in range(p):
                for j in range(p):
                    for ch in range(c):
                        out[:, r * (W // p) + q, (i * p + j) * c + ch] = imgs[:, ch, r * p + i, q * p + j]
    return out


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_reference_and_ignores_visible(norm_pix):
    model = perturbed(norm_pix_loss=norm_pix)
    imgs = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    pred = torch.randn(2, 6, 32 * 32 * 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.float64)
    target = patchify_reference(imgs.numpy(), 32)
    if norm_pix:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred.numpy() - target) ** 2).mean(-1)
    expected = (per_patch * mask.numpy()).sum() / mask.numpy().sum()
    loss = model.forward_loss(imgs, pred, mask)
    assert abs(loss.item() - expected) < 1e-9 * abs(expected)
    moved = pred + 5 * (1 - mask)[..., None]  # change predictions at visible patches only
    assert model.forward_loss(imgs, moved, mask).item() == loss.item()
    assert torch.equal(model.unpatchify(model.patchify(imgs), (2, 3)), imgs)


def test_loss_hand_value():
    """Zero images and all-one predictions: per-patch MSE is exactly 1, with or without norm-pix
    (a constant patch normalises to zero)."""
    for norm_pix in (True, False):
        model = create_fcmae("convnextv2_atto", norm_pix_loss=norm_pix)
        imgs, pred = torch.zeros(1, 3, 64, 64), torch.ones(1, 4, 3072)
        assert model.forward_loss(imgs, pred, torch.tensor([[1.0, 0, 0, 1]])).item() == 1.0


def test_mask_keeps_same_count_per_sample():
    model = create_fcmae("convnextv2_atto")
    for hw, ratio, kept in [((224, 224), 0.6, 19), ((384, 384), 0.6, 57), ((512, 512), 0.6, 102), ((96, 128), 0.9, 1)]:
        mask = model.gen_random_mask(torch.zeros(5, 3, *hw), ratio)
        assert mask.shape == (5, hw[0] // 32 * hw[1] // 32)
        assert ((mask == 0).sum(1) == kept).all()
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
    masks = model.gen_random_mask(torch.zeros(64, 3, 224, 224))
    assert (masks.float().mean(0) > 0).all()  # every position gets masked sometimes: random, not fixed


def test_bad_inputs():
    model = create_fcmae("convnextv2_atto")
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.zeros(1, 3, 224, 200))
    with pytest.raises(ValueError, match="keeps no patch"):
        model(torch.zeros(1, 3, 64, 64), mask_ratio=0.9)
    with pytest.raises(ValueError, match="same number"):
        model.backend = "gather"
        model.forward_encoder(torch.zeros(2, 3, 64, 64), torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1.0]]))
    with pytest.raises(ValueError, match="Unknown sparse backend"):
        create_fcmae("convnextv2_atto", backend="nope")
    with pytest.raises(ValueError, match="ConvNeXt V2"):
        create_fcmae("convnext_tiny")
    with pytest.raises(ValueError, match="Unknown model"):
        create_fcmae("convnextv2_gigantic")


def test_init_std():
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_base", decoder_depth=2)
    for name in [
        "pred.weight",
        "decoder.1.mlp.fc1.weight",
        "encoder.stages.2.blocks.0.mlp.fc1.weight",
        "encoder.stem.0.weight",
        "mask_token",
        "proj.weight",
    ]:
        std = dict(model.named_parameters())[name].std().item()
        assert 0.015 < std < 0.021, (name, std)  # truncated normal(0.02) in [-2, 2] has std ~0.0176


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_cpu(backend):
    model = perturbed(backend=backend)
    imgs = torch.randn(2, 3, 64, 96)
    mask = model.gen_random_mask(imgs)
    ref = model(imgs, mask)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = model(imgs, mask)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile(backend):
    """A narrow test-width encoder keeps compile time small; compiled == eager."""
    torch.manual_seed(0)
    enc = ConvNeXt(ConvNeXtConfig((1, 1, 1, 1), (8, 16, 24, 32)), num_classes=0)
    enc.head = torch.nn.Identity()
    model = FCMAE(enc, decoder_dim=16, backend=backend)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    imgs = torch.randn(2, 3, 64, 96)
    torch.manual_seed(1)
    eager, _, mask = model(imgs)
    compiled = torch.compile(model)
    loss, _, _ = compiled(imgs, mask)
    loss.backward()
    assert rel(loss, eager) < 1e-5


def test_einops_patchify_runs_the_plain_reshape_ops():
    """patchify / unpatchify are written with einops for readability: the same values as the plain
    reshape-permute-reshape and the very same aten ops when traced (no cost in the training step)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fcmae.sparse.masking import patchify, unpatchify

    def plain_patchify(x, p):
        n, c, h, w = x.shape
        return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)

    def plain_unpatchify(y, p, grid, c):
        n, (h, w) = y.shape[0], grid
        return y.reshape(n, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h * p, w * p)

    def ops(f, *args):
        return [str(n.target) for n in make_fx(f)(*args).graph.nodes if n.op == "call_function"]

    x = torch.randn(2, 4, 64, 96)
    y = plain_patchify(x, 32)
    assert torch.equal(patchify(x, 32), y) and torch.equal(unpatchify(y, 32, (2, 3), 4), x)
    assert ops(lambda t: patchify(t, 32), x) == ops(lambda t: plain_patchify(t, 32), x)
    assert ops(lambda t: unpatchify(t, 32, (2, 3), 4), y) == ops(lambda t: plain_unpatchify(t, 32, (2, 3), 4), y)
