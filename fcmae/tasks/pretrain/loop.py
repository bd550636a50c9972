"""FCMAE pretraining (``fcmae pretrain``): the loop over the training core. One process per device.

Each sample's mask and drop path are drawn from its key, a function of (seed, epoch, global sample
index) (``Run.keys``), so a resumed run repeats the uninterrupted one bit for bit, and a run resumed
on another number of processes with the same global batch draws the same (fcmae.training.run).
Outputs in --output-dir: config.yaml, log.jsonl, checkpoints/step_N (resume with --resume auto),
encoder.safetensors, fcmae.safetensors, reconstructions/step_N.png, final.yaml.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ... import data
from ...models.convnext import Block
from ...training.distributed import unsharded
from ...training.optim import adamw
from ...training.run import Position, due, launch
from .artifact import save_weights
from .config import PretrainConfig
from .evaluation import Reconstructions, knn_monitor
from .model import build_fcmae, resume_from_hub


def pretrain(cfg: PretrainConfig) -> Path:
    return launch(cfg, "fcmae-pretrain", lambda run: train(run, cfg), wrap=(Block,))  # FSDP2: every Block


def train(run, cfg: PretrainConfig) -> None:
    model = build_fcmae(cfg, run.say)
    loader = data.build_pretrain_loader(
        cfg.dataset,
        cfg.batch_size,
        data.resolve_workers(cfg.num_workers),
        cfg.seed,
        rank=run.rank,
        world_size=run.world,
        pin_memory=run.device.type == "cuda",
        with_index=True,
    )
    # a stream already holds this rank's share: Accelerate must not shard it again
    model, _, loader = run.prepare(model, adamw(model, cfg), loader, shard_loaders=not cfg.streaming)
    run.schedule(len(loader))
    run.begin(Position(), restore=resume_from_hub if str(cfg.resume).startswith("hf-hub:") else None)
    recon, knn = Reconstructions(run, cfg), knn_monitor(cfg, run.accelerator)
    model.train()
    while run.training:
        for (imgs, ok, index), last_micro in run.batches(loader):
            imgs, keys = imgs.to(run.device, non_blocking=True), run.keys(index)  # keys: masks, drop path
            if cfg.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            run.backward(lambda: model(imgs, keys=keys)[0], last_micro, ok)
            if not last_micro:
                continue
            run.step()
            run.checkpoint_if_due(then=lambda: save_weights(run))
            recon()
            if knn is not None and due(run.pos.step, cfg.knn_every, run.sched.total):
                with unsharded(model):  # the k-NN calls the encoder outside the FCMAE's forward
                    run.log(dict(step=run.pos.step, **knn(run.module.encoder)))
    run.finish()
    run.say(
        f"done: {run.pos.step} steps; {run.pos.num_bad} bad images of {run.pos.num_seen} seen. Outputs in {run.out}"
    )
    run.push(run.out, model=cfg.model, formats=("timm", "fcmae"))


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from ...training.config import cli
    from .config import choose_preset

    cli(PretrainConfig, pretrain, argv, description=USAGE, choose_preset=choose_preset, prog=prog)


USAGE = """FCMAE pretraining of ConvNeXt V2.

Usage:
    fcmae pretrain                                  # built-in demo: shipped photos, CPU-sized
    accelerate launch -m fcmae pretrain --config configs/pretrain/convnextv2_base.yaml --data /path/to/images
    fcmae pretrain --dataset-name owner/name --image-column image --streaming --max-steps 10000
    fcmae pretrain --help                           # every field; any of them is a flag

Precedence: defaults < the recipe < the demo preset (only when no data is given) < --config YAML < flags.
Outputs in --output-dir: config.yaml, log.jsonl, checkpoints/step_N (resume with --resume auto),
encoder.safetensors, fcmae.safetensors, reconstructions/step_N.png, final.yaml.
"""
