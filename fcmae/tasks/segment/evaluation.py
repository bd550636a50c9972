"""Segmentation's evaluation: mmseg's inference modes (whole image, sliding window, multi-scale +
flip), scoring (a confusion matrix on the device -> mIoU, mAcc, aAcc as mmseg's IoUMetric), the
evaluation inside a run, and ``--eval-only``.

Validation images are split rank::world_size without padding and the confusion matrices summed, so
each image counts once whatever the number of processes.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from ...weights.files import write_atomic_text
from .artifact import segmenter_metadata

IGNORE_INDEX = 255
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's ADE20K multi-scale test


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, (int, float)) else (int(v[0]), int(v[1]))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return (
        x
        if tuple(x.shape[-2:]) == tuple(size)
        else F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    )


def slide_logits(segmenter, imgs: torch.Tensor, crop, stride) -> torch.Tensor:
    """mmseg's slide_inference: crops of ``crop`` every ``stride`` (the last one flush with the border),
    each crop's logits added at its place and divided by how many crops cover each pixel."""
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    n, _, h, w = imgs.shape
    rows, cols = max(h - ch + sh - 1, 0) // sh + 1, max(w - cw + sw - 1, 0) // sw + 1
    total = count = None
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            logits = segmenter(pixel_values=imgs[:, :, y1:y2, x1:x2]).logits
            if total is None:  # float32 sums, whatever precision autocast gives the logits
                total = logits.new_zeros(n, logits.shape[1], h, w, dtype=torch.float32)
                count = logits.new_zeros(1, 1, h, w, dtype=torch.float32)
            total[:, :, y1:y2, x1:x2] += logits.float()
            count[:, :, y1:y2, x1:x2] += 1
    return total / count


