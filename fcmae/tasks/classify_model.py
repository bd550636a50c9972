"""Fine-tuning: the configuration, and the model built from a pretrained encoder (``--from-fcmae``).

The loop itself is in ``fcmae.finetune_engine``, the labelled data in ``fcmae.finetune_data``, the
layer-wise lr decay in ``fcmae.layer_decay``; ``finetune/run.py`` is the entry script.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..weights.convert import LoadReport, convert_state_dict, describe_architecture, load_checkpoint, read_state_dict
from ..models import create_model, list_models
from ..training.state import complete_checkpoints


def _help(text: str, default=None):
    return field(default=default, metadata={"help": text})


@dataclass
class FinetuneConfig:
    # model
    model: str | None = _help("registered model name (default: the one --from-fcmae holds)")
    from_fcmae: str | None = _help("pretrained encoder: a pretraining run dir, encoder/fcmae.safetensors, a "
                                   "checkpoint dir, an official/timm/transformers checkpoint, hf-hub:owner/name")
    input_size: int = 224
    drop_path: float = 0.0
    head_init_scale: float = 0.001  # ConvNeXt V2 fine-tuning scales the fresh head's init (timm: 1.0)
    linear_probe: bool = _help("frozen encoder, trained head (final norm + classifier)", False)
    # data
    data: str | None = _help("folder with train/ and val/ class folders (or split parquet files)")
    dataset_name: str | None = _help("Hub dataset id with a label column")
    dataset_config_name: str | None = None
    train_split: str = "train"
    val_split: str = "validation"  # a local val/ folder is the 'validation' split ('val' works too)
    image_column: str | None = _help("default: the first Image column, else 'image'/'img'")
    label_column: str | None = _help("default: the first ClassLabel column, else 'label'/'labels'/'target'")
    max_bad_fraction: float = 0.01
    num_workers: int = 4
    # augmentation (timm; official recipe, REFERENCE.md section 4)
    aa: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment; none to switch off
    color_jitter: float | None = 0.4  # used only without --aa (timm turns it off under RandAugment)
    reprob: float = 0.25  # RandomErasing probability, pixel mode
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    crop_pct: float | None = _help("evaluation crop (default: 0.875 below 384 px, none from 384)")
    # optimisation
    batch_size: int = 64  # per device
    grad_accum: int = 1
    eval_batch_size: int | None = None
    epochs: int = 100
    warmup_epochs: float = 5.0
    warmup_steps: int | None = _help("overrides warmup_epochs")
    blr: float = 5e-4  # lr = blr * effective batch / 256
    lr: float | None = _help("absolute lr; overrides blr")
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 1.0
    layer_decay_type: str = "single"  # single | group (REFERENCE.md section 4)
    beta1: float = 0.9
    beta2: float = 0.999
    clip_grad: float | None = None
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    # runtime
    mixed_precision: str = "no"  # no | fp16 | bf16
    compile: bool = False  # torch.compile the model (in place: checkpoint names do not change)
    channels_last: bool = False
    cudnn_benchmark: bool = True  # CUDA: autotune convolutions for the fixed input size
    seed: int = 0
    output_dir: str = "outputs/finetune"
    save_every: int | None = _help("also checkpoint every N optimizer steps (always at each epoch end)")
    keep_last: int = 2
    resume: str | None = _help("auto (newest checkpoint in output_dir) or a checkpoint/run directory")
    eval_only: bool = _help("evaluate --checkpoint on the validation split and exit", False)
    checkpoint: str | None = _help("classifier weights for --eval-only (e.g. best.safetensors)")
    log_every: int = 20
    report_to: str = "auto"  # auto (tensorboard if installed) | none | tensorboard | wandb | all
    push_to_hub: str | None = _help("OWNER/NAME: export best.safetensors (timm + transformers) and push at the end")
    hub_private: bool = False


# Linear probing (a quick read-out of pretraining): no augmentation beyond crop and flip, no
# regularisation; MAE's 90-epoch schedule. AdamW replaces MAE's LARS (one linear layer: any works).
LINEAR_PROBE = dict(aa=None, color_jitter=None, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, drop_path=0.0,
                    layer_decay=1.0, weight_decay=0.0, blr=1e-3, epochs=90, warmup_epochs=10.0)


def choose_preset(flags: dict, file_values: dict) -> dict:
    return LINEAR_PROBE if {**file_values, **flags}.get("linear_probe") else {}


def validate(cfg: FinetuneConfig) -> None:
    if cfg.push_to_hub:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(cfg.push_to_hub)  # a typo fails now, not after training
    if cfg.input_size % 32 or cfg.input_size <= 0:
        raise ValueError(f"--input-size must be a positive multiple of 32 (the encoder's stride); got "
                         f"{cfg.input_size}. Try {max(32, round(cfg.input_size / 32) * 32)}.")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed-precision must be no, fp16 or bf16; got {cfg.mixed_precision!r}.")
    if cfg.layer_decay_type not in ("single", "group"):
        raise ValueError(f"--layer-decay-type must be single or group; got {cfg.layer_decay_type!r}.")
    for name in ("batch_size", "grad_accum", "keep_last", "log_every", "epochs"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(cfg, name)}.")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ValueError(f"Mixup/CutMix pair each image with another in the batch: --batch-size must be even; got "
                         f"{cfg.batch_size}.")
    if cfg.eval_only and not cfg.checkpoint:
        raise ValueError("--eval-only needs --checkpoint (e.g. OUTPUT_DIR/best.safetensors).")
    if cfg.checkpoint and not cfg.eval_only:
        raise ValueError("--checkpoint is for --eval-only; to start from pretrained weights use --from-fcmae, to "
                         "continue a run use --resume.")


# ----------------------------------------------------------------------------- the pretrained encoder

def resolve_source(source: str) -> str:
    """A pretraining run directory means its ``encoder.safetensors`` (or, before the first export,
    its newest checkpoint); anything else is passed to ``load_checkpoint`` as it is."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "encoder.safetensors").is_file():
            return str(path / "encoder.safetensors")
        found = complete_checkpoints(path / "checkpoints")
        if found and not (path / "model.safetensors").is_file():
            return str(found[-1])
    return source


