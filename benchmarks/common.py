"""What every benchmark script shares: the machine description, date and command saved with its
results, running one configuration in a process of its own, and matplotlib for its plot (optional:
without it a script still prints and saves JSON)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine(device: str | None = None) -> dict:
    """The machine a result was measured on. ``device`` names the GPU, or the CPU and its cores;
    pass ``device="cpu"`` for a CPU run on a machine that also has a GPU. ``cpu``, ``cores`` and
    ``gpu`` ("none" for a CPU run) are recorded apart as well."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "load_avg_1m_at_start": os.getloadavg()[0],
    }
    if device.startswith("cuda"):
        info.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda, gpu=torch.cuda.get_device_name())
    else:
        info.update(device=f"CPU: {cpu} ({os.cpu_count()} cores)", gpu="none")
    info.update(cpu=cpu, cores=os.cpu_count())
    return info


def stamp() -> dict:
    """``date`` (UTC, ISO 8601) and ``command`` (this script's command line, from the repository
    root) of a run, for its JSON."""
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", str(script), *sys.argv[1:]]),
    }


def run_config(script: str, cfg: dict, run_one, in_process: bool = False) -> tuple[dict | None, str]:
    """(result, "") of one configuration, or (None, why it failed). By default ``script --one CFG`` in
    a process of its own (a clean peak-memory figure and compilation cache per configuration);
    ``in_process``: ``run_one(cfg)`` here (quicker to start: for smoke runs; the CPU peak memory
    is then this process's, not the configuration's)."""
    if in_process:
        try:
            return run_one(cfg), ""
        except Exception as e:  # noqa: BLE001 - reported, and the other configurations still run
            traceback.print_exc()
            return None, f"{type(e).__name__}: {e}"
        finally:
            import torch

            torch._dynamo.reset()
    proc = subprocess.run(
        [sys.executable, script, "--one", json.dumps(cfg)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["failed"]
        print("\n".join(lines[-15:-1]), file=sys.stderr)
        return None, lines[-1]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values, for a table of seeds."""
    import statistics

    values = list(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": std, "values": values}
