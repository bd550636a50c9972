"""A real one-node Slurm (.ci/start_slurm.sh: slurmctld, slurmd and munged on this machine), a real job:
``fcmae submit --nodes 1 --processes-per-node 2 --cpu -- pretrain ...``, requeued with ``scontrol
requeue`` in the middle of the run. The job's final weights equal, bit for bit, those of an
uninterrupted 2-process run.

Slurm holds a requeued job cred_expire + 1 seconds before it may start again (121 s by default): the
fixture sets cred_expire to FCMAE_TEST_SLURM_CRED_EXPIRE (default 10). The Slurm tests need root (or
passwordless sudo) to install and start Slurm: without it they fail, unless FCMAE_SKIP_SLURM=1 says
to skip them.
"""

import json
import os
import re
import socket
import subprocess
import time

import pytest
from conftest import ROOT, run_cli
from safetensors.torch import load_file
from test_distributed import PRETRAIN, assert_bitwise_equal, launch
from test_pretrain import make_images

ARGS = [
    "--model",
    "convnextv2_atto",
    "--input-size",
    "64",
    "--batch-size",
    "4",
    "--decoder-dim",
    "32",
    "--num-workers",
    "0",
    "--report-to",
    "none",
    "--log-every",
    "1",
    "--num-recon",
    "0",
    "--lr",
    "1e-3",
    "--warmup-steps",
    "2",
    "--max-steps",
    "24",
    "--save-every",
    "8",
]


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    if os.environ.get("FCMAE_SKIP_SLURM") == "1":
        pytest.skip("FCMAE_SKIP_SLURM=1")
    state = tmp_path_factory.mktemp("slurm-state")
    ctld, slurmd = free_ports(2)  # a Slurm left running by an earlier, killed session cannot collide
    env = {
        **os.environ,
        "FCMAE_SLURM_CRED_EXPIRE": os.environ.get("FCMAE_TEST_SLURM_CRED_EXPIRE", "10"),
        "FCMAE_SLURM_CTLD_PORT": str(ctld),
        "FCMAE_SLURM_SLURMD_PORT": str(slurmd),
        "FCMAE_SLURM_TIMEOUT": "180",  # a busy machine registers the node slowly
    }
    stop = ["bash", str(ROOT / ".ci" / "stop_slurm.sh"), str(state)]
    t0 = time.monotonic()
    start = ["bash", str(ROOT / ".ci" / "start_slurm.sh"), str(state)]
    proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        subprocess.run(stop, capture_output=True, timeout=180)  # no daemons left behind
        pytest.fail(f".ci/start_slurm.sh failed:\n{proc.stdout}\n{proc.stderr}")
    conf = re.search(r"export SLURM_CONF=(\S+)", proc.stdout).group(1)
    print(f"local Slurm up in {time.monotonic() - t0:.1f} s ({conf})")
    yield conf
    subprocess.run(stop, capture_output=True, timeout=180)


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def job_info(job: str, conf: str) -> dict:
    out = subprocess.run(
        ["scontrol", "show", "job", job], capture_output=True, text=True, env={**os.environ, "SLURM_CONF": conf}
    ).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def wait(cond, timeout: float, what: str, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(
        f"timed out ({timeout} s) waiting for {what}\n--- job log ---\n"
        + (log.read_text()[-4000:] if log.exists() else "(none)")
    )


def test_requeued_job_resumes_bitwise(local_slurm, tmp_path):
    images = make_images(tmp_path / "imgs", n=48)
    launch(["--multi_gpu"], PRETRAIN, [*ARGS, "--data", images, "--output-dir", tmp_path / "ref"])
    out = tmp_path / "job"
    env = {"SLURM_CONF": local_slurm}
    dry = run_cli(
        [
            "-m",
            "fcmae",
            "submit",
            "--nodes",
            "1",
            "--processes-per-node",
            "2",
            "--cpu",
            "--dry-run",
            "--",
            "pretrain",
            *ARGS,
            "--data",
            images,
            "--output-dir",
            out,
        ],
        env=env,
    ).stdout
    assert "#SBATCH --requeue" in dry and "--num_processes 2" in dry and not out.exists()
    sub = run_cli(
        [
            "-m",
            "fcmae",
            "submit",
            "--nodes",
            "1",
            "--processes-per-node",
            "2",
            "--cpu",
            "--job-name",
            "requeue",
            "--",
            "pretrain",
            *ARGS,
            "--data",
            images,
            "--output-dir",
            out,
        ],
        env=env,
    )
    job = sub.stdout.strip().splitlines()[0]
    assert job.isdigit(), sub.stdout + sub.stderr
    log = out / "slurm" / f"requeue-{job}.out"

    def step() -> int:
        path = out / "log.jsonl"
        rows = [json.loads(r) for r in path.read_text().splitlines()] if path.exists() else []
        return max((r["step"] for r in rows), default=0)

    wait(lambda: step() >= 10, 300, "step 10", log)
    subprocess.run(["scontrol", "requeue", job], check=True, env={**os.environ, **env})
    wait(
        lambda: job_info(job, local_slurm).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
        400,
        "the requeued job to end",
        log,
    )
    info, text = job_info(job, local_slurm), log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    assert "start 2 (restarts so far: 1" in text and "resumed from" in text, "appended log of the second start"
    stops = [json.loads(p.read_text()) for p in (out / "slurm").glob("stop-*.json")]
    assert stops and stops[0]["signal"] == "SIGTERM" and stops[0]["status"] == 75
    ref = load_file(str(tmp_path / "ref" / "fcmae.safetensors"))
    assert_bitwise_equal(load_file(str(out / "fcmae.safetensors")), ref)
