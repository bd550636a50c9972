"""Image classification fine-tuning (and linear probing) from a pretrained encoder: the config,
the loop and ``--eval-only``. One process per device (Accelerate).

As in pretraining, Mixup/CutMix and drop path draw from the RNGs reseeded at every optimizer step,
and the EMA is part of the checkpoint, so a resumed run repeats the uninterrupted one bit for bit.
Checkpoints are written at every epoch end (after evaluation) and every ``save_every`` steps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from timm.utils import ModelEmaV3

from .. import data
from ..models.convnext import Block
from ..training.config import RunConfig, cli, help_field
from ..training.layer_decay import param_groups_layer_decay
from ..training.optim import backward_micro_batch
from ..training.run import Health, Position, micro_batches, start
from ..training.state import save_checkpoint
from ..weights.files import save_safetensors, write_atomic_text
from .classifier import build_classifier, classifier_metadata, criterion, evaluate, load_classifier, mixup_fn


@dataclass
class FinetuneConfig(RunConfig):
    # model
    model: str | None = help_field("registered model name (default: the one --from-fcmae holds)")
    from_fcmae: str | None = help_field("pretrained encoder: a pretraining run dir, encoder/fcmae.safetensors, a "
                                        "checkpoint dir, an official/timm/transformers checkpoint, hf-hub:owner/name")
    head_init_scale: float = 0.001  # ConvNeXt V2 fine-tuning scales the fresh head's init (timm: 1.0)
    linear_probe: bool = help_field("frozen encoder, trained head (final norm + classifier)", False)
    # data
    data: str | None = help_field("folder with train/ and val/ class folders (or split parquet files)")
    dataset_name: str | None = help_field("Hub dataset id with a label column")
    train_split: str = "train"
    val_split: str = "validation"  # a local val/ folder is the 'validation' split ('val' works too)
    label_column: str | None = help_field("default: the first ClassLabel column, else 'label'/'labels'/'target'")
    # augmentation: timm's, with the official ConvNeXt V2 fine-tuning recipe's defaults
    aa: str | None = "rand-m9-mstd0.5-inc1"  # RandAugment; none to switch off
    color_jitter: float | None = 0.4  # used only without --aa (timm turns it off under RandAugment)
    reprob: float = 0.25  # RandomErasing probability, pixel mode
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    crop_pct: float | None = help_field("evaluation crop (default: 0.875 below 384 px, none from 384)")
    # optimisation
    eval_batch_size: int | None = None
    warmup_epochs: float = 5.0
    blr: float = 5e-4
    min_lr: float = 1e-6
    layer_decay: float = 1.0
    layer_decay_type: str = "single"  # single (atto..tiny) | group (base and larger), as the official code
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    # runtime
    output_dir: str = "outputs/finetune"
    save_every: int | None = help_field("also checkpoint every N optimizer steps (always at each epoch end)")
    eval_only: bool = help_field("evaluate --checkpoint on the validation split and exit", False)
    checkpoint: str | None = help_field("classifier weights for --eval-only (e.g. best.safetensors)")

    def check(self) -> None:
        if self.layer_decay_type not in ("single", "group"):
            raise ValueError(f"--layer-decay-type must be single or group; got {self.layer_decay_type!r}.")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"Mixup/CutMix pair each image with another in the batch: --batch-size must be even; "
                             f"got {self.batch_size}.")
        if self.eval_only and not self.checkpoint:
            raise ValueError("--eval-only needs --checkpoint (e.g. OUTPUT_DIR/best.safetensors).")
        if self.checkpoint and not self.eval_only:
            raise ValueError("--checkpoint is for --eval-only; to start from pretrained weights use --from-fcmae, to "
                             "continue a run use --resume.")


# Linear probing (a quick read-out of pretraining): no augmentation beyond crop and flip, no
# regularisation; MAE's 90-epoch schedule. AdamW replaces MAE's LARS (one linear layer: any works).
LINEAR_PROBE = dict(aa=None, color_jitter=None, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.0, drop_path=0.0,
                    layer_decay=1.0, weight_decay=0.0, blr=1e-3, epochs=90, warmup_epochs=10.0)


def choose_preset(flags: dict, file_values: dict) -> dict:
    return LINEAR_PROBE if {**file_values, **flags}.get("linear_probe") else {}


def model_ema(run, model):
    """timm's EMA of the eager model, saved with every checkpoint."""
    if not run.cfg.model_ema:
        return None
    if run.accelerator.is_fsdp2:
        raise ValueError("--model-ema is not supported with FSDP: timm's EMA keeps an unsharded copy of the model and "
                         "updates it from the parameters, which FSDP shards. Drop --model-ema, or launch without "
                         "--use_fsdp.")
    ema = ModelEmaV3(model, decay=run.cfg.model_ema_decay)
    run.accelerator.register_for_checkpointing(ema)
    return ema


def export(run, module, name: str, names: list[str], **extra) -> None:
    state = run.accelerator.get_state_dict(module)  # a collective under FSDP: every rank calls it
    if run.is_main:
        save_safetensors(state, run.out / name, classifier_metadata(run.cfg.model, names, run.cfg, **extra))


