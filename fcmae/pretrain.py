"""FCMAE pretraining of ConvNeXt V2.

Usage:
    accelerate launch fcmae/pretrain.py                          # built-in demo: shipped photos, CPU-sized
    accelerate launch fcmae/pretrain.py --config configs/pretrain/convnextv2_base.yaml --data /path/to/images
    accelerate launch fcmae/pretrain.py --dataset-name owner/name --image-column image --streaming --max-steps 10000
    python fcmae/pretrain.py --help                               # every field; any of them is a flag

Precedence: defaults < demo preset (only when no data is given) < --config YAML < flags.
Outputs in --output-dir: config.yaml, log.jsonl, checkpoints/step_N (resume with --resume auto),
encoder.safetensors, fcmae.safetensors, reconstructions/step_N.png.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repo root, not fcmae/, first on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from fcmae.tasks.pretrain import DEMO, PretrainConfig, choose_preset, pretrain  # noqa: E402
from fcmae.training.config import cli  # noqa: E402

__all__ = ["DEMO", "PretrainConfig", "choose_preset", "main"]


def main(argv: list[str] | None = None) -> None:
    cli(PretrainConfig, pretrain, argv, description=__doc__, choose_preset=choose_preset)


if __name__ == "__main__":
    main()
