"""The pretraining loop: build, resume, train, checkpoint, export. One process per device (Accelerate).

Exact resume: data order and augmentation are pure functions of (seed, epoch, index) (fcmae.data),
masks and drop path draw from the global RNG reseeded at every optimizer step from (seed, step,
rank), and the LR is a function of the step; so a run resumed from a checkpoint at step S repeats
the uninterrupted run's steps S+1... bit for bit on the same hardware.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ..data import sources as fdata
from ..training.config import save_yaml
from ..models import create_fcmae
from ..training.optim import backward_micro_batch, lr_at, optimizer_step, param_groups, set_lr
from ..sparse import gen_random_mask
from ..training.state import complete_checkpoints, fault_point, restore, save_checkpoint, save_safetensors, trim_log

log_fmt = "[fcmae] {}"


def _trackers(report_to: str | None):
    if not report_to or report_to == "none":
        return None
    if report_to == "auto":
        import importlib.util

        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else None
    return "all" if report_to == "all" else report_to.split(",")


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 9_973 + rank) % (2 ** 63)


def _data_config(cfg) -> fdata.DataConfig:
    return fdata.DataConfig(data=cfg.data, dataset_name=cfg.dataset_name, dataset_config_name=cfg.dataset_config_name,
                            split=cfg.split, image_column=cfg.image_column, streaming=cfg.streaming,
                            input_size=cfg.input_size, max_bad_fraction=cfg.max_bad_fraction,
                            num_examples=cfg.num_examples)


def _validate(cfg) -> None:
    if cfg.push_to_hub:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(cfg.push_to_hub)  # a typo fails now, not after training
    if cfg.input_size % 32:
        raise ValueError(f"--input-size must be a multiple of 32 (the encoder's stride); got {cfg.input_size}. "
                         f"Try {max(32, round(cfg.input_size / 32) * 32)}.")
    if cfg.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"--mixed-precision must be no, fp16 or bf16; got {cfg.mixed_precision!r}.")
    for name in ("batch_size", "grad_accum", "save_every", "log_every", "keep_last"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1; got {getattr(cfg, name)}.")


def _recon_batch(cfg, dcfg, n: int) -> torch.Tensor:
    """A fixed set of images, resized and centre-cropped (no augmentation), for reconstructions."""
    from torchvision import transforms

    hf = fdata.load_images(dcfg)
    tf = transforms.Compose([transforms.Resize(cfg.input_size, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(cfg.input_size), transforms.ToTensor(),
                             transforms.Normalize(fdata.IMAGENET_DEFAULT_MEAN, fdata.IMAGENET_DEFAULT_STD)])
    imgs = []
    for row in (hf.take(n * 4) if cfg.streaming else hf.select(range(min(len(hf), n * 4)))):
        try:
            imgs.append(tf(fdata.decode_rgb(row["image"])))
        except Exception:  # noqa: BLE001 - a bad image is simply not shown
            continue
        if len(imgs) == n:
            break
    return torch.stack(imgs)


def pretrain(cfg) -> Path:
    _validate(cfg)
    out = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=_trackers(cfg.report_to),
                              project_dir=str(out))
    say = accelerator.print
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and accelerator.device.type == "cuda"
    set_seed(cfg.seed)  # identical initial weights on every rank
    raw = create_fcmae(cfg.model, mask_ratio=cfg.mask_ratio, decoder_dim=cfg.decoder_dim,
                       decoder_depth=cfg.decoder_depth, norm_pix_loss=cfg.norm_pix_loss, backend=cfg.backend,
                       drop_path_rate=cfg.drop_path)
    if cfg.init_from:
        from ..weights.formats import load_fcmae_weights

        say(log_fmt.format(str(load_fcmae_weights(raw, cfg.init_from))))
    if cfg.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    dcfg = _data_config(cfg)
    loader = fdata.build_pretrain_loader(dcfg, cfg.batch_size, cfg.num_workers, cfg.seed, rank=rank,
                                         world_size=world, pin_memory=accelerator.device.type == "cuda")
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=0.0, betas=(cfg.beta1, cfg.beta2))
    if cfg.compile:
        raw.compile()  # in place: parameter names stay as they are
    if cfg.streaming:  # the loader already holds this rank's share
        model, optimizer = accelerator.prepare(raw, optimizer)
    else:
        model, optimizer, loader = accelerator.prepare(raw, optimizer, loader)

    steps_per_epoch = len(loader) // cfg.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"One epoch gives {len(loader)} batches per process, fewer than --grad-accum "
                         f"{cfg.grad_accum}: use a smaller batch size or accumulation.")
    total = cfg.epochs * steps_per_epoch if cfg.max_steps is None else cfg.max_steps
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_epochs * steps_per_epoch)
    eff_batch = cfg.batch_size * cfg.grad_accum * world
    lr = cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / 256
    say(log_fmt.format(f"{cfg.model} on {'the built-in demo images' if not (cfg.data or cfg.dataset_name) else cfg.data or cfg.dataset_name}"
                       f" | {world} process(es) on {accelerator.device} | effective batch {eff_batch} "
                       f"({cfg.batch_size} x {cfg.grad_accum} accum x {world}) | lr {lr:.3g}"
                       + ("" if cfg.lr is not None else f" = blr {cfg.blr:g} x {eff_batch} / 256")
                       + f" | {total} steps ({steps_per_epoch}/epoch), warmup {warmup}"))

    resolved = {**asdict(cfg), "world_size": world, "effective_batch_size": eff_batch, "abs_lr": lr,
                "steps_per_epoch": steps_per_epoch, "total_steps": total, "warmup_steps_resolved": warmup}
    pos = dict(step=0, epoch=0, batch=0, num_bad=0, num_seen=0)
    hub_resume = bool(cfg.resume) and str(cfg.resume).startswith("hf-hub:")
    if hub_resume:
        # A pushed FCMAE holds the weights and the step, not the optimizer: the schedule and the data
        # position continue from that step, AdamW's moments start afresh (close to, not bitwise, exact).
        from safetensors import safe_open

        from ..weights.formats import fcmae_file, load_fcmae_weights

        say(log_fmt.format(str(load_fcmae_weights(accelerator.unwrap_model(model), cfg.resume))))
        with safe_open(str(fcmae_file(cfg.resume)), "pt") as f:
            pushed_step = int((f.metadata() or {}).get("step", 0))
        pos.update(step=pushed_step, epoch=pushed_step // steps_per_epoch,
                   batch=pushed_step % steps_per_epoch * cfg.grad_accum)
        say(log_fmt.format(f"continuing {cfg.resume} from step {pushed_step} with fresh optimizer state"))
    else:
        restore(accelerator, cfg.resume, out, pos, say)
    if accelerator.is_main_process:
        (out / "reconstructions").mkdir(parents=True, exist_ok=True)
        save_yaml(resolved, out / "config.yaml")
        trim_log(out / "log.jsonl", lambda row: row["step"] <= pos["step"])
    accelerator.init_trackers("fcmae-pretrain", config={k: v for k, v in resolved.items()
                                                       if isinstance(v, (int, float, str, bool))})
    recon_imgs = _recon_batch(cfg, dcfg, cfg.num_recon).to(accelerator.device) if cfg.num_recon else None
    recon_every = cfg.recon_every or cfg.save_every

    def export(step: int) -> None:
        full = accelerator.get_state_dict(model)  # a collective under FSDP / ZeRO-3: every rank calls it
        if accelerator.is_main_process:
            meta = {"format": "fcmae", "model": cfg.model, "step": str(step), "config": json.dumps(resolved)}
            encoder = {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}
            save_safetensors(encoder, out / "encoder.safetensors", {**meta, "format": "fcmae-encoder"})
            save_safetensors(full, out / "fcmae.safetensors", meta)

    def reconstruct(step: int) -> None:
        if recon_imgs is None:
            return
        from .reconstruct import reconstruction_panel

        model.eval()
        gen = torch.Generator().manual_seed(cfg.seed)  # the same masks every time
        unwrapped = accelerator.unwrap_model(model)
        h, w = unwrapped.grid(recon_imgs)
        mask = gen_random_mask(len(recon_imgs), h * w, cfg.mask_ratio, generator=gen).to(accelerator.device)
        with accelerator.autocast():
            panel = reconstruction_panel(model, unwrapped, recon_imgs, mask)
        if accelerator.is_main_process:
            panel.save(out / "reconstructions" / f"step_{step:08d}.png")
        model.train()

    step, epoch, batch = pos["step"], pos["epoch"], pos["batch"]
    num_bad, num_seen = pos["num_bad"], pos["num_seen"]
    dev = accelerator.device
    loss_sum, bad_sum, seen_sum = (torch.zeros((), device=dev) for _ in range(3))
    first_nan = torch.full((), -1, device=dev, dtype=torch.long)
    logged_at, t0 = step, time.perf_counter()
    bar = tqdm(total=total, initial=step, disable=not accelerator.is_local_main_process, desc="pretrain",
               dynamic_ncols=True)

    def check_health() -> None:
        """The deferred checks (no per-step host syncs): non-finite loss and the bad-image fraction."""
        nonlocal num_bad, num_seen, bad_sum, seen_sum
        stats = accelerator.reduce(torch.stack([bad_sum, seen_sum]), "sum")
        nan_step = int(accelerator.reduce(first_nan, "max"))
        if nan_step >= 0:
            good = complete_checkpoints(out / "checkpoints")
            raise FloatingPointError(f"Non-finite loss at step {nan_step}. The run stopped; the last good checkpoint is "
                                     f"{good[-1] if good else 'none (no checkpoint was written yet)'}. Lower the lr, "
                                     "add --clip-grad, or use bf16 instead of fp16.")
        num_bad, num_seen = num_bad + int(stats[0]), num_seen + int(stats[1])
        bad_sum, seen_sum = torch.zeros_like(bad_sum), torch.zeros_like(seen_sum)
        fdata.check_bad_fraction(num_bad, num_seen, cfg.max_bad_fraction)

    model.train()
    while step < total:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, batch) if batch else loader
        per_epoch = steps_per_epoch * cfg.grad_accum
        for imgs, ok in batches:
            if batch % cfg.grad_accum == 0:  # first micro-batch of an optimizer step
                torch.manual_seed(step_seed(cfg.seed, step, rank))
                set_lr(optimizer, lr_at(step, total, warmup, lr, cfg.min_lr))
            imgs = imgs.to(dev, non_blocking=True)
            if cfg.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            batch += 1
            last_micro = batch % cfg.grad_accum == 0
            loss = backward_micro_batch(accelerator, model, lambda: model(imgs)[0], cfg.grad_accum, last_micro)
            loss_sum += loss
            first_nan = torch.where((first_nan < 0) & ~torch.isfinite(loss), step + 1, first_nan)  # 1-based, as logged
            bad_sum += (~ok.to(dev)).sum()
            seen_sum += ok.numel()
            if not last_micro:
                continue
            optimizer_step(accelerator, model, optimizer, cfg.clip_grad)
            step += 1
            fault_point("step", step)
            bar.update(1)
            if batch >= per_epoch:
                epoch, batch = epoch + 1, 0
            if step % cfg.log_every == 0 or step == total:
                check_health()
                n = step - logged_at
                mean_loss = float(accelerator.reduce(loss_sum, "mean")) / (n * cfg.grad_accum)
                ips = n * eff_batch / (time.perf_counter() - t0)
                row = dict(step=step, epoch=epoch + batch / per_epoch, loss=mean_loss, lr=optimizer.param_groups[0]["lr"],
                           images_per_sec=ips)
                if accelerator.is_main_process:
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{row['lr']:.2e}", img_s=f"{ips:.1f}")
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
                loss_sum, logged_at, t0 = torch.zeros_like(loss_sum), step, time.perf_counter()
            if step % cfg.save_every == 0 or step == total:
                check_health()  # never checkpoint weights that saw a non-finite loss
                save_checkpoint(accelerator, out / "checkpoints", dict(step=step, epoch=epoch, batch=batch,
                                num_bad=num_bad, num_seen=num_seen), cfg.keep_last)
                export(step)
            if step % recon_every == 0 or step == total:
                reconstruct(step)
            if step >= total or batch == 0:
                break
        else:
            epoch, batch = epoch + 1, 0  # a loader shorter than expected (should not happen)
    bar.close()
    # replicated training (DDP): every rank must hold the same weights; compare fingerprints
    same = None
    if accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        fingerprint = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(model).parameters()])
        prints = accelerator.gather(fingerprint.to(dev)[None]).cpu()
        same = bool((prints == prints[0]).all())
    if accelerator.is_main_process:
        save_yaml({"step": step, "world_size": world, "ranks_identical": same, "num_bad": num_bad,
                   "num_seen": num_seen}, out / "final.yaml")
        if same is False:
            raise RuntimeError("Parameters differ across processes at the end of training: distributed sync is broken.")
    say(log_fmt.format(f"done: {step} steps; {num_bad} bad images of {num_seen} seen. Outputs in {out}"))
    if cfg.push_to_hub and accelerator.is_main_process:
        from ..weights.hub import export_and_push

        url = export_and_push(out, cfg.push_to_hub, model=cfg.model, formats=("timm", "fcmae"), private=cfg.hub_private,
                              datasets=[cfg.dataset_name] if cfg.dataset_name else ())
        say(log_fmt.format(f"pushed to {url}"))
    # Teardown: drop references before end_training (avoids a gloo abort at exit, REFERENCE.md sec. 6)
    del model, optimizer, loader
    accelerator.free_memory()
    accelerator.end_training()
    return out
