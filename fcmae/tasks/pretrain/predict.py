"""Reconstructions of given images by a pretrained FCMAE: what the masked autoencoder predicts for
the masked patches.

Usage:
    fcmae predict photo.jpg photos/ --checkpoint outputs/pretrain --out-dir recon    # <stem>.png each

Each ``<stem>.png`` is the panel of the training reconstructions: original | masked | prediction |
prediction pasted into the masked patches. Masks are drawn from ``--seed`` (the same masks at every
call). Needs the full FCMAE (``fcmae.safetensors``, in a pretraining run or an fcmae export); an
encoder alone predicts nothing (``fcmae embed`` gives its features). Every readable image is drawn;
each unreadable one is named with its reason on stderr, and the command then exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    Reader,
    by_input,
    image_paths,
    read_images,
    report_unreadable,
)
from ...models import create_fcmae
from ...training.config import images_parser
from ...weights.card import flatten_config
from ...weights.formats import fcmae_args_from_state_dict, fcmae_file, load_fcmae_weights
from ...weights.load import read_state_dict
from ...weights.source import read_metadata
from .evaluation import fixed_masks, reconstruction_panel


def load_fcmae(source):
    """(the FCMAE in eval mode, its run's flat config) from fcmae.safetensors or a folder holding it."""
    path = fcmae_file(source)
    meta = read_metadata(path)
    config = flatten_config(json.loads(meta["config"])) if "config" in meta else {}
    sd = read_state_dict(path)
    if "proj.weight" not in sd:
        raise ValueError(
            f"{path} holds an encoder without its decoder: reconstructions need the full FCMAE "
            "(fcmae.safetensors of a pretraining run); `fcmae embed` gives an encoder's features."
        )
    args = fcmae_args_from_state_dict(sd)
    model = create_fcmae(
        meta.get("model") or config["model"],
        decoder_dim=args["decoder_dim"],
        decoder_depth=args["decoder_depth"],
        mask_ratio=config.get("mask_ratio", 0.6),
        norm_pix_loss=config.get("norm_pix_loss", True),
        in_chans=sd["encoder.stem.0.weight"].shape[1],
    )
    load_fcmae_weights(model, sd)
    return model.eval(), config


@torch.no_grad()
def predict(args) -> int:
    model, config = load_fcmae(args.checkpoint)
    size = args.input_size or int(config.get("input_size", 224))
    mean, std = config.get("mean") or IMAGENET_DEFAULT_MEAN, config.get("std") or IMAGENET_DEFAULT_STD
    tf = by_input("eval", size, mean, std, crop_pct=1.0)
    paths = image_paths(args.images)
    images, failed = read_images(paths, Reader(model.in_chans, config.get("channel_axis", "last")))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path, image in images:
        x = tf(image)[None]
        panel = reconstruction_panel(
            model, model, x, fixed_masks(model, x, args.seed), mean, std, config.get("vis_channels", [0, 1, 2])
        )
        panel.save(out / f"{Path(path).stem}.png")
        print(f"{path} -> {out / (Path(path).stem + '.png')}", flush=True)
    return report_unreadable(failed, len(paths))


def main(argv: list[str] | None = None, prog: str = "fcmae predict") -> int:
    parser = images_parser(prog, __doc__, "a pretraining run, its fcmae.safetensors, or an export", "reconstructions")
    parser.add_argument("--input-size", type=int, help="default: the run's")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masks")
    return predict(parser.parse_args(argv))
