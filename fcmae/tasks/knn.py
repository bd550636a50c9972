"""A label-free progress monitor for pretraining: weighted k-NN accuracy of the encoder's features.

FCMAE's loss says how well masked pixels are predicted, not how useful the features are. A k-NN
classifier on frozen features needs no training, so it can be run every few thousand steps on a
small labelled folder. It is DINO's evaluation (Caron et al. 2021, facebookresearch/dino
eval_knn.py, ``knn_classifier``): L2-normalised features, cosine similarity, the k = 20 most similar
training images vote for their class with weight exp(similarity / T), T = 0.07; top-1 accuracy in
percent. As in DINO, training and test images both get the evaluation transform (no augmentation).

Wiring, in the pretraining loop, after ``accelerator.prepare(...)`` of the training loader (so
that one stays the first prepared loader of the checkpoints)::

    knn = KnnMonitor.from_folder(cfg.knn_data, accelerator, cfg.input_size, cfg.batch_size)
    ...
    if step % cfg.knn_every == 0 or step == total:
        row = knn(accelerator.unwrap_model(model).encoder)   # every process calls it
        accelerator.log(row, step=step)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from ..models.convnext import Head


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk: int = 256) -> float:
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
        raise ValueError(f"features must be (N, D) and (M, D); got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}.")
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels) or not len(test_feats):
        raise ValueError(f"{len(train_feats)} train features for {len(train_labels)} labels, {len(test_feats)} "
                         f"test features for {len(test_labels)} labels; each needs one label, and test rows.")
    for labels in (train_labels, test_labels):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}.")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be at least 1 and temperature positive; got k={k}, temperature={temperature}.")
    k = min(k, len(train_feats))
    train = F.normalize(train_feats.float(), dim=1)
    correct = 0
    for start in range(0, len(test_feats), chunk):
        test = F.normalize(test_feats[start:start + chunk].float().to(device), dim=1)
        similarity, index = (test @ train.T).topk(k, dim=1)  # cosine similarity of unit vectors
        votes = torch.zeros(len(test), num_classes, device=device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start:start + chunk]).sum())
    return 100.0 * correct / len(test_feats)


def pooled_features(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(N, C) features of the dense encoder, unmasked: the global average of ``forward_features``,
    after the head's LayerNorm when the encoder has one (a classifier; its fc is not used). The
    FCMAE encoder has no head (its head is Identity): the plain average is its feature."""
    x = encoder.forward_features(images)
    if isinstance(getattr(encoder, "head", None), Head):
        return encoder.forward_head(x, pre_logits=True)
    return x.mean((2, 3))


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


@dataclass
class KnnData:
    """The fields ``fcmae.data.load_labelled`` and ``build_val_loader`` read."""
    data: str
    input_size: int = 224
    batch_size: int = 64
    num_workers: int = 0
    seed: int = 0
    max_bad_fraction: float = 0.01
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    label_column: str | None = None
    image_column: str | None = None
    crop_pct: float | None = None
    eval_batch_size: int | None = None
    in_chans: int = 3
    mean: list[float] | None = None
    std: list[float] | None = None
    channel_axis: str = "last"


class KnnMonitor:
    """``monitor(encoder) -> {'knn_acc1': percent}``: features of a labelled train and val split,
    then ``knn_accuracy``. Call it on every process (feature extraction is sharded and gathered)."""

    def __init__(self, train_loader, val_loader, num_classes: int, accelerator=None, k: int = 20,
                 temperature: float = 0.07):
        self.train_loader, self.val_loader, self.num_classes = train_loader, val_loader, num_classes
        self.accelerator, self.k, self.temperature = accelerator, k, temperature

    @classmethod
    def from_folder(cls, folder: str, accelerator=None, input_size: int = 224, batch_size: int = 64,
                    num_workers: int = 0, k: int = 20, temperature: float = 0.07, **fields) -> "KnnMonitor":
        """From a folder with train/ and val/ (or validation/) class sub-folders, or any source
        ``fcmae.data.load_labelled`` reads (extra keyword arguments are ``KnnData`` fields). Both splits
        get the evaluation transform (resize, centre crop, ImageNet normalisation)."""
        cfg = KnnData(data=str(folder), input_size=input_size, batch_size=batch_size, num_workers=num_workers, **fields)
        train, train_labels, val, val_labels, names = data.load_labelled(cfg)
        pin = accelerator is not None and accelerator.device.type == "cuda"
        loaders = [data.build_val_loader(cfg, ds, y, pin_memory=pin)
                   for ds, y in ((train, train_labels), (val, val_labels))]
        if accelerator is not None:
            loaders = [accelerator.prepare(loader) for loader in loaders]
        return cls(*loaders, len(names), accelerator, k, temperature)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        # fork_rng: the loaders' iterators draw a base seed from the global generator; the training
        # stream's random numbers stay as if the monitor had not run
        device = self.accelerator.device if self.accelerator is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            train = extract_features(encoder, self.train_loader, self.accelerator)
            val = extract_features(encoder, self.val_loader, self.accelerator)
        return {"knn_acc1": knn_accuracy(*train, *val, self.num_classes, self.k, self.temperature)}
