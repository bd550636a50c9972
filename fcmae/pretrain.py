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
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: put the repo root, not fcmae/, first on the path
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from dataclasses import dataclass, field  # noqa: E402


def _help(text: str):
    return field(default=None, metadata={"help": text})


@dataclass
class PretrainConfig:
    # model
    model: str = "convnextv2_atto"
    input_size: int = 224
    mask_ratio: float = 0.6
    decoder_dim: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True
    backend: str = "gather"  # gather | dense | minkowski: same results, gather is the fast one
    drop_path: float = 0.0
    # data (HF datasets)
    data: str | None = _help("image folder, parquet/arrow file(s), or a Hub dataset id; none: built-in demo")
    dataset_name: str | None = _help("Hub dataset id (as in transformers' run_mae.py)")
    dataset_config_name: str | None = None
    split: str = "train"
    image_column: str | None = _help("column holding the images (default: the first Image column)")
    streaming: bool = False
    num_examples: int | None = _help("streaming: dataset size when the source does not say")
    max_bad_fraction: float = 0.01
    num_workers: int = 4
    # optimisation (official recipe, REFERENCE.md section 3)
    batch_size: int = 64  # per device
    grad_accum: int = 1
    epochs: int = 800
    max_steps: int | None = _help("stop after this many optimizer steps (schedule spans them)")
    blr: float = 1.5e-4  # lr = blr * effective batch / 256
    lr: float | None = _help("absolute lr; overrides blr")
    min_lr: float = 0.0
    warmup_epochs: float = 40.0
    warmup_steps: int | None = _help("overrides warmup_epochs")
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float | None = None
    # runtime
    mixed_precision: str = "no"  # no | fp16 | bf16
    compile: bool = False  # torch.compile the model (in place: checkpoint names do not change)
    channels_last: bool = False
    cudnn_benchmark: bool = True  # CUDA: autotune convolutions for the fixed input size
    seed: int = 0
    output_dir: str = "outputs/pretrain"
    save_every: int = 1000  # optimizer steps
    keep_last: int = 2
    resume: str | None = _help("auto (newest checkpoint in output_dir) or a checkpoint/run directory")
    log_every: int = 20
    report_to: str = "auto"  # auto (tensorboard if installed) | none | tensorboard | wandb | all
    recon_every: int | None = _help("steps between reconstruction images (default: save_every)")
    num_recon: int = 4
    init_from: str | None = _help("start from a full FCMAE's weights (fcmae.safetensors, run dir, hf-hub:...)")
    push_to_hub: str | None = _help("OWNER/NAME: export (timm + fcmae formats) and push at the end")
    hub_private: bool = False


# the no-argument run: a small model on the shipped photos, a few minutes on a laptop CPU
DEMO = dict(model="convnextv2_atto", input_size=128, batch_size=8, epochs=100, warmup_epochs=5, lr=1e-3,
            weight_decay=0.05, num_workers=2, save_every=100, log_every=10, num_recon=4,
            output_dir="outputs/demo")


def choose_preset(flags: dict, file_values: dict) -> dict:
    given = {**file_values, **flags}
    if given.get("data") or given.get("dataset_name"):
        return {}
    return DEMO


def main(argv: list[str] | None = None) -> None:
    from fcmae.training.config import parse_args
    from fcmae.tasks.pretrain import pretrain

    cfg = parse_args(PretrainConfig, argv, description=__doc__, choose_preset=choose_preset)
    pretrain(cfg)


if __name__ == "__main__":
    main()
