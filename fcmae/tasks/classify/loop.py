"""Image classification fine-tuning and linear probing (``fcmae finetune``): the loop over the
training core. One process per device (Accelerate).

Drop path draws from each sample's key (``Run.keys``) and Mixup/CutMix from the RNGs reseeded at
every optimizer step, and the EMA is part of the checkpoint, so a resumed run repeats the
uninterrupted one bit for bit.
Checkpoints are written at every epoch end (after evaluation) and every ``save_every`` steps.
"""

from __future__ import annotations

from pathlib import Path

import torch
from timm.utils import ModelEmaV3

from ... import data
from ...models.convnext import Block
from ...training.optim import adamw
from ...training.run import Position, evaluate_only, launch
from ...weights.files import write_atomic_text
from .artifact import classifier_metadata, load_classifier
from .config import FinetuneConfig
from .evaluation import evaluate
from .model import build_classifier, criterion, lr_scale, mixup_fn


def finetune(cfg: FinetuneConfig) -> Path:
    return launch(cfg, "fcmae-finetune", lambda run: train(run, cfg), wrap=(Block,))


def model_ema(run, model):
    """timm's EMA of the eager model, saved with every checkpoint."""
    if not run.cfg.model_ema:
        return None
    if run.accelerator.is_fsdp2:
        raise ValueError(
            "--model-ema is not supported with FSDP: timm's EMA keeps an unsharded copy of the model and "
            "updates it from the parameters, which FSDP shards. Drop --model-ema, or launch without "
            "--use_fsdp."
        )
    ema = ModelEmaV3(model, decay=run.cfg.model_ema_decay)
    run.accelerator.register_for_checkpointing(ema)
    return ema


