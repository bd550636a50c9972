"""FCMAE pretraining: the config, the model, the exports and the loop (one process per device).

Each optimizer step draws its masks and drop path from the RNGs that ``micro_batches`` reseeds from
(seed, step, rank), so a resumed run repeats the uninterrupted one bit for bit (fcmae.training.run).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data
from ..models import create_fcmae
from ..models.convnext import Block
from ..sparse import gen_random_mask
from ..training.config import RunConfig, help_field
from ..training.distributed import unsharded
from ..training.optim import backward_micro_batch, param_groups
from ..training.run import Health, Position, due, micro_batches, start
from ..training.state import save_checkpoint
from ..weights import load_encoder
from ..weights.files import save_safetensors
from ..weights.formats import fcmae_file, load_fcmae_weights
from ..weights.source import read_metadata
from .knn import KnnMonitor
from .reconstruct import reconstruction_panel


@dataclass
class PretrainConfig(RunConfig):
    # model
    model: str = "convnextv2_atto"
    mask_ratio: float = 0.6
    decoder_dim: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = True
    backend: str = "gather"  # gather | dense | minkowski: same results, gather is the fast one
    init_from: str | None = help_field("start from a full FCMAE's weights (fcmae.safetensors, run dir, hf-hub:...)")
    init_encoder: str | None = help_field("start the encoder from released weights (official *_fcmae.pt, timm, "
                                          "transformers, encoder.safetensors, hf-hub:...); decoder fresh")
    # data (HF datasets)
    data: str | None = help_field("image folder, parquet/arrow file(s), or a Hub dataset id; none: built-in demo")
    dataset_name: str | None = help_field("Hub dataset id (as in transformers' run_mae.py)")
    split: str = "train"
    streaming: bool = False
    num_examples: int | None = help_field("streaming: dataset size when the source does not say")
    # optimisation: the official recipe (ConvNeXt V2 paper, appendix; official code main_pretrain.py)
    epochs: int = 800
    blr: float = 1.5e-4
    warmup_epochs: float = 40.0
    beta2: float = 0.95
    # outputs
    output_dir: str = "outputs/pretrain"
    save_every: int = 1000
    recon_every: int | None = help_field("steps between reconstruction images (default: save_every)")
    num_recon: int = 4
    vis_channels: list[int] = field(default_factory=lambda: [0, 1, 2])  # drawn as RGB in reconstructions
    # label-free progress: weighted k-NN accuracy of the pooled encoder features (DINO's evaluation)
    knn_data: str | None = help_field("labelled folder with train/ and val/ class folders (or a Hub dataset)")
    knn_every: int = 1000
    knn_k: int = 20
    knn_temperature: float = 0.07

    def check(self) -> None:
        if self.init_from and self.init_encoder:
            raise ValueError("--init-from (a full FCMAE: encoder and decoder) and --init-encoder (an encoder; the "
                             "decoder starts fresh) both given: choose one.")
        if len(self.vis_channels) not in (1, 3) or not all(0 <= c < self.in_chans for c in self.vis_channels):
            raise ValueError(f"--vis-channels takes 1 or 3 channel indices below --in-chans {self.in_chans}; "
                             f"got {self.vis_channels}.")
        if self.backend not in ("dense", "gather", "minkowski"):
            raise ValueError(f"--backend must be dense, gather or minkowski; got {self.backend!r}.")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio must be in [0, 1); got {self.mask_ratio}.")


# the no-argument run: a small model on the shipped photos, a few minutes on a laptop CPU
DEMO = dict(model="convnextv2_atto", input_size=128, batch_size=8, epochs=100, warmup_epochs=5, lr=1e-3,
            weight_decay=0.05, num_workers=2, save_every=100, log_every=10, num_recon=4,
            output_dir="outputs/demo")


def choose_preset(flags: dict, file_values: dict) -> dict:
    given = {**file_values, **flags}
    return {} if given.get("data") or given.get("dataset_name") else DEMO


def data_config(cfg: PretrainConfig) -> data.DataConfig:
    return data.DataConfig(data=cfg.data, dataset_name=cfg.dataset_name, dataset_config_name=cfg.dataset_config_name,
                           split=cfg.split, image_column=cfg.image_column, streaming=cfg.streaming,
                           input_size=cfg.input_size, max_bad_fraction=cfg.max_bad_fraction,
                           num_examples=cfg.num_examples, in_chans=cfg.in_chans, mean=cfg.mean, std=cfg.std,
                           channel_axis=cfg.channel_axis)


def build_fcmae(cfg: PretrainConfig, run) -> torch.nn.Module:
    model = create_fcmae(cfg.model, mask_ratio=cfg.mask_ratio, decoder_dim=cfg.decoder_dim,
                         decoder_depth=cfg.decoder_depth, norm_pix_loss=cfg.norm_pix_loss, backend=cfg.backend,
                         drop_path_rate=cfg.drop_path, in_chans=cfg.in_chans)
    if cfg.init_from:
        run.say(str(load_fcmae_weights(model, cfg.init_from)))
    if cfg.init_encoder:
        run.say(f"encoder from --init-encoder {cfg.init_encoder}: "
                f"{load_encoder(model.encoder, cfg.init_encoder, '--init-encoder')}")
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def resume_from_hub(run, model, pos: Position, sched) -> None:
    """A pushed FCMAE holds the weights and the step, not the optimizer: the schedule and the data
    position continue from that step, AdamW's moments start afresh (close to, not bitwise, exact)."""
    source = run.cfg.resume
    if run.accelerator.is_fsdp2:
        raise ValueError(f"--resume {source} (weights without optimizer state) is not supported with FSDP: use "
                         "--init-from to start from them, or resume from a local checkpoint directory.")
    run.say(str(load_fcmae_weights(run.accelerator.unwrap_model(model), source)))
    pos.step = int(read_metadata(fcmae_file(source)).get("step", 0))
    pos.epoch, pos.batch = pos.step // sched.steps_per_epoch, pos.step % sched.steps_per_epoch * sched.grad_accum
    run.say(f"continuing {source} from step {pos.step} with fresh optimizer state")