def finetune(cfg: FinetuneConfig) -> Path:
    run = start(cfg, "fcmae-finetune", wrap=(Block,))
    train_hf, train_labels, val_hf, val_labels, names = data.load_labelled(cfg)
    raw, report = build_classifier(cfg, len(names))
    cfg.model = raw.name
    run.say(f"{'linear probe' if cfg.linear_probe else 'fine-tune'} {raw.name} on {cfg.data or cfg.dataset_name} "
            f"({len(names)} classes, {len(train_hf)} train / {len(val_hf)} val images)"
            + (f" | encoder from {cfg.from_fcmae}: {report}" if report else ""))
    raw = raw.to(run.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    pin = run.device.type == "cuda"
    train_loader = data.build_train_loader(cfg, train_hf, train_labels, run.world, pin)
    val_loader = data.build_val_loader(cfg, val_hf, val_labels, pin)
    groups = param_groups_layer_decay(raw, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2))
    ema = model_ema(run, raw)  # a copy of the eager model, before compiling
    model, optimizer, train_loader, val_loader = run.prepare(raw, optimizer, train_loader, val_loader)
    mixup = mixup_fn(cfg, len(names))
    loss_fn = criterion(cfg, mixup is not None)
    sched = run.schedule(len(train_loader))
    pos = Position(best=dict(best_acc1=-1.0, best_epoch=-1, **(dict(best_ema_acc1=-1.0, best_ema_epoch=-1) if ema else {})))
    run.restore(pos)
    run.write_config(sched, pos, num_classes=len(names))
    if run.is_main:
        write_atomic_text(run.out / "labels.txt", "".join(f"{n}\n" for n in names))
    health = Health(run, pos)
    while pos.step < sched.total:
        model.train()
        if cfg.linear_probe:  # a frozen encoder runs as at inference (no drop path)
            raw.stem.eval()
            raw.stages.eval()
        for (imgs, targets, ok), last_micro in micro_batches(run, train_loader, pos, sched, optimizer):
            if mixup is not None:
                imgs, targets = mixup(imgs, targets)
            if cfg.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            loss = backward_micro_batch(run.accelerator, model, lambda: loss_fn(model(imgs), targets), cfg.grad_accum,
                                        last_micro)
            health.add(loss, ok, pos.step)
            if not last_micro:
                continue
            run.step(model, optimizer, pos, sched, health, log=False)  # a row per epoch, below
            if ema is not None:
                ema.update(raw)
            if pos.batch and cfg.save_every and pos.step % cfg.save_every == 0:  # an epoch's end: below
                health.check(pos)  # never checkpoint weights that saw a non-finite loss
                save_checkpoint(run.accelerator, run.out / "checkpoints", health.saved(pos), cfg.keep_last)
        health.check(pos)
        epoch = pos.epoch - 1 if pos.batch == 0 else pos.epoch
        row = dict(epoch=epoch, step=pos.step, train_loss=health.take_loss(pos, sched.per_epoch)[0],
                   lr=max(g["lr"] for g in optimizer.param_groups), **evaluate(run.accelerator, model, val_loader))
        if row["acc1"] > pos.best["best_acc1"]:
            pos.best.update(best_acc1=row["acc1"], best_epoch=epoch)
            export(run, model, "best.safetensors", names, epoch=epoch, acc1=row["acc1"], acc5=row["acc5"])
        if ema is not None:
            stats = evaluate(run.accelerator, ema.module, val_loader)
            row.update(ema_acc1=stats["acc1"], ema_acc5=stats["acc5"])
            if row["ema_acc1"] > pos.best["best_ema_acc1"]:
                pos.best.update(best_ema_acc1=row["ema_acc1"], best_ema_epoch=epoch)
                export(run, ema.module, "best_ema.safetensors", names, epoch=epoch, acc1=stats["acc1"],
                       acc5=stats["acc5"], ema=True)
        run.log({**row, **pos.best})
        run.say(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        save_checkpoint(run.accelerator, run.out / "checkpoints", health.saved(pos), cfg.keep_last)
    export(run, model, "last.safetensors", names, epoch=pos.epoch - 1)
    run.finish(pos, raw)
    run.say(f"done: best acc1 {pos.best['best_acc1']:.2f} (epoch {pos.best['best_epoch']}). Outputs in {run.out}")
    run.push(run.out / "best.safetensors", formats=("timm", "transformers"))
    del model, optimizer, train_loader, val_loader, ema, raw
    run.close()
    return run.out


def evaluate_checkpoint(cfg: FinetuneConfig) -> dict:
    """``--eval-only``: top-1/top-5 of ``cfg.checkpoint`` on the validation split; prints a JSON line."""
    cfg.validate()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    _, _, val_hf, val_labels, names = data.load_labelled(cfg, with_train=False)
    model, meta, saved_names = load_classifier(cfg.checkpoint, cfg.model)
    if model.num_classes != len(names):
        raise ValueError(f"--checkpoint {cfg.checkpoint} classifies {model.num_classes} classes; the data has "
                         f"{len(names)}.")
    if "class_names" in meta and saved_names != names:
        raise ValueError(f"--checkpoint {cfg.checkpoint} was trained with classes {saved_names[:5]}..., the data's are "
                         f"{names[:5]}...: labels would not match.")
    if "input_size" in meta and int(meta["input_size"]) != cfg.input_size:
        accelerator.print(f"[fcmae] note: the checkpoint was fine-tuned at {meta['input_size']} px, evaluating at "
                          f"--input-size {cfg.input_size}")
    name = model.name
    model, loader = accelerator.prepare(model, data.build_val_loader(cfg, val_hf, val_labels))
    stats = evaluate(accelerator, model, loader)
    accelerator.print(f"[fcmae] eval {cfg.checkpoint} ({name}, {cfg.input_size} px): acc1 {stats['acc1']:.3f} "
                      f"acc5 {stats['acc5']:.3f} on {stats['val_samples']} images")
    accelerator.print(json.dumps({"checkpoint": str(cfg.checkpoint), **stats}))
    del model, loader
    accelerator.free_memory()
    accelerator.end_training()
    return stats


def main(argv: list[str] | None = None, description: str = "") -> None:
    cli(FinetuneConfig, lambda cfg: evaluate_checkpoint(cfg) if cfg.eval_only else finetune(cfg), argv,
        description=description or __doc__, choose_preset=choose_preset)
