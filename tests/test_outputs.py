"""An output folder holds one run: a new run refuses a folder with another run's files in one line
that names --resume auto and --overwrite; --overwrite deletes the earlier run's files first, so the
files of two runs never mix; the built-in demo replaces its own earlier output, saying so."""

import json

import numpy as np
from conftest import run_cli
from PIL import Image

PRETRAIN = "fcmae/pretrain.py"
TINY = [
    "--model",
    "convnextv2_atto",
    "--input-size",
    "64",
    "--batch-size",
    "2",
    "--decoder-dim",
    "16",
    "--num-workers",
    "0",
    "--num-recon",
    "0",
    "--report-to",
    "none",
    "--log-every",
    "1",
    "--warmup-steps",
    "1",
]


def rows(out):
    return [json.loads(r) for r in (out / "log.jsonl").read_text().splitlines()]


def test_a_second_run_is_refused_or_replaces_the_first(tmp_path):
    data = tmp_path / "imgs"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (72, 72, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "run"
    run_cli([PRETRAIN, *TINY, "--data", data, "--max-steps", "4", "--save-every", "2", "--output-dir", out])
    before = (out / "log.jsonl").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]

    refused = run_cli([PRETRAIN, *TINY, "--data", data, "--max-steps", "2", "--output-dir", out], check=False)
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and last.startswith("error:") and "--resume auto" in last and "--overwrite" in last
    assert (out / "log.jsonl").read_text() == before  # nothing touched

    replaced = run_cli(
        [
            PRETRAIN,
            *TINY,
            "--data",
            data,
            "--max-steps",
            "2",
            "--save-every",
            "2",
            "--lr",
            "0.5",
            "--output-dir",
            out,
            "--overwrite",
        ]
    )
    assert "--overwrite: replaced the earlier run" in replaced.stdout + replaced.stderr
    assert [r["step"] for r in rows(out)] == [1, 2]  # the new run's rows only
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]  # step 4 was the old run's


def test_the_demo_replaces_its_own_output(tmp_path):
    demo = [
        "--max-steps",
        "1",
        "--input-size",
        "64",
        "--batch-size",
        "2",
        "--num-workers",
        "0",
        "--num-recon",
        "0",
        "--report-to",
        "none",
        "--decoder-dim",
        "16",
        "--output-dir",
        tmp_path / "demo",
    ]
    run_cli([PRETRAIN, *demo])
    again = run_cli([PRETRAIN, *demo])
    assert "replaced the earlier run" in again.stdout + again.stderr and len(rows(tmp_path / "demo")) == 1
