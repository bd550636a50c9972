"""Pretraining's evaluation: a label-free progress monitor (weighted k-NN accuracy of the encoder's
features) and the reconstruction panels.

FCMAE's loss says how well masked pixels are predicted, not how useful the features are. A k-NN
classifier on frozen features needs no training, so it can be run every few thousand steps on a
small labelled folder. It is DINO's evaluation (Caron et al. 2021, facebookresearch/dino
eval_knn.py, ``knn_classifier``): L2-normalised features, cosine similarity, the k = 20 most similar
training images vote for their class with weight exp(similarity / T), T = 0.07; top-1 accuracy in
percent. As in DINO, training and test images both get the evaluation transform (no augmentation).

The monitor is built after ``accelerator.prepare(...)`` of the training loader (so that one stays
the first prepared loader of the checkpoints) and called on every process.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ... import data
from ...models.convnext import Head
from ...sparse import gen_random_mask
from ...training.run import due


@torch.no_grad()
def knn_accuracy(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 256,
) -> float:
    """Top-1 accuracy (percent) of the weighted k-NN vote (DINO's ``knn_classifier``).

    train_feats (N, D), test_feats (M, D): any scale (they are L2-normalised here). Labels are
    integers in [0, num_classes). k larger than N is clamped to N. Test rows are processed
    ``chunk`` at a time, so memory stays (chunk, N). A tie between classes goes to the lowest class
    index (argmax); DINO sorts, which leaves ties to the sort's order."""
    train_feats, test_feats = torch.as_tensor(train_feats), torch.as_tensor(test_feats)
    device = train_feats.device
    train_labels = torch.as_tensor(train_labels, device=device).long()
    test_labels = torch.as_tensor(test_labels, device=device).long()
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(
            f"features must be (N, D) and (M, D); got {tuple(train_feats.shape)} and {tuple(test_feats.shape)}."
        )
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels) or not len(test_feats):
        raise ValueError(
            f"{len(train_feats)} train features for {len(train_labels)} labels, {len(test_feats)} "
            f"test features for {len(test_labels)} labels; each needs one label, and test rows."
        )
    for labels in (train_labels, test_labels):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}.")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be at least 1 and temperature positive; got k={k}, temperature={temperature}.")
    k = min(k, len(train_feats))
    train = F.normalize(train_feats.float(), dim=1)
    correct = 0
    for start in range(0, len(test_feats), chunk):
        test = F.normalize(test_feats[start : start + chunk].float().to(device), dim=1)
        similarity, index = (test @ train.T).topk(k, dim=1)  # cosine similarity of unit vectors
        votes = torch.zeros(len(test), num_classes, device=device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start : start + chunk]).sum())
    return 100.0 * correct / len(test_feats)


