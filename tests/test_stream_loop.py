"""The pretraining loop on packed shards with --streaming, 2 processes (gloo on the CPU): killed
mid-epoch and resumed from the checkpoint's stream position, it repeats the uninterrupted run bit for
bit; resumed on 1 process with the same global batch it goes on (the same samples at every step, other
masks), and a changed --stream-window is refused in one line."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import CLI_ENV as ENV
from conftest import ROOT, accelerate_launch
from test_pretrain import SCRIPT, TINY, assert_bitwise_equal, make_images, weights

from fcmae.data.pack import pack


def launch(args, processes=2, env=None):
    cmd = [*accelerate_launch(processes), SCRIPT, *args] if processes > 1 else [sys.executable, SCRIPT, *args]
    return subprocess.run(
        cmd,
        env={**ENV, "ACCELERATE_USE_CPU": "true", **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    images = make_images(tmp_path_factory.mktemp("imgs"))  # 24 images: 3 steps of 2 x 4 per epoch
    out = tmp_path_factory.mktemp("shards")
    pack(str(images), str(out), shard_size="40KB", workers=1, log=lambda *_: None)
    return out


def test_streaming_resume_two_processes_bitwise_and_elastic(shards, tmp_path):
    base = [
        *TINY,
        "--data",
        str(shards),
        "--streaming",
        "--stream-window",
        "8",
        "--max-steps",
        "8",
        "--save-every",
        "4",
        "--num-recon",
        "0",
    ]
    ref = launch([*base, "--output-dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    crashed = launch([*base, "--output-dir", str(tmp_path / "run")], env={"FCMAE_FAULT": "step:6"})
    assert crashed.returncode != 0
    position = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "position.json").read_text())
    assert position["data"]["partitions"] == 8 and (position["epoch"], position["batch"]) == (1, 1)
    elastic_dir = tmp_path / "elastic"
    shutil.copytree(tmp_path / "run", elastic_dir)

    resumed = launch([*base, "--output-dir", str(tmp_path / "run"), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(weights(tmp_path / "run"), weights(tmp_path / "ref"))

    one = list(base)
    one[one.index("--batch-size") + 1] = "8"  # the same global batch on 1 process
    elastic = launch([*one, "--output-dir", str(elastic_dir), "--resume", "auto"], processes=1)
    assert elastic.returncode == 0, elastic.stderr[-3000:]
    # the same samples and augmentation at every step (tests/test_stream.py); the masks differ: the loop
    # draws them from (seed, step, rank), and rank 0 of 1 holds the images ranks 0 and 1 of 2 held
    assert "resumed from" in elastic.stdout + elastic.stderr

    refused = launch([*one, "--output-dir", str(elastic_dir), "--resume", "auto", "--stream-window", "16"], processes=1)
    assert refused.returncode == 2 and "--stream-window" in refused.stderr.strip().splitlines()[-1]