def train(run, cfg: FinetuneConfig) -> None:
    train_hf, train_labels, val_hf, val_labels, names = data.load_labelled(cfg.dataset)
    raw, report = build_classifier(cfg, len(names))
    cfg.model = raw.name
    run.say(
        f"{'linear probe' if cfg.linear_probe else 'fine-tune'} {raw.name} on {cfg.data or cfg.dataset_name} "
        f"({len(names)} classes, {len(train_hf)} train / {len(val_hf)} val images)"
        + (f" | encoder from {cfg.from_fcmae}: {report}" if report else "")
    )
    raw = raw.to(run.device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    pin = run.device.type == "cuda"
    aug = (cfg.aa, cfg.reprob, cfg.color_jitter)
    train_loader = data.build_train_loader(
        cfg.dataset, train_hf, train_labels, cfg.batch_size, cfg.seed, *aug, run.world, pin, with_index=True
    )
    val_batch = cfg.eval_batch_size or cfg.batch_size
    val_loader = data.build_val_loader(cfg.dataset, val_hf, val_labels, val_batch, cfg.crop_pct, pin)
    optimizer = adamw(raw, cfg, lr_scale(raw, cfg.layer_decay, cfg.layer_decay_type))
    ema = model_ema(run, raw)  # a copy of the eager model, before compiling
    model, _, train_loader, val_loader = run.prepare(raw, optimizer, train_loader, val_loader)
    mixup, sched = mixup_fn(cfg, len(names)), run.schedule(len(train_loader))
    loss_fn = criterion(cfg, mixup is not None)
    best = dict(best_acc1=-1.0, best_epoch=-1, **(dict(best_ema_acc1=-1.0, best_ema_epoch=-1) if ema else {}))
    pos = run.begin(Position(best=best), num_classes=len(names))
    if run.is_main:
        write_atomic_text(run.out / "labels.txt", "".join(f"{n}\n" for n in names))
    while run.training:
        model.train()
        if cfg.linear_probe:  # a frozen encoder runs as at inference (no drop path)
            raw.stem.eval()
            raw.stages.eval()
        for (imgs, targets, ok, index), last_micro in run.batches(train_loader):
            keys = run.keys(index)  # each sample's drop path (fcmae.training.run.Run.keys)
            if mixup is not None:
                imgs, targets = mixup(imgs, targets)
            if cfg.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            run.backward(lambda: loss_fn(model(imgs, keys), targets), last_micro, ok)
            if not last_micro:
                continue
            run.step(log=False)  # a row per epoch, below
            if ema is not None:
                ema.update(raw)
            if pos.batch:  # mid-epoch; an epoch's end is checkpointed below, after its evaluation
                run.checkpoint_if_due(at_end=False)
        end_of_epoch(run, cfg, model, ema, val_loader, names, sched)
    run.save_weights("last.safetensors", classifier_metadata(cfg, names, epoch=pos.epoch - 1))
    run.finish(raw)
    run.say(f"done: best acc1 {pos.best['best_acc1']:.2f} (epoch {pos.best['best_epoch']}). Outputs in {run.out}")
    run.push(run.out / "best.safetensors", formats=("timm", "transformers"))


def end_of_epoch(run, cfg, model, ema, val_loader, names, sched) -> None:
    """Evaluate the model (and its EMA); log the epoch's row; save best weights; checkpoint."""
    pos = run.pos
    run.health.check(pos)
    epoch = pos.epoch - 1 if pos.batch == 0 else pos.epoch
    row = dict(
        epoch=epoch,
        step=pos.step,
        train_loss=run.health.take_loss(pos, sched.per_epoch)[0],
        lr=run.lr,
        **evaluate(run.accelerator, model, val_loader),
    )
    if row["acc1"] > pos.best["best_acc1"]:
        pos.best.update(best_acc1=row["acc1"], best_epoch=epoch)
        run.save_weights(
            "best.safetensors", classifier_metadata(cfg, names, epoch=epoch, acc1=row["acc1"], acc5=row["acc5"])
        )
    if ema is not None:
        stats = evaluate(run.accelerator, ema.module, val_loader)
        row.update(ema_acc1=stats["acc1"], ema_acc5=stats["acc5"])
        if row["ema_acc1"] > pos.best["best_ema_acc1"]:
            pos.best.update(best_ema_acc1=row["ema_acc1"], best_ema_epoch=epoch)
            run.save_weights(
                "best_ema.safetensors",
                classifier_metadata(cfg, names, epoch=epoch, acc1=stats["acc1"], acc5=stats["acc5"], ema=True),
                model=ema.module,
            )
    run.log({**row, **pos.best})
    run.say(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    run.save_checkpoint()


def evaluate_checkpoint(cfg) -> dict:
    """``--eval-only``: top-1/top-5 of ``cfg.checkpoint`` on the validation split; prints a JSON line."""

    def run(accelerator) -> dict:
        _, _, val_hf, val_labels, names = data.load_labelled(cfg.dataset, with_train=False)
        model, meta, saved_names = load_classifier(cfg.checkpoint, cfg.model)
        if model.num_classes != len(names):
            raise ValueError(
                f"--checkpoint {cfg.checkpoint} classifies {model.num_classes} classes; the data has {len(names)}."
            )
        if "class_names" in meta and saved_names != names:
            raise ValueError(
                f"--checkpoint {cfg.checkpoint} was trained with classes {saved_names[:5]}..., the data's "
                f"are {names[:5]}...: labels would not match."
            )
        if "input_size" in meta and int(meta["input_size"]) != cfg.input_size:
            accelerator.print(
                f"[fcmae] note: the checkpoint was fine-tuned at {meta['input_size']} px, evaluating at "
                f"--input-size {cfg.input_size}"
            )
        name, loader = (
            model.name,
            data.build_val_loader(cfg.dataset, val_hf, val_labels, cfg.eval_batch_size or cfg.batch_size, cfg.crop_pct),
        )
        model, loader = accelerator.prepare(model, loader)
        stats = evaluate(accelerator, model, loader)
        accelerator.print(
            f"[fcmae] eval {cfg.checkpoint} ({name}, {cfg.input_size} px): acc1 {stats['acc1']:.3f} "
            f"acc5 {stats['acc5']:.3f} on {stats['val_samples']} images"
        )
        return stats

    return evaluate_only(cfg, run)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from ...training.config import cli
    from .config import choose_preset

    cli(
        FinetuneConfig,
        lambda cfg: evaluate_checkpoint(cfg) if cfg.eval_only else finetune(cfg),
        argv,
        description=USAGE,
        choose_preset=choose_preset,
        prog=prog,
    )


USAGE = """Fine-tune (or linear-probe, or evaluate) a ConvNeXt classifier, typically from an FCMAE encoder.

Usage:
    fcmae finetune --config configs/finetune/convnextv2_atto_224.yaml --from-fcmae outputs/pretrain \\
        --data /path/to/imagenet
    accelerate launch -m fcmae finetune --config configs/finetune/convnextv2_base_224.yaml \\
        --from-fcmae convnextv2_base_1k_224_fcmae.pt --data /path/to/imagenet --output-dir outputs/ft_base
    fcmae finetune --linear-probe --from-fcmae outputs/pretrain --data /path/to/images
    fcmae finetune --eval-only --checkpoint outputs/finetune/best.safetensors --data /path/to/images
    fcmae finetune --help                      # every field; any of them is a flag

--data: a folder with train/ and val/ (or validation/) class sub-folders, split parquet files, or a
folder packed by `fcmae data pack`; --dataset-name OWNER/NAME: a Hub dataset with a label column.
--from-fcmae: a pretraining output directory (its encoder.safetensors), encoder.safetensors,
fcmae.safetensors, a checkpoint directory, the official MinkowskiEngine training checkpoint or
released *_fcmae.pt, a timm or transformers export, or hf-hub:owner/name.
lr = blr x effective batch / 256 unless --lr is given. The per-size recipes: configs/finetune/.

Precedence: defaults < the recipe < linear-probe preset (with --linear-probe) < --config YAML < flags.
Outputs in --output-dir: config.yaml, labels.txt, log.jsonl (per epoch: train_loss, lr, acc1, acc5,
ema_acc1, ema_acc5), best.safetensors, best_ema.safetensors (with --model-ema), last.safetensors,
checkpoints/step_N (resume with --resume auto), final.yaml.
"""
