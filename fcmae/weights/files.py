"""Files written atomically: under a temporary name in the same folder, then renamed, so a crash
never leaves a half-written file under the real name."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors written under a temporary name, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
