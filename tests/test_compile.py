"""--compile and --channels-last, the GPU settings, through the real training loops on the CPU:
each run matches the eager, contiguous run of the same seed (losses step by step, final weights),
and the saved checkpoints keep the model's own parameter names.

Inductor draws its own random numbers by default; ``fallback_random`` makes it use eager's, so
that masks, drop path and dropout are the same draws in both runs and the comparison is exact up
to floating-point reassociation."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_finetune import make_shapes
from test_pretrain import make_images


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


@pytest.fixture
def compiled_runs(monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def test_pretrain_compiled_channels_last_matches_eager(tmp_path, compiled_runs):
    from fcmae.pretrain import main

    data = make_images(tmp_path / "imgs", n=8)
    common = [
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
        "3",
        "--log-every",
        "1",
        "--save-every",
        "3",
        "--num-recon",
        "0",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "1",
        "--drop-path",
        "0.1",
    ]
    main([*common, "--output-dir", str(tmp_path / "eager")])
    main([*common, "--compile", "--channels-last", "--output-dir", str(tmp_path / "compiled")])
    eager, compiled = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert [r["step"] for r in compiled] == [1, 2, 3]
    assert all(close(c["loss"], e["loss"], 1e-4) for c, e in zip(compiled, eager)), (compiled, eager)
    a, b = (
        load_file(str(tmp_path / "compiled" / "fcmae.safetensors")),
        load_file(str(tmp_path / "eager" / "fcmae.safetensors")),
    )
    assert a.keys() == b.keys()  # no _orig_mod. prefixes
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-3 * b[k].abs().max() + 1e-6, k


def test_finetune_compiled_channels_last_matches_eager(tmp_path, compiled_runs):
    from fcmae.finetune import main

    shapes = make_shapes(tmp_path / "shapes")
    common = [
        "--model",
        "convnextv2_atto",
        "--data",
        str(shapes),
        "--input-size",
        "64",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--report-to",
        "none",
        "--epochs",
        "1",
        "--warmup-steps",
        "1",
        "--lr",
        "2e-3",
        "--drop-path",
        "0.1",
        "--mixup",
        "0.8",
        "--model-ema",
        "--model-ema-decay",
        "0.9",
    ]
    main([*common, "--output-dir", str(tmp_path / "eager")])
    main([*common, "--compile", "--channels-last", "--output-dir", str(tmp_path / "compiled")])
    (eager,), (compiled,) = read_log(tmp_path / "eager"), read_log(tmp_path / "compiled")
    assert close(compiled["train_loss"], eager["train_loss"], 1e-4), (compiled, eager)
    for name in ("last.safetensors", "best_ema.safetensors"):
        a, b = load_file(str(tmp_path / "compiled" / name)), load_file(str(tmp_path / "eager" / name))
        assert a.keys() == b.keys(), name
        for k in a:
            assert (a[k] - b[k]).abs().max() <= 1e-3 * b[k].abs().max() + 1e-6, (name, k)
