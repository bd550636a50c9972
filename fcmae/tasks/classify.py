"""The fine-tuning loop and evaluation. One process per device (Accelerate).

Exact resume, as in pretraining (fcmae.engine): data order and augmentation are functions of
(seed, epoch, index); Mixup/CutMix and drop path draw from the global RNGs, reseeded at every optimizer
step from (seed, step, rank); the lr is a function of the step; the EMA is part of the checkpoint.
A run resumed from a checkpoint repeats the uninterrupted run bit for bit on the same hardware.
Checkpoints are written at every epoch end (after evaluation) and every ``save_every`` steps.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ..data import sources as fdata
from ..data import labelled as ftdata
from ..training.config import save_yaml
from .pretrain import _trackers, log_fmt, step_seed
from .classify_model import build_model, classifier_metadata
from ..training.layer_decay import param_groups_layer_decay
from ..training.optim import backward_micro_batch, lr_at, optimizer_step, set_lr
from ..training.state import (complete_checkpoints, fault_point, restore, save_checkpoint, save_safetensors, trim_log,
                    write_atomic_text)


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, loader) -> dict:
    """Top-1 / top-5 accuracy (percent) over the validation loader, each sample counted once across
    processes (``gather_for_metrics`` drops the padding of the last batch). Unreadable images
    (``ok`` False) are left out and counted in ``val_bad``."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(4, dtype=torch.long, device=accelerator.device)  # top-1, top-5, images, bad
    for imgs, targets, ok in loader:
        with accelerator.autocast():
            logits = model(imgs)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit1, hit5 = top[:, 0].eq(targets), top.eq(targets[:, None]).any(dim=1)
        hit1, hit5, ok = accelerator.gather_for_metrics((hit1.long(), hit5.long(), ok.long()))
        counts += torch.stack([(hit1 * ok).sum(), (hit5 * ok).sum(), ok.sum(), (1 - ok).sum()])
    model.train(was_training)
    top1, top5, n, bad = counts.tolist()
    if n == 0:
        raise RuntimeError("No validation image could be read.")
    return dict(acc1=100.0 * top1 / n, acc5=100.0 * top5 / n, val_samples=n, val_bad=bad)


def _criterion(cfg, mixup_active: bool):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:  # smoothing is folded into Mixup's soft targets
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(cfg.smoothing) if cfg.smoothing > 0 else torch.nn.CrossEntropyLoss()


def _reseed(seed: int, step: int, rank: int) -> None:
    """Drop path (torch) and Mixup/CutMix (numpy) for this optimizer step."""
    s = step_seed(seed, step, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2 ** 32)
    random.seed(s)