def pooled_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, C) features of the dense encoder, unmasked: the global average of ``forward_features``,
    after the head's LayerNorm when the encoder has one (a classifier; its fc is not used). The
    FCMAE encoder has no head (its head is Identity): the plain average is its feature."""
    x = encoder.forward_features(images)
    if isinstance(getattr(encoder, "head", None), Head):
        return encoder.forward_head(x, pre_logits=True)
    return x.mean((2, 3))


class PooledFeatures(nn.Module):
    """An encoder's features for ``fcmae embed``: the global average of its last stage (no norm), the
    k-NN monitor's features."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(x).mean((2, 3))


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(L2-normalised float32 features (N, C), labels (N,)) of every readable image of the loader,
    in eval mode under the accelerator's autocast. The loader yields (images, labels) or
    (images, labels, ok); samples with ok False (unreadable images) are left out.

    With an accelerator the loader must be prepared by it: each process extracts its shard and
    ``gather_for_metrics`` joins them, dropping the samples repeated to fill the last batch, so
    every image counts once and every process gets all features. The encoder's train/eval mode is
    restored afterwards."""
    was_training = encoder.training
    encoder.eval()
    device = accelerator.device if accelerator is not None else next(encoder.parameters()).device
    feats, labels = [], []
    try:
        for batch in loader:
            images, target = batch[0].to(device), batch[1].to(device)
            ok = batch[2].to(device) if len(batch) > 2 else torch.ones_like(target)
            ok = ok.to(torch.uint8)  # gathered as integers: not every backend all-gathers bool
            with accelerator.autocast() if accelerator is not None else contextlib.nullcontext():
                f = pooled_features(encoder, images)
            f = F.normalize(f.float(), dim=1)
            if accelerator is not None:
                f, target, ok = accelerator.gather_for_metrics((f, target, ok))
            feats.append(f[ok.bool()])
            labels.append(target[ok.bool()])
    finally:
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


class KnnMonitor:
    """``monitor(encoder) -> {'knn_acc1': percent}``: features of a labelled train and val split,
    then ``knn_accuracy``. Call it on every process (feature extraction is sharded and gathered)."""

    def __init__(
        self, train_loader, val_loader, num_classes: int, accelerator=None, k: int = 20, temperature: float = 0.07
    ):
        self.train_loader, self.val_loader, self.num_classes = train_loader, val_loader, num_classes
        self.accelerator, self.k, self.temperature = accelerator, k, temperature

    @classmethod
    def from_config(
        cls, cfg: data.DataConfig, accelerator=None, batch_size: int = 64, k: int = 20, temperature: float = 0.07
    ) -> KnnMonitor:
        """From the labelled data ``cfg`` names (a folder with train/ and val/ (or validation/) class
        sub-folders, or any source ``fcmae.data.load_labelled`` reads). Both splits get the evaluation
        transform (resize, centre crop, the config's normalisation)."""
        train, train_labels, val, val_labels, names = data.load_labelled(cfg)
        pin = accelerator is not None and accelerator.device.type == "cuda"
        loaders = [
            data.build_val_loader(cfg, ds, y, batch_size, pin_memory=pin)
            for ds, y in ((train, train_labels), (val, val_labels))
        ]
        if accelerator is not None:
            loaders = [accelerator.prepare(loader) for loader in loaders]
        return cls(*loaders, len(names), accelerator, k, temperature)

    @classmethod
    def from_folder(
        cls,
        folder,
        accelerator=None,
        input_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        k: int = 20,
        temperature: float = 0.07,
        **fields,
    ) -> KnnMonitor:
        """``from_config`` for a folder with train/ and val/ (or validation/) class sub-folders; extra
        keyword arguments are ``DataConfig`` fields (in_chans, mean, std, ...)."""
        cfg = data.DataConfig(data=str(folder), input_size=input_size, num_workers=num_workers, **fields)
        return cls.from_config(cfg, accelerator, batch_size, k, temperature)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        # fork_rng: the loaders' iterators draw a base seed from the global generator; the training
        # stream's random numbers stay as if the monitor had not run
        device = self.accelerator.device if self.accelerator is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            train = extract_features(encoder, self.train_loader, self.accelerator)
            val = extract_features(encoder, self.val_loader, self.accelerator)
        return {"knn_acc1": knn_accuracy(*train, *val, self.num_classes, self.k, self.temperature)}


def knn_monitor(cfg, accelerator) -> KnnMonitor | None:
    """The k-NN monitor of a pretraining config (``--knn-data``): the run's data config pointed at the
    labelled folder (same size, channels and normalisation), or None."""
    if not cfg.knn_data:
        return None
    knn_data = replace(
        cfg.dataset,
        data=str(cfg.knn_data),
        dataset_name=None,
        dataset_config_name=None,
        image_column=None,
        label_column=None,
        streaming=False,
        train_split="train",
        val_split="validation",
    )
    return KnnMonitor.from_config(knn_data, accelerator, cfg.batch_size, cfg.knn_k, cfg.knn_temperature)


# ----------------------------------------------------------------------------- reconstructions


@torch.no_grad()
def reconstruction_panel(
    forward, model, imgs: torch.Tensor, mask: torch.Tensor, mean, std, channels=(0, 1, 2)
) -> Image.Image:
    """Original | masked | prediction | prediction pasted into the masked patches of the original
    (visible patches kept), one row per image. imgs (N, C, H, W) normalised with ``mean``/``std``;
    mask (N, L) 0 keep / 1 remove. ``forward`` runs the model (the Accelerate-wrapped one, so sharded
    models work too), ``model`` is the unwrapped FCMAE. ``channels``: the three (or one, shown gray)
    channels drawn as RGB. Returns one PIL image."""
    _, pred, _ = forward(imgs, mask)
    grid = model.grid(imgs)
    pred = pred.float()
    if model.norm_pix_loss:  # predictions are per-patch normalised: undo with the true patch statistics
        target = model.patchify(imgs.float())
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    pred = model.unpatchify(pred, grid)
    p = model.patch_size
    pix = mask.float().reshape(-1, 1, grid[0], 1, grid[1], 1).expand(-1, 1, grid[0], p, grid[1], p)
    pix = pix.reshape(-1, 1, imgs.shape[-2], imgs.shape[-1])
    imgs = imgs.float()
    rows = torch.cat([imgs, imgs * (1 - pix), pred, imgs * (1 - pix) + pred * pix], dim=-1)  # side by side
    panel = torch.cat(list(rows), dim=-2)  # images stacked vertically
    panel = panel.cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    panel = (panel[list(channels)].clamp(0, 1) * 255).round().byte()
    return Image.fromarray(panel.expand(3, -1, -1).permute(1, 2, 0).numpy())


def fixed_masks(model, imgs: torch.Tensor, seed: int) -> torch.Tensor:
    """The same masks at every call: drawn from a generator seeded with ``seed``."""
    h, w = model.grid(imgs)
    gen = torch.Generator().manual_seed(seed)
    return gen_random_mask(len(imgs), h * w, model.mask_ratio, generator=gen).to(imgs.device)


class Reconstructions:
    """``reconstructions/step_N.png`` of a fixed batch with fixed masks, every ``--recon-every`` steps."""

    def __init__(self, run, cfg):
        self.run, self.cfg = run, cfg
        self.imgs = data.recon_images(cfg.dataset, cfg.num_recon).to(run.device) if cfg.num_recon else None

    @torch.no_grad()
    def __call__(self) -> None:
        run, cfg = self.run, self.cfg
        if self.imgs is None or not due(run.pos.step, cfg.recon_every or cfg.save_every, run.sched.total):
            return
        run.model.eval()
        model = run.module
        with run.accelerator.autocast():
            panel = reconstruction_panel(
                run.model,
                model,
                self.imgs,
                fixed_masks(model, self.imgs, cfg.seed),
                cfg.mean or data.IMAGENET_DEFAULT_MEAN,
                cfg.std or data.IMAGENET_DEFAULT_STD,
                cfg.vis_channels,
            )
        if run.is_main:
            (run.out / "reconstructions").mkdir(parents=True, exist_ok=True)
            panel.save(run.out / "reconstructions" / f"step_{run.pos.step:08d}.png")
        run.model.train()