def export(run, model, resolved: dict, step: int) -> None:
    """encoder.safetensors (loads into fcmae.create_model) and fcmae.safetensors (the whole FCMAE)."""
    full = run.accelerator.get_state_dict(model)  # a collective under FSDP: every rank calls it
    if run.is_main:
        meta = {"format": "fcmae", "model": run.cfg.model, "step": str(step), "config": json.dumps(resolved)}
        encoder = {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}
        save_safetensors(encoder, run.out / "encoder.safetensors", {**meta, "format": "fcmae-encoder"})
        save_safetensors(full, run.out / "fcmae.safetensors", meta)


@torch.no_grad()
def reconstruct(run, model, imgs: torch.Tensor, step: int) -> None:
    """reconstructions/step_N.png for a fixed batch and fixed masks."""
    model.eval()
    unwrapped = run.accelerator.unwrap_model(model)
    h, w = unwrapped.grid(imgs)
    gen = torch.Generator().manual_seed(run.cfg.seed)  # the same masks every time
    mask = gen_random_mask(len(imgs), h * w, run.cfg.mask_ratio, generator=gen).to(run.device)
    cfg = run.cfg
    with run.accelerator.autocast():
        panel = reconstruction_panel(model, unwrapped, imgs, mask, cfg.mean or data.IMAGENET_DEFAULT_MEAN,
                                     cfg.std or data.IMAGENET_DEFAULT_STD, cfg.vis_channels)
    if run.is_main:
        (run.out / "reconstructions").mkdir(parents=True, exist_ok=True)
        panel.save(run.out / "reconstructions" / f"step_{step:08d}.png")
    model.train()


def pretrain(cfg: PretrainConfig) -> Path:
    run = start(cfg, "fcmae-pretrain", wrap=(Block,))  # FSDP2 units: encoder and decoder blocks
    model = build_fcmae(cfg, run)
    dcfg = data_config(cfg)
    loader = data.build_pretrain_loader(dcfg, cfg.batch_size, cfg.num_workers, cfg.seed, rank=run.rank,
                                        world_size=run.world, pin_memory=run.device.type == "cuda")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0, betas=(cfg.beta1, cfg.beta2))
    # a stream already holds this rank's share: Accelerate must not shard it again
    model, optimizer, loader = run.prepare(model, optimizer, loader, shard_loaders=not cfg.streaming)
    sched = run.schedule(len(loader))
    pos = Position()
    resume_from_hub(run, model, pos, sched) if str(cfg.resume).startswith("hf-hub:") else run.restore(pos)
    resolved = run.write_config(sched, pos)
    recon = data.recon_images(dcfg, cfg.num_recon).to(run.device) if cfg.num_recon else None
    knn = KnnMonitor.from_folder(cfg.knn_data, run.accelerator, cfg.input_size, cfg.batch_size, cfg.num_workers,
                                 k=cfg.knn_k, temperature=cfg.knn_temperature, in_chans=cfg.in_chans, mean=cfg.mean,
                                 std=cfg.std, channel_axis=cfg.channel_axis) if cfg.knn_data else None
    health = Health(run, pos)
    model.train()
    while pos.step < sched.total:
        for (imgs, ok), last_micro in micro_batches(run, loader, pos, sched, optimizer):
            imgs = imgs.to(run.device, non_blocking=True)
            if cfg.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            loss = backward_micro_batch(run.accelerator, model, lambda: model(imgs)[0], cfg.grad_accum, last_micro)
            health.add(loss, ok, pos.step)
            if not last_micro:
                continue
            run.step(model, optimizer, pos, sched, health)
            if due(pos.step, cfg.save_every, sched.total):
                health.check(pos)  # never checkpoint weights that saw a non-finite loss
                save_checkpoint(run.accelerator, run.out / "checkpoints", health.saved(pos), cfg.keep_last)
                export(run, model, resolved, pos.step)
            if recon is not None and due(pos.step, cfg.recon_every or cfg.save_every, sched.total):
                reconstruct(run, model, recon, pos.step)
            if knn is not None and due(pos.step, cfg.knn_every, sched.total):
                with unsharded(model):  # the k-NN calls the encoder outside the FCMAE's forward
                    run.log(dict(step=pos.step, **knn(run.accelerator.unwrap_model(model).encoder)))
    run.finish(pos, run.accelerator.unwrap_model(model))
    run.say(f"done: {pos.step} steps; {pos.num_bad} bad images of {pos.num_seen} seen. Outputs in {run.out}")
    run.push(run.out, model=cfg.model, formats=("timm", "fcmae"))
    del model, optimizer, loader
    run.close()
    return run.out