def finetune(cfg) -> Path:
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=_trackers(cfg.report_to),
                              project_dir=str(out))
    say, rank, world, dev = accelerator.print, accelerator.process_index, accelerator.num_processes, accelerator.device
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and dev.type == "cuda"
    train_hf, train_labels, val_hf, val_labels, names = ftdata.load_labelled(cfg)
    set_seed(cfg.seed)  # identical initial weights on every rank
    raw, report = build_model(cfg, len(names))
    if report is not None:
        say(log_fmt.format(f"encoder from {cfg.from_fcmae}: {report}"))
    raw = raw.to(dev, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    pin = dev.type == "cuda"
    train_loader = ftdata.build_train_loader(cfg, train_hf, train_labels, world, pin)
    val_loader = ftdata.build_val_loader(cfg, val_hf, val_labels, pin)
    groups = param_groups_layer_decay(raw, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2))
    ema = None
    if cfg.model_ema:  # a copy of the eager model, on the device
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(raw, decay=cfg.model_ema_decay)
        accelerator.register_for_checkpointing(ema)
    if cfg.compile:
        raw.compile()  # in place: parameter names stay as they are
    model, optimizer, train_loader, val_loader = accelerator.prepare(raw, optimizer, train_loader, val_loader)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=len(names))
    criterion = _criterion(cfg, mixup is not None)

    per_epoch = len(train_loader) // cfg.grad_accum * cfg.grad_accum  # micro-batches per epoch
    steps_per_epoch = per_epoch // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"One epoch gives {len(train_loader)} batches per process, fewer than --grad-accum "
                         f"{cfg.grad_accum}: use a smaller batch size or accumulation.")
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    eff_batch = cfg.batch_size * cfg.grad_accum * world
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    mode = "linear probe" if cfg.linear_probe else "fine-tune"
    say(log_fmt.format(f"{mode} {raw.name} on {cfg.data or cfg.dataset_name} ({len(names)} classes, "
                       f"{len(train_hf)} train / {len(val_hf)} val images) | {world} process(es) on {dev} | "
                       f"effective batch {eff_batch} | lr {lr:.3g}"
                       + ("" if cfg.lr is not None else f" = blr {cfg.blr:g} x {eff_batch} / 256")
                       + f" | layer decay {cfg.layer_decay:g} ({cfg.layer_decay_type}) | {total} steps "
                       f"({steps_per_epoch}/epoch), warmup {warmup}"))
    resolved = {**asdict(cfg), "model": raw.name, "num_classes": len(names), "world_size": world,
                "effective_batch_size": eff_batch, "abs_lr": lr, "steps_per_epoch": steps_per_epoch,
                "total_steps": total, "warmup_steps_resolved": warmup}

    pos = dict(step=0, epoch=0, batch=0, loss_sum=0.0, best_acc1=-1.0, best_epoch=-1, best_ema_acc1=-1.0,
               best_ema_epoch=-1, num_bad=0, num_seen=0)
    ckpt = restore(accelerator, cfg.resume, out, pos, say)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(resolved, out / "config.yaml")
        write_atomic_text(out / "labels.txt", "".join(f"{n}\n" for n in names))
        # a fresh run starts a fresh log; a resumed one drops the rows of the epochs it repeats
        trim_log(out / "log.jsonl", lambda row: ckpt is not None and row["epoch"] < pos["epoch"])
    accelerator.init_trackers("fcmae-finetune", config={k: v for k, v in resolved.items()
                                                       if isinstance(v, (int, float, str, bool))})

    def export(module, name: str, **extra) -> None:
        state = accelerator.get_state_dict(module) if module is model else module.state_dict()
        if accelerator.is_main_process:
            save_safetensors(state, out / name, classifier_metadata(raw.name, names, cfg, **extra))

    step, epoch, batch = pos["step"], pos["epoch"], pos["batch"]
    loss_sum = torch.tensor(pos["loss_sum"] if accelerator.is_main_process else 0.0, device=dev)
    bad_sum, seen_sum = torch.zeros((), device=dev), torch.zeros((), device=dev)

    def position(**kw) -> dict:
        return {**pos, "step": step, "epoch": epoch, "batch": batch, **kw}

    def check_health() -> None:
        nonlocal bad_sum, seen_sum
        stats = accelerator.reduce(torch.stack([bad_sum, seen_sum, loss_sum]), "sum")
        if not torch.isfinite(stats[2]):
            good = complete_checkpoints(out / "checkpoints")
            raise FloatingPointError(f"Non-finite loss in epoch {epoch}. The run stopped; the last good checkpoint is "
                                     f"{good[-1] if good else 'none'}. Lower the lr, or add --clip-grad.")
        pos["num_bad"], pos["num_seen"] = pos["num_bad"] + int(stats[0]), pos["num_seen"] + int(stats[1])
        bad_sum, seen_sum = torch.zeros_like(bad_sum), torch.zeros_like(seen_sum)
        fdata.check_bad_fraction(pos["num_bad"], pos["num_seen"], cfg.max_bad_fraction)

    bar = tqdm(total=total, initial=step, disable=not accelerator.is_local_main_process, desc=mode, dynamic_ncols=True)
    while epoch < cfg.epochs:
        train_loader.set_epoch(epoch)
        model.train()
        if cfg.linear_probe:  # a frozen encoder runs as at inference (no drop path)
            raw.stem.eval()
            raw.stages.eval()
        for imgs, targets, ok in accelerator.skip_first_batches(train_loader, batch) if batch else train_loader:
            if batch % cfg.grad_accum == 0:  # first micro-batch of an optimizer step
                _reseed(cfg.seed, step, rank)
                set_lr(optimizer, lr_at(step, total, warmup, lr, cfg.min_lr))
            if mixup is not None:
                imgs, targets = mixup(imgs, targets)
            if cfg.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            batch += 1
            last_micro = batch % cfg.grad_accum == 0
            loss = backward_micro_batch(accelerator, model, lambda: criterion(model(imgs), targets), cfg.grad_accum,
                                        last_micro)
            loss_sum += loss
            bad_sum += (~ok).sum()
            seen_sum += ok.numel()
            if not last_micro:
                continue
            optimizer_step(accelerator, model, optimizer, cfg.clip_grad)
            if ema is not None:
                ema.update(raw)
            step += 1
            fault_point("step", step)
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}", lr=f"{max(g['lr'] for g in optimizer.param_groups):.2e}")
            if batch >= per_epoch:
                break
            if cfg.save_every and step % cfg.save_every == 0:
                check_health()  # never checkpoint weights that saw a non-finite loss
                save_checkpoint(accelerator, out / "checkpoints",
                                position(loss_sum=float(accelerator.reduce(loss_sum, "sum"))), cfg.keep_last)
        check_health()
        row = dict(epoch=epoch, step=step, train_loss=float(accelerator.reduce(loss_sum, "sum")) / (per_epoch * world),
                   lr=max(g["lr"] for g in optimizer.param_groups), **evaluate(accelerator, model, val_loader))
        if row["acc1"] > pos["best_acc1"]:
            pos["best_acc1"], pos["best_epoch"] = row["acc1"], epoch
            export(model, "best.safetensors", epoch=epoch, acc1=row["acc1"], acc5=row["acc5"])
        if ema is not None:
            ema_stats = evaluate(accelerator, ema.module, val_loader)
            row.update(ema_acc1=ema_stats["acc1"], ema_acc5=ema_stats["acc5"])
            if row["ema_acc1"] > pos["best_ema_acc1"]:
                pos["best_ema_acc1"], pos["best_ema_epoch"] = row["ema_acc1"], epoch
                export(ema.module, "best_ema.safetensors", epoch=epoch, acc1=row["ema_acc1"], acc5=row["ema_acc5"],
                       ema=True)
        row.update(best_acc1=pos["best_acc1"], **({"best_ema_acc1": pos["best_ema_acc1"]} if ema else {}))
        if accelerator.is_main_process:
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        say(log_fmt.format(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())))
        epoch, batch = epoch + 1, 0
        loss_sum = torch.zeros_like(loss_sum)
        save_checkpoint(accelerator, out / "checkpoints", position(loss_sum=0.0), cfg.keep_last)
    bar.close()
    export(model, "last.safetensors", epoch=epoch - 1)
    same = _ranks_identical(accelerator, raw)
    if accelerator.is_main_process:
        save_yaml({"epochs": epoch, "step": step, "world_size": world, "ranks_identical": same,
                   "best_acc1": pos["best_acc1"], "best_epoch": pos["best_epoch"],
                   **({"best_ema_acc1": pos["best_ema_acc1"], "best_ema_epoch": pos["best_ema_epoch"]} if ema else {}),
                   "num_bad": pos["num_bad"], "num_seen": pos["num_seen"]}, out / "final.yaml")
        if same is False:
            raise RuntimeError("Parameters differ across processes at the end of training: distributed sync is broken.")
    say(log_fmt.format(f"done: best acc1 {pos['best_acc1']:.2f} (epoch {pos['best_epoch']}). Outputs in {out}"))
    if cfg.push_to_hub and accelerator.is_main_process:
        from ..weights.hub import export_and_push

        url = export_and_push(out / "best.safetensors", cfg.push_to_hub, formats=("timm", "transformers"),
                              private=cfg.hub_private, datasets=[cfg.dataset_name] if cfg.dataset_name else ())
        say(log_fmt.format(f"pushed to {url}"))
    # Teardown: drop references before end_training (avoids a gloo abort at exit, REFERENCE.md sec. 6)
    del model, optimizer, train_loader, val_loader, ema, raw
    accelerator.free_memory()
    accelerator.end_training()
    return out


