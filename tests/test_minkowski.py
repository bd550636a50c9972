"""The ``minkowski`` backend (real MinkowskiEngine sparse tensors) against the ``dense`` reference:
forward outputs and every parameter gradient within 1e-5 relative (fp32), with and without drop
path, square and non-square inputs, mask ratios 0 / 0.6 / 0.9; masked pixels never matter; and
MinkowskiEngine's kernel-offset order, checked against ``F.conv2d`` on its own.

MinkowskiEngine is an optional dependency (``bash .ci/install_minkowski.sh``): on a user's machine every
test that needs it is skipped when it cannot be imported, and only then. In CI (``CI`` or
``FCMAE_REQUIRE_MINKOWSKI`` set to 1/true; ``.ci/run`` sets the latter) those tests fail instead.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from fcmae import create_fcmae
from fcmae.sparse import minkowski as mk
from fcmae.weights.convert import _minkowski_kernel

try:
    ME, ME_ERROR = mk.import_minkowski(), None
except ImportError as e:
    ME, ME_ERROR = None, e
pytestmark = pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")  # ME 0.5.4
ME_REQUIRED = os.environ.get("FCMAE_REQUIRE_MINKOWSKI", os.environ.get("CI", "")).strip().lower() in (
    "1",
    "true",
    "yes",
)
if ME is None and ME_REQUIRED:  # CI claims to test this backend: fail, never skip
    needs_me = pytest.mark.usefixtures("_require_me")
else:
    needs_me = pytest.mark.skipif(ME is None, reason="MinkowskiEngine is not installed (bash .ci/install_minkowski.sh)")


@pytest.fixture
def _require_me():
    pytest.fail(
        f"MinkowskiEngine is required here (CI / FCMAE_REQUIRE_MINKOWSKI) but cannot be imported: {ME_ERROR}",
        pytrace=False,
    )


TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These are small problems: with 2 OpenMP threads on a busy 2-core machine, spin-waiting
    makes them 10-50x slower (seconds instead of 0.1 s per step). One thread is fast and steady.
    (The backend's ME coordinate managers keep torch's thread count; ME's default would reset it.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL, what: str = "") -> None:
    """max |actual - expected| <= tol * max |expected| (relative to the tensor's scale)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= tol * max(scale, 1e-12), (
        f"{what}: max abs err {err:.3g} vs scale {scale:.3g} (rel {err / max(scale, 1e-30):.3g})"
    )


# ---------------------------------------------------------------------------------------------
# MinkowskiEngine's kernel order, independently of the backend
# ---------------------------------------------------------------------------------------------


def _full_grid_sparse(x: torch.Tensor, stride: int = 1):
    """Dense (1, C, H, W) -> ME sparse tensor on every site; ME coordinate (batch, row, col)."""
    _, c, h, w = x.shape
    r, q = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    coords = torch.stack([torch.zeros(h * w, dtype=torch.long), r.flatten() * stride, q.flatten() * stride], 1).int()
    feats = x[0].permute(1, 2, 0).reshape(h * w, c)
    return ME.SparseTensor(
        feats, coordinates=coords, tensor_stride=stride, coordinate_manager=mk.coordinate_manager(feats)
    )


