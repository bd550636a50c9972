"""CUDA-only checks (skipped where no GPU is present, as on CI; run them on a GPU machine):
backends agree on the device, bf16 autocast, channels_last, torch.compile, no host syncs in a step."""

import pytest
import torch

from fcmae import create_fcmae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_backends_agree_on_cuda():
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_atto").cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    imgs = torch.randn(4, 3, 224, 160, device="cuda")
    mask = model.gen_random_mask(imgs)
    outs = {}
    for backend in ("dense", "gather"):
        model.backend = backend
        model.zero_grad()
        loss, _, _ = model(imgs, mask)
        loss.backward()
        outs[backend] = (model.forward_encoder(imgs, mask), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert rel(outs["gather"][0], outs["dense"][0]) < 1e-5
    for n, g in outs["dense"][1].items():
        assert rel(outs["gather"][1][n], g) < 1e-4, n


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_bf16_channels_last_compile(backend):
    torch.manual_seed(0)
    model = create_fcmae("convnextv2_atto", backend=backend).cuda().to(memory_format=torch.channels_last)
    imgs = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager, _, mask = model(imgs)
        compiled, _, _ = torch.compile(model)(imgs, mask)
    compiled.backward()
    assert torch.isfinite(compiled) and abs(compiled.item() - eager.item()) < 2e-2 * eager.item()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("backend", ["dense", "gather"])
def test_train_step_never_syncs(backend):
    """CUDA's sync debug mode raises on any host-device synchronisation inside a training step
    (forward, loss, backward, AdamW) once warmed up."""
    model = create_fcmae("convnextv2_atto", backend=backend, drop_path_rate=0.1).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    imgs = torch.randn(8, 3, 224, 224, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(imgs)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