def _ranks_identical(accelerator: Accelerator, module: torch.nn.Module) -> bool | None:
    """Replicated training (DDP): every rank must hold the same weights; compare fingerprints."""
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        return None
    fingerprint = torch.stack([p.detach().double().sum() for p in module.parameters()]).to(accelerator.device)
    prints = accelerator.gather(fingerprint[None]).cpu()
    return bool((prints == prints[0]).all())


def evaluate_checkpoint(cfg) -> dict:
    """``--eval-only``: top-1/top-5 of ``cfg.checkpoint`` on the validation split; prints a JSON line."""
    from .predict import load_classifier

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    _, _, val_hf, val_labels, names = ftdata.load_labelled(cfg, with_train=False)
    model, meta, saved_names = load_classifier(cfg.checkpoint, cfg.model)
    if model.num_classes != len(names):
        raise ValueError(f"--checkpoint {cfg.checkpoint} classifies {model.num_classes} classes; the data has "
                         f"{len(names)}.")
    if "class_names" in meta and saved_names != names:
        raise ValueError(f"--checkpoint {cfg.checkpoint} was trained with classes {saved_names[:5]}..., the data's are "
                         f"{names[:5]}...: labels would not match.")
    if "input_size" in meta and int(meta["input_size"]) != cfg.input_size:
        accelerator.print(log_fmt.format(f"note: the checkpoint was fine-tuned at {meta['input_size']} px, "
                                         f"evaluating at --input-size {cfg.input_size}"))
    model, loader = accelerator.prepare(model, ftdata.build_val_loader(cfg, val_hf, val_labels))
    stats = evaluate(accelerator, model, loader)
    accelerator.print(log_fmt.format(f"eval {cfg.checkpoint} ({model_name(model)}, {cfg.input_size} px): "
                                     f"acc1 {stats['acc1']:.3f} acc5 {stats['acc5']:.3f} on {stats['val_samples']} "
                                     "images"))
    accelerator.print(json.dumps({"checkpoint": str(cfg.checkpoint), **stats}))
    del model, loader
    accelerator.free_memory()
    accelerator.end_training()
    return stats


def model_name(model) -> str:
    return getattr(model, "name", None) or getattr(getattr(model, "module", None), "name", "") or type(model).__name__
