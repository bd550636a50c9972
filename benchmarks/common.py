"""What every benchmark script shares: the machine description saved with its results, and
matplotlib for its plot (optional: without it a script still prints and saves JSON)."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine(device: str | None = None) -> dict:
    """The machine a result was measured on. ``device`` names the GPU, or the CPU and its cores;
    pass ``device="cpu"`` for a CPU run on a machine that also has a GPU."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "load_avg_1m_at_start": os.getloadavg()[0]}
    if device.startswith("cuda"):
        info.update(device=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    else:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
        info["device"] = f"CPU: {cpu} ({os.cpu_count()} cores)"
    return info


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