def safetensors_metadata(path: str) -> dict[str, str]:
    if not str(path).endswith(".safetensors") or not Path(path).is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def infer_model_name(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], what: str) -> str:
    """The registered model a checkpoint holds: its metadata's ``model``, else its shapes."""
    if metadata.get("model") in list_models():
        return metadata["model"]
    arch = describe_architecture(convert_state_dict(state_dict)[1])
    if arch not in list_models():
        raise ValueError(f"{what} holds {arch}, which is no registered model: pass --model (one of "
                         f"{', '.join(list_models('convnextv2_*'))}, ...).")
    return arch


def init_from_fcmae(model: torch.nn.Module, source, what: str = "--from-fcmae") -> LoadReport:
    """Load a pretrained encoder into ``model`` strictly. The head and the final norm stay as the
    model created them (fresh; a source's own are discarded). Another architecture raises
    ``ValueError`` naming both."""
    fresh_head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("head.")}
    try:
        report = load_checkpoint(model, source, drop_head=True)
    except ValueError as e:
        raise ValueError(f"{what}: {e}\nPass the --model the checkpoint was trained as, or leave --model out to "
                         "take the checkpoint's.") from None
    model.load_state_dict(fresh_head, strict=False)
    kept = [k for k in fresh_head if k not in report.missing]
    report.ignored += [k for k in kept if k.startswith("head.norm.")]  # the source's final norm: not used
    report.missing = sorted(fresh_head)
    return report


def build_model(cfg: FinetuneConfig, num_classes: int) -> tuple[torch.nn.Module, LoadReport | None]:
    """The classifier to fine-tune: ``cfg.model`` (or the source's), encoder from ``cfg.from_fcmae``."""
    state, name = None, cfg.model
    if cfg.from_fcmae:
        path = resolve_source(cfg.from_fcmae)
        try:
            state = read_state_dict(path)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise type(e)(f"--from-fcmae {cfg.from_fcmae}: {e}") from None
        name = name or infer_model_name(state, safetensors_metadata(path), f"--from-fcmae {cfg.from_fcmae}")
    if name is None:
        raise ValueError("Name the model: --model NAME (e.g. convnextv2_atto), or give --from-fcmae to take its model.")
    model = create_model(name, num_classes=num_classes, drop_path_rate=cfg.drop_path,
                         head_init_scale=cfg.head_init_scale)
    report = init_from_fcmae(model, state, f"--from-fcmae {cfg.from_fcmae}") if state is not None else None
    if cfg.linear_probe:
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("head."))
    return model, report


# ----------------------------------------------------------------------------- outputs

def classifier_metadata(model_name: str, class_names: list[str], cfg: FinetuneConfig, **extra) -> dict[str, str]:
    """safetensors metadata of a fine-tuned classifier: what ``fcmae.predict`` needs to use it."""
    meta = {"format": "fcmae-classifier", "model": model_name, "num_classes": str(len(class_names)),
            "class_names": json.dumps(class_names), "input_size": str(cfg.input_size)}
    if cfg.crop_pct is not None:
        meta["crop_pct"] = str(cfg.crop_pct)
    return {**meta, **{k: str(v) for k, v in extra.items()}}


def main(argv: list[str] | None = None, description: str = "") -> None:
    from ..training.config import parse_args
    from .classify import evaluate_checkpoint, finetune

    cfg = parse_args(FinetuneConfig, argv, description=description or __doc__, choose_preset=choose_preset)
    validate(cfg)
    evaluate_checkpoint(cfg) if cfg.eval_only else finetune(cfg)


if __name__ == "__main__":  # python -m fcmae.finetune: the same as finetune/run.py
    main()