@torch.no_grad()
def predict_logits(
    segmenter,
    imgs: torch.Tensor,
    mode: str = "whole",
    crop=None,
    stride=None,
    ms_ratios=None,
    flip: bool = False,
    out_size=None,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Class scores (N, K, H, W) for normalised images ``imgs`` (N, 3, h, w), at ``out_size`` (default
    the input size; pass the original label size to score as mmseg does).

    ``mode``: ``whole`` (one forward) or ``slide`` (``crop``, default 512, and ``stride``, default
    2/3 of the crop: mmseg's 341 at 512). Single scale without flip returns logits. With ``ms_ratios``
    (e.g. ``MS_RATIOS``) and/or ``flip``, each view (the input resized by a ratio, optionally mirrored)
    is predicted, its logits resized to ``out_size``, turned into probabilities and mirrored back, and
    the probabilities are averaged, as mmseg's aug_test does. mmseg resizes the original image per ratio;
    here the given input is resized, so views are a resampled resample."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"eval mode must be whole or slide; got {mode!r}.")
    h, w = imgs.shape[-2:]
    out_size = tuple(out_size) if out_size is not None else (h, w)
    crop = _pair(crop or 512)
    stride = _pair(stride) if stride is not None else (crop[0] * 2 // 3, crop[1] * 2 // 3)

    def single(x):
        return segmenter(pixel_values=x).logits if mode == "whole" else slide_logits(segmenter, x, crop, stride)

    if ms_ratios is None and not flip:
        scores = _resize(single(imgs), out_size)
    else:
        scores, views = 0, 0
        for r in ms_ratios or (1.0,):
            x = _resize(imgs, (int(h * r + 0.5), int(w * r + 0.5)))
            for mirrored in (False, True) if flip else (False,):
                s = _resize(single(x.flip(-1) if mirrored else x), out_size).softmax(1)
                scores, views = scores + (s.flip(-1) if mirrored else s), views + 1
        scores = scores / views
    if num_classes is not None and scores.shape[1] != num_classes:
        raise ValueError(f"The model predicts {scores.shape[1]} classes, not {num_classes}.")
    return scores


# ----------------------------------------------------------------------------- metrics


def confusion_matrix(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """(K, K) int64 counts, rows ground truth, columns prediction, on the inputs' device. Pixels labelled
    ``ignore_index`` count nowhere. A scatter-add into a fixed K*K + 1 bins (the last one for ignored
    pixels) instead of torch.bincount, which reads the input's min and max on the host (a device sync)."""
    k = num_classes
    label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
    index = torch.where(label == ignore_index, k * k, label * k + pred)
    counts = torch.zeros(k * k + 1, dtype=torch.long, device=pred.device)
    counts.scatter_add_(0, index, torch.ones_like(index))
    return counts[:-1].view(k, k)


def seg_metrics(conf: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """mmseg's IoUMetric from a summed confusion matrix, in percent: IoU = TP / (TP + FP + FN) and
    Acc = TP / (TP + FN) per class; a class with an empty denominator is NaN (IoU: absent from ground
    truth and prediction; Acc: absent from ground truth) and left out of the mean (np.nanmean).
    aAcc = all TP / all labelled pixels. Returns mIoU, mAcc, aAcc (floats) and per-class IoU, Acc
    (lists, NaN where undefined), with class names when given."""
    conf = conf.detach().double().cpu()
    tp, gt, pred = conf.diag(), conf.sum(1), conf.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = (tp / (gt + pred - tp)).numpy() * 100
        acc = (tp / gt).numpy() * 100
        out = {
            "mIoU": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
            "mAcc": float(np.nanmean(acc)) if not np.isnan(acc).all() else float("nan"),
            "aAcc": float(tp.sum() / gt.sum() * 100) if gt.sum() > 0 else float("nan"),
            "IoU": iou.tolist(),
            "Acc": acc.tolist(),
        }
    if class_names is not None:
        out["class_names"] = list(class_names)
    return out


@torch.no_grad()
def evaluate(accelerator: Accelerator, net, loader, cfg, names: list[str]) -> dict:
    """mIoU, mAcc, aAcc (percent), per-class IoU/Acc, and the images and labelled pixels scored, over
    all processes (each scores its own share; the confusion matrices are summed)."""
    k, device = len(names), accelerator.device
    conf = torch.zeros(k, k, dtype=torch.long, device=device)
    counts = torch.zeros(2, dtype=torch.long, device=device)  # images, unreadable images
    net.eval()
    for images, labels, ok in loader:
        for image, label in zip(images, labels):
            label = label.to(device)
            with accelerator.autocast():
                scores = predict_logits(
                    net,
                    image[None].to(device),
                    cfg.eval_mode,
                    crop=cfg.input_size,
                    ms_ratios=MS_RATIOS if cfg.eval_ms_flip else None,
                    flip=cfg.eval_ms_flip,
                    out_size=label.shape[-2:],
                    num_classes=k,
                )
            conf += confusion_matrix(scores.argmax(1)[0], label, k)
        counts += torch.stack([torch.tensor(len(images)), (~ok).sum()]).to(device)
    net.train()
    conf, counts = accelerator.reduce(conf, "sum"), accelerator.reduce(counts, "sum")
    return {
        **seg_metrics(conf, names),
        "val_images": int(counts[0]),
        "val_unreadable": int(counts[1]),
        "val_pixels": int(conf.sum()),
    }


def sync_buffers(run, net) -> None:
    """DDP broadcasts rank 0's BatchNorm statistics at the start of each training forward, so every
    rank's last forward leaves its own: evaluate every share with rank 0's, the ones exported."""
    if run.world > 1 and torch.distributed.is_initialized():
        for buffer in net.buffers():
            torch.distributed.broadcast(buffer, src=0)


def validate(run, net, loader, names: list[str]) -> dict:
    """Evaluate; log the metrics; write per_class_iou.json, last.safetensors and (if better) best.safetensors."""
    sync_buffers(run, net)
    pos, m = run.pos, evaluate(run.accelerator, net, loader, run.cfg, names)
    better = m["mIoU"] > pos.best["best_mIoU"]  # NaN (nothing labelled) is never better
    if better:
        pos.best.update(best_mIoU=m["mIoU"], best_step=pos.step)
    scores = {k: m[k] for k in ("mIoU", "mAcc", "aAcc", "val_images", "val_unreadable", "val_pixels")}
    run.log(dict(step=pos.step, **scores, **pos.best))
    run.say(
        f"step {pos.step}: mIoU {m['mIoU']:.2f} mAcc {m['mAcc']:.2f} aAcc {m['aAcc']:.2f} on {m['val_images']} "
        f"images (best {pos.best['best_mIoU']:.2f} at step {pos.best['best_step']})"
    )
    if run.is_main:
        rows = [{"class": n, "IoU": _finite(i), "Acc": _finite(a)} for n, i, a in zip(names, m["IoU"], m["Acc"])]
        write_atomic_text(
            run.out / "per_class_iou.json",
            json.dumps({"step": pos.step, "mIoU": _finite(m["mIoU"]), "classes": rows}, indent=1) + "\n",
        )
    for name in ("last.safetensors",) + (("best.safetensors",) if better else ()):
        cfg = run.cfg
        run.save_weights(
            name,
            segmenter_metadata(
                cfg.model,
                names,
                cfg.input_size,
                cfg.head_channels,
                eval_mode=cfg.eval_mode,
                reduce_zero_label=cfg.reduce_zero_label,
                step=pos.step,
                mIoU=m["mIoU"],
            ),
        )
    return scores


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x
