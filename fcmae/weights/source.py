"""Where a weights file is: the one lookup every command uses.

A source is a file, a directory (an export, a fine-tuning run, a pretraining run, or a training
checkpoint), or ``hf-hub:OWNER/NAME[@REVISION]`` (downloaded, or found in the local cache when
HF_HUB_OFFLINE is set). ``find_weights`` turns it into one file; ``read_metadata`` reads the
safetensors metadata fcmae writes beside the tensors (model name, classes, input size, step).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors import safe_open

# what a directory may hold, in the order looked for
DIR_FILES = (
    "model.safetensors",
    "encoder.safetensors",
    "best.safetensors",
    "fcmae.safetensors",
    "pytorch_model.bin",
    "model.pt",
    "model.pth",
    "checkpoint.pth",
    "checkpoint.pt",
)
POSITION = "position.json"  # marks a complete training checkpoint (written last)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """Complete training checkpoints ``step_N`` under ``ckpt_root``, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / POSITION).is_file()
    ]
    return [p for _, p in sorted(found)]


def find_weights(source: str | os.PathLike, names: tuple[str, ...] = DIR_FILES) -> Path:
    """The weights file ``source`` means: itself (a file); the first of ``names`` in it (a directory),
    else its newest complete training checkpoint's (a run directory); the first of ``names`` in a
    Hub repo (``hf-hub:``). Raises ``FileNotFoundError`` naming what was looked for."""
    source = os.fspath(source)
    if source.startswith("hf-hub:"):
        return _hub_file(source.removeprefix("hf-hub:"), names)
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{source} does not exist: give a weights file, a run directory or hf-hub:OWNER/NAME.")
    for name in names:
        if (path / name).is_file():
            return path / name
    ckpts = complete_checkpoints(path / "checkpoints")
    if ckpts and (ckpts[-1] / "model.safetensors").is_file():
        return ckpts[-1] / "model.safetensors"
    raise FileNotFoundError(
        f"No weights in directory {path}: expected one of {', '.join(names)}, or a run directory "
        "with checkpoints/step_N."
    )


def _hub_file(repo_id: str, names: tuple[str, ...]) -> Path:
    repo_id, _, revision = repo_id.partition("@")
    offline = None
    for name in names:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision or None))
        except LocalEntryNotFoundError as e:  # first: a subclass of EntryNotFoundError in huggingface_hub >= 1.0
            offline = e
        except EntryNotFoundError:
            continue
    if offline is not None:
        raise FileNotFoundError(
            f"hf-hub:{repo_id}: {' / '.join(names)} not in the local cache and the Hub cannot be "
            "reached (HF_HUB_OFFLINE set or no network)."
        ) from offline
    raise FileNotFoundError(f"hf-hub:{repo_id} holds none of {', '.join(names)}.")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of ``path`` ({} for other files)."""
    if not str(path).endswith(".safetensors") or not Path(path).is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def run_dir_of(path: Path) -> Path:
    """The run directory a weights file belongs to: its folder, or the run above checkpoints/step_N/."""
    return path.parent.parent.parent if path.parent.parent.name == "checkpoints" else path.parent
