"""The FCMAE of a pretraining run: built from the config, started from released weights or a full
FCMAE, or continued from a pushed FCMAE."""

from __future__ import annotations

import torch

from ...models import create_fcmae
from ...weights import load_encoder
from ...weights.formats import fcmae_file, load_fcmae_weights
from ...weights.source import read_metadata


def build_fcmae(cfg, say=print) -> torch.nn.Module:
    """``create_fcmae`` with the config's sizes; ``--init-from`` loads a full FCMAE strictly,
    ``--init-encoder`` an encoder (the decoder stays fresh)."""
    model = create_fcmae(
        cfg.model,
        mask_ratio=cfg.mask_ratio,
        decoder_dim=cfg.decoder_dim,
        decoder_depth=cfg.decoder_depth,
        norm_pix_loss=cfg.norm_pix_loss,
        backend=cfg.backend,
        drop_path_rate=cfg.drop_path,
        in_chans=cfg.in_chans,
    )
    if cfg.init_from:
        say(str(load_fcmae_weights(model, cfg.init_from)))
    if cfg.init_encoder:
        say(
            f"encoder from --init-encoder {cfg.init_encoder}: "
            f"{load_encoder(model.encoder, cfg.init_encoder, '--init-encoder')}"
        )
    if cfg.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def resume_from_hub(run, pos) -> None:
    """``--resume hf-hub:...``: a pushed FCMAE holds the weights and the step, not the optimizer. The
    schedule and the data position continue from that step, AdamW's moments start afresh (close to,
    not bitwise, exact)."""
    source = run.cfg.resume
    if run.accelerator.is_fsdp2:
        raise ValueError(
            f"--resume {source} (weights without optimizer state) is not supported with FSDP: use "
            "--init-from to start from them, or resume from a local checkpoint directory."
        )
    run.say(str(load_fcmae_weights(run.module, source)))
    sched = run.sched
    pos.step = int(read_metadata(fcmae_file(source)).get("step", 0))
    pos.epoch, pos.batch = pos.step // sched.steps_per_epoch, pos.step % sched.steps_per_epoch * sched.grad_accum
    run.say(f"continuing {source} from step {pos.step} with fresh optimizer state")
