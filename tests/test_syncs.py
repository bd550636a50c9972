"""The pretraining step never waits on the device: no host reads of device values per step.

A read of a tensor's value (``.item()``, ``bool()``, ``nonzero``, boolean indexing, a shape that
depends on data) makes the host wait for the GPU. Two independent checks, both runnable on a CPU:
- the model's forward + backward runs on the ``meta`` device, where every such read raises;
- the training loop, run twice for different step counts with one log and one save each, makes
  the same number of value reads from fcmae's per-step code: none of them scales with steps.
tests/test_gpu.py repeats the model check on a GPU with CUDA's sync debug mode.
"""

import sys
from pathlib import Path

import pytest
import torch

import fcmae
from fcmae.models.fcmae import FCMAE

PKG = Path(fcmae.__file__).resolve().parent


def meta_fcmae(backend: str, **kw) -> FCMAE:
    with torch.device("meta"):
        return fcmae.create_fcmae("convnextv2_atto", backend=backend, drop_path_rate=0.1, **kw)


def test_meta_device_rejects_host_reads():
    """The instrument works: each kind of host read raises on meta tensors."""
    x = torch.empty(4, device="meta")
    for read in (
        lambda: x.sum().item(),
        lambda: bool(x.sum() > 0),
        lambda: x.nonzero(),
        lambda: x[x > 0],
        lambda: x.tolist(),
    ):
        with pytest.raises((RuntimeError, NotImplementedError)):
            read()


@pytest.mark.parametrize("backend", ["dense", "gather"])
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_train_step_has_no_host_reads(backend, norm_pix_loss):
    model = meta_fcmae(backend, norm_pix_loss=norm_pix_loss).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    imgs = torch.empty(2, 3, 224, 160, device="meta")
    loss, pred, mask = model(imgs)  # the mask comes from gen_random_mask: its visible count is known
    loss.backward()
    opt.step()
    assert loss.shape == () and pred.shape == (2, 35, 3 * 32 * 32) and mask.shape == (2, 35)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p is not model.mask_token)


def test_a_given_mask_is_counted_on_the_host():
    """A mask the caller passes in has an unknown visible count: the gather backend reads it once
    (documented). The meta check sees that read, so it would see any other."""
    model = meta_fcmae("gather")
    imgs = torch.empty(2, 3, 64, 64, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        model(imgs, torch.empty(2, 4, device="meta"))


@pytest.mark.parametrize("backend", ["gather", "dense"])
def test_training_step_compiles_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) fails on a graph break (a host read, data-dependent control flow):
    convnextv2_atto's FCMAE step, forward and backward (one AOT graph, masks and drop path keyed per
    sample) and AdamW's step, each compiles to one graph. The step is traced by torch._dynamo.explain,
    which counts graphs and breaks (``fullgraph=True`` on ``Optimizer.step`` trips on the deliberate
    ``graph_break()`` of torch's ``_use_grad`` wrapper, which explain's tracing does not count).
    The backend is ``aot_eager``: a graph break is dynamo's (it fails here whatever the backend), and
    AOT autograd still traces the backward; inductor's code generation, which is most of a compile's
    time, is tested against eager in tests/test_compile.py and tests/test_fcmae.py."""
    torch.manual_seed(0)
    model = fcmae.create_fcmae("convnextv2_atto", backend=backend, decoder_dim=32, drop_path_rate=0.1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch._dynamo.reset()
    forward = torch.compile(model, fullgraph=True, backend="aot_eager")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _, _ = forward(torch.randn(2, 3, 64, 96), keys=torch.arange(2))
    loss.backward()
    explained = torch._dynamo.explain(opt.step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert torch.isfinite(loss) and not torch.equal(before["encoder.stem.0.weight"], model.encoder.stem[0].weight)


PER_STEP_CODE = [
    *PKG.glob("tasks/pretrain/*.py"),
    *PKG.glob("training/*.py"),
    *PKG.glob("sparse/*.py"),
    *PKG.glob("models/*.py"),
]
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


def count_reads(monkeypatch, argv) -> int:
    """Run pretraining in this process; count value reads whose caller is fcmae's per-step code."""
    from fcmae.pretrain import main

    files = {str(p) for p in PER_STEP_CODE}
    calls = []

    def wrap(name):
        orig = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller in files:
                calls.append((name, caller, sys._getframe(1).f_lineno))
            return orig(self, *a, **k)

        return read

    with monkeypatch.context() as m:
        for name in READS:
            m.setattr(torch.Tensor, name, wrap(name))
        main(argv)
    return len(calls)


def test_pretrain_loop_reads_values_only_when_logging_and_saving(tmp_path, monkeypatch):
    from PIL import Image

    data = tmp_path / "imgs"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        arr = (torch.rand(80, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(data / f"{i}.png")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def argv(steps):  # one log, one checkpoint and one reconstruction, all at the last step
        return [
            "--data",
            str(data),
            "--input-size",
            "64",
            "--batch-size",
            "2",
            "--decoder-dim",
            "16",
            "--num-workers",
            "0",
            "--report-to",
            "none",
            "--max-steps",
            str(steps),
            "--log-every",
            "1000",
            "--save-every",
            "1000",
            "--num-recon",
            "1",
            "--warmup-steps",
            "1",
            "--grad-accum",
            "2",
            "--output-dir",
            str(tmp_path / f"run{steps}"),
        ]

    short, long = count_reads(monkeypatch, argv(2)), count_reads(monkeypatch, argv(6))
    assert short > 0  # the end-of-run log and health check do read values: the counter sees them
    assert long == short, f"{long - short} host reads over 4 extra steps: the step loop waits on the device"
