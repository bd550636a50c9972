"""What pretraining saves: ``encoder.safetensors`` (the dense encoder: ``fcmae.load_checkpoint``
loads it into ``fcmae.create_model(name)``) and ``fcmae.safetensors`` (encoder and decoder, to
continue pretraining), both tagged with their kind and the run's resolved config. Their artifact
kinds (``encoder``, ``fcmae``) and exports live in the weights layer (fcmae.weights.hub): they are
plain ConvNeXt weights."""

from __future__ import annotations

import json

ENCODER_FILE, FCMAE_FILE = "encoder.safetensors", "fcmae.safetensors"


def save_weights(run) -> None:
    """Both files from the prepared FCMAE (a collective under FSDP: every process calls it)."""
    full = run.state_dict()
    if run.is_main:
        from ...weights.files import save_safetensors

        meta = {
            "format": "fcmae",
            "model": run.cfg.model,
            "step": str(run.pos.step),
            "config": json.dumps(run.resolved),
        }
        encoder = {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")}
        save_safetensors(encoder, run.out / ENCODER_FILE, {**meta, "format": "fcmae-encoder"})
        save_safetensors(full, run.out / FCMAE_FILE, meta)


def features(source):
    """For ``fcmae embed`` of an encoder: (the dense encoder giving the global average of its last
    stage, as the k-NN monitor does; the evaluation transform; {model, dim})."""
    from ...data import by_input
    from ...weights.card import read_run_info
    from ...weights.hub import load_convnext
    from ...weights.source import find_weights
    from .evaluation import PooledFeatures

    net = load_convnext(source)
    config = read_run_info(find_weights(source)).config
    size = int(config.get("input_size") or 224)
    transform = by_input("eval", size, config.get("mean"), config.get("std"))
    return (
        PooledFeatures(net).eval(),
        transform,
        dict(
            model=net.name,
            dim=net.num_features,
            in_chans=net.in_chans,
            channel_axis=config.get("channel_axis", "last"),
            input_size=size,
        ),
    )
