import os
import socket
import subprocess
import sys
from pathlib import Path

# Tests never touch the network: a Hub name must fail fast instead of trying to download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2`: one thread per worker, so two workers share two cores
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def rel_err():
    """max |a - b| / max |b|: the error measure every equivalence test uses."""

    def fn(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    return fn


ROOT = Path(__file__).resolve().parents[1]
# the environment of every command-line test: offline, one thread (the CI machine has two cores), no fault hook
CLI_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CLI_ENV.pop("FCMAE_FAULT", None)


def run_cli(args, env=None, check=True, timeout=600) -> subprocess.CompletedProcess:
    """``python ARGS...`` from the repository root, as a user runs it; with ``check``, a non-zero
    exit fails the test with the command's output."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        env={**CLI_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def free_port() -> int:
    """A TCP port that is free on localhost now: a launch's main process port, so that runs of two test
    workers (or a run left by a killed session) never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(processes: int = 2, port: int | None = None) -> list:
    """The head of ``accelerate launch`` for ``processes`` processes on this machine, fp32, no dynamo:
    add the script and its arguments, and ACCELERATE_USE_CPU=true to the environment on a CPU."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port or free_port()),
    ]