def _to_dense(y, h: int, w: int, stride: int) -> torch.Tensor:
    out = torch.zeros(1, y.F.shape[1], h, w, dtype=y.F.dtype)
    c = y.C.long()
    out[0, :, c[:, 1] // stride, c[:, 2] // stride] = y.F.t()
    return out


@needs_me
def test_me_kernel_order_channelwise_matches_conv2d():
    """For a k x k channelwise kernel (k*k, C): dense weight[c, 0, h, w] = kernel[h + k*w, c], with
    ME's first spatial axis = image rows (ME enumerates offsets with the first axis fastest)."""
    torch.manual_seed(0)
    k, c, h, w = 3, 4, 5, 7  # non-square, so swapped axes cannot pass by symmetry
    x = torch.randn(1, c, h, w)
    kernel = torch.randn(k * k, c)
    conv = ME.MinkowskiChannelwiseConvolution(c, kernel_size=k, dimension=2)
    with torch.no_grad():
        conv.kernel.copy_(kernel)
    y = _to_dense(conv(_full_grid_sparse(x)), h, w, 1)
    weight = torch.empty(c, 1, k, k)
    for i in range(k):
        for j in range(k):
            weight[:, 0, i, j] = kernel[i + k * j]
    assert_rel(y, F.conv2d(x, weight, padding=k // 2, groups=c), 1e-6, "h + k*w order")
    # the other order (row-major, h*k + w) is wrong: the check above discriminates
    wrong = kernel.t().reshape(c, 1, k, k)
    assert (y - F.conv2d(x, wrong, padding=k // 2, groups=c)).abs().max() > 1e-2
    # the backend's helper builds exactly this kernel from a dense weight, and the checkpoint
    # loader (official MinkowskiEngine training checkpoints) inverts it
    assert torch.equal(mk.depthwise_kernel(weight), kernel)
    assert torch.equal(_minkowski_kernel("stages.0.blocks.0.conv_dw.weight", kernel), weight)


@needs_me
def test_me_kernel_order_strided_conv_matches_conv2d():
    """2x2 stride-2 conv kernel (4, Cin, Cout): dense weight[o, i, h, w] = kernel[h + 2*w, i, o]."""
    torch.manual_seed(1)
    cin, cout, h, w = 3, 5, 4, 6
    x = torch.randn(1, cin, h, w)
    kernel = torch.randn(4, cin, cout)
    conv = ME.MinkowskiConvolution(cin, cout, kernel_size=2, stride=2, dimension=2)
    with torch.no_grad():
        conv.kernel.copy_(kernel)
    y = _to_dense(conv(_full_grid_sparse(x, stride=4)), h // 2, w // 2, 8)
    weight = torch.empty(cout, cin, 2, 2)
    for i in range(2):
        for j in range(2):
            weight[:, :, i, j] = kernel[i + 2 * j].t()
    assert_rel(y, F.conv2d(x, weight, stride=2), 1e-6, "h + 2*w order")
    assert torch.equal(mk.conv_kernel(weight), kernel)
    assert torch.equal(_minkowski_kernel("stages.1.downsample.1.weight", kernel), weight)


# ---------------------------------------------------------------------------------------------
# the backend against the dense reference
# ---------------------------------------------------------------------------------------------


def _model(drop_path_rate: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_atto", backend="dense", drop_path_rate=drop_path_rate, decoder_dim=64)
    with torch.no_grad():  # GRN weights and biases start at zero: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.train()


def _run(model, backend: str, imgs, mask, probe, seed: int = 123):
    model.backend = backend
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop path draws
    latent = model.forward_encoder(imgs, mask)
    # the probe term reaches every encoder parameter even at ratio 0, where the FCMAE loss is 0
    loss = (latent * probe).sum() + model.forward_loss(imgs, model.forward_decoder(latent, mask), mask)
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return latent.detach(), grads


CASES = [((64, 64), 0.0), ((64, 64), 0.6), ((96, 128), 0.0), ((96, 128), 0.6), ((96, 128), 0.9)]


@needs_me
@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5], ids=["no_drop_path", "drop_path"])
@pytest.mark.parametrize("size,ratio", CASES, ids=[f"{h}x{w}-r{r}" for (h, w), r in CASES])
def test_matches_dense(size, ratio, drop_path_rate):
    model = _model(drop_path_rate)
    g = torch.Generator().manual_seed(7)
    n = 2
    imgs = torch.randn(n, 3, *size, generator=g)
    mask = model.gen_random_mask(imgs, ratio)
    grid = model.grid(imgs)
    assert int((mask == 0).sum(1)[0]) >= 1 and (ratio == 0) == bool((mask == 0).all())
    probe = torch.randn(n, model.encoder.num_features, *grid, generator=g)

    ref, ref_grads = _run(model, "dense", imgs, mask, probe)
    out, grads = _run(model, "minkowski", imgs, mask, probe)

    assert_rel(out, ref, what="encoder output")
    assert torch.get_num_threads() == 1, "the backend changed torch's thread count (ME coordinate manager default)"
    assert bool((out.abs().sum(1) == 0).equal(mask.view(n, *grid) > 0)), "exactly the masked patches are zero"
    for name, gref in ref_grads.items():
        if name.startswith("encoder."):
            assert gref is not None and grads[name] is not None, f"no gradient for {name}"
        if gref is None:
            assert grads[name] is None, name
        else:
            assert_rel(grads[name], gref, what=f"grad {name}")
    if drop_path_rate > 0:  # drop path really acts: another seed gives another output
        torch.manual_seed(4)
        with torch.no_grad():
            other = model.forward_encoder(imgs, mask)
        assert (other - out).abs().max() > 1e-3


@needs_me
def test_masked_pixels_do_not_matter():
    model = _model(0.0)
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(2, 3, 96, 128, generator=g)
    mask = model.gen_random_mask(imgs, 0.6)
    pix_masked = model.unpatchify(mask[..., None].expand(-1, -1, 32 * 32 * 3), grid=model.grid(imgs)) > 0
    model.backend = "minkowski"
    imgs = imgs.requires_grad_()
    out = model.forward_encoder(imgs, mask)
    out.sum().backward()
    assert imgs.grad[pix_masked].abs().max() == 0
    assert imgs.grad[~pix_masked].abs().max() > 0
    noisy = imgs.detach() + 10 * torch.randn(imgs.shape, generator=g) * pix_masked
    with torch.no_grad():
        out2 = model.forward_encoder(noisy, mask)
    assert_rel(out2, out.detach(), 1e-6, "masked pixels changed the output")


def test_missing_minkowski_engine_raises_clear_import_error(monkeypatch):
    """Runs with or without MinkowskiEngine: a missing install names the install steps."""
    monkeypatch.setattr(mk, "_ME", None)
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # makes `import MinkowskiEngine` fail
    with pytest.raises(ImportError, match="install_minkowski.sh"):
        mk.import_minkowski()
    with pytest.raises(ImportError, match="install_minkowski.sh"):  # at construction, not at the first step
        create_fcmae("convnextv2_atto", backend="minkowski")
