"""FCMAE pretraining's config: its own fields, the official recipe, and the built-in demo."""

from __future__ import annotations

from dataclasses import dataclass

from ...training.config import Alias, Config, help_field


@dataclass
class PretrainTask:
    mask_ratio: float = help_field("fraction of the 32 x 32 patches masked in every image", 0.6)
    decoder_dim: int = help_field("width of the decoder's ConvNeXt blocks", 512)
    decoder_depth: int = help_field("decoder blocks", 1)
    norm_pix_loss: bool = help_field("normalise each target patch by its own mean and std", True)
    backend: str = help_field("gather | dense | minkowski: the same results; gather is the fast one", "gather")
    init_from: str | None = help_field("start from a full FCMAE's weights (fcmae.safetensors, run dir, hf-hub:...)")
    init_encoder: str | None = help_field(
        "start the encoder from released weights (official *_fcmae.pt, timm, "
        "transformers, encoder.safetensors, hf-hub:...); decoder fresh"
    )
    recon_every: int | None = help_field("steps between reconstruction images (default: --save-every)")
    num_recon: int = help_field("images in each reconstruction panel", 4)
    vis_channels: list[int] = help_field(
        "channels drawn as RGB (or one, as gray) in the reconstructions", default_factory=lambda: [0, 1, 2]
    )
    # label-free progress: weighted k-NN accuracy of the pooled encoder features (DINO's evaluation)
    knn_data: str | None = help_field(
        "labelled folder with train/ and val/ class folders (or a Hub dataset) for the k-NN monitor"
    )
    knn_every: int = help_field("steps between k-NN evaluations", 1000)
    knn_k: int = help_field("neighbours that vote", 20)
    knn_temperature: float = help_field("vote weight exp(similarity / T)", 0.07)


class PretrainConfig(Config):
    """FCMAE pretraining. The recipe is the official one (ConvNeXt V2 paper, appendix; official code
    ``main_pretrain.py``): the defaults below; ``configs/pretrain/convnextv2_*.yaml`` add each size's
    batch layout on 8 GPUs (effective batch 4096)."""

    TASK = PretrainTask
    DEFAULTS = dict(
        model="convnextv2_atto",
        epochs=800,
        blr=1.5e-4,
        warmup_epochs=40.0,
        beta2=0.95,
        output_dir="outputs/pretrain",
        save_every=1000,
    )
    UNUSED = frozenset(
        {
            "from_fcmae",
            "label_column",
            "val_split",
            "layer_decay",
            "layer_decay_type",
            "eval_every",
            "eval_only",
            "checkpoint",
        }
    )
    ALIASES = {"split": Alias("train_split")}
    HELP = {
        "data": "image folder, parquet/arrow file(s), a packed folder, or a Hub dataset id; none: the demo",
        "dataset_name": "Hub dataset id (as in transformers' run_mae.py)",
    }

    def check(self) -> None:
        if self.init_from and self.init_encoder:
            raise ValueError(
                "--init-from (a full FCMAE: encoder and decoder) and --init-encoder (an encoder; the "
                "decoder starts fresh) both given: choose one."
            )
        if len(self.vis_channels) not in (1, 3) or not all(0 <= c < self.in_chans for c in self.vis_channels):
            raise ValueError(
                f"--vis-channels takes 1 or 3 channel indices below --in-chans {self.in_chans}; "
                f"got {self.vis_channels}."
            )
        if self.backend not in ("dense", "gather", "minkowski"):
            raise ValueError(f"--backend must be dense, gather or minkowski; got {self.backend!r}.")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio must be in [0, 1); got {self.mask_ratio}.")


# the no-argument run: a small model on the shipped photos, a few minutes on a laptop CPU; it replaces
# its own earlier output (--overwrite), so the README's first command can be run twice
DEMO = dict(
    model="convnextv2_atto",
    input_size=128,
    batch_size=8,
    epochs=100,
    warmup_epochs=5,
    lr=1e-3,
    weight_decay=0.05,
    num_workers=2,
    save_every=100,
    log_every=10,
    num_recon=4,
    output_dir="outputs/demo",
    overwrite=True,
)


def choose_preset(flags: dict, file_values: dict) -> dict:
    given = {**file_values, **flags}
    return {} if given.get("data") or given.get("dataset_name") else DEMO


__all__ = ["DEMO", "PretrainConfig", "PretrainTask", "choose_preset"]
