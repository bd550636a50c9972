"""Mask R-CNN (or Faster R-CNN, ``--no-masks``) object detection (``fcmae detect``): the loop over
the training core. One process per device (Accelerate).

Augmentation is a pure function of (seed, epoch, index) (fcmae.data.detection) and drop path draws
from the RNGs reseeded at every optimizer step (fcmae.training.run), so a resumed run repeats the
uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

from ...data import detection as det
from ...data import epoch_loader, load_hub, resolve_workers
from ...models.convnext import Block
from ...training.optim import adamw
from ...training.run import Position, due, evaluate_only, launch
from ...weights.files import write_atomic_text
from .artifact import load_detector
from .config import DetectConfig
from .evaluation import as_coco, evaluate, validate
from .model import build, lr_scale


def detect(cfg: DetectConfig) -> Path:
    return launch(cfg, "fcmae-detect", lambda run: train(run, cfg), wrap=(Block,))  # FSDP2: the encoder blocks


def load_split(cfg: DetectConfig, split: str, train: bool) -> det.DetectionDataset:
    """The ``train`` or ``val`` images: explicit --*-ann/--*-images, else a Hub dataset, else COCO 2017."""
    ann, images = getattr(cfg, f"{split}_ann"), getattr(cfg, f"{split}_images")
    common = dict(train=train, scale=cfg.task.train_scale, jitter=cfg.jitter, masks=cfg.masks, seed=cfg.seed)
    if ann or images or not cfg.dataset_name:
        if not (ann or cfg.data) or not (images or cfg.data):
            raise ValueError(f"Give both --{split}-ann and --{split}-images (or --data with the COCO 2017 layout).")
        ann = ann or Path(cfg.data) / "annotations" / f"instances_{split}2017.json"
        return det.DetectionDataset(det.load_coco(ann), image_dir=images or Path(cfg.data) / f"{split}2017", **common)
    hf = load_hub(cfg.dataset_name, cfg.dataset_config_name, cfg.train_split if train else cfg.val_split)
    return det.DetectionDataset(det.coco_from_hub(hf), hf=hf, **common)


def train(run, cfg: DetectConfig) -> None:
    train_ds, val_ds = load_split(cfg, "train", True), load_split(cfg, "val", False)
    cats, gt = train_ds.categories, as_coco(val_ds.coco) if run.is_main else None
    if val_ds.categories.cat_ids != cats.cat_ids:
        raise ValueError(
            f"The validation categories {val_ds.categories.cat_ids} differ from the training ones "
            f"{cats.cat_ids}; the model predicts one set."
        )
    if len(train_ds) // run.world // cfg.batch_size == 0:
        raise ValueError(
            f"{len(train_ds)} training images are too few for batch size {cfg.batch_size} on {run.world} "
            "process(es). Lower --batch-size."
        )
    net, report = build(cfg, cats)
    run.say(
        f"{'Mask' if cfg.masks else 'Faster'} R-CNN {cfg.model}: {len(cats.cat_ids)} classes, {len(train_ds)} "
        f"train / {len(val_ds)} val images | encoder "
        + (f"from {cfg.from_fcmae}: {report}" if report else "from scratch")
    )
    loader = epoch_loader(train_ds, cfg.batch_size, resolve_workers(cfg.num_workers), cfg.seed, collate_fn=det.collate)
    model, _, loader = run.prepare(net, adamw(net, cfg, lr_scale(net, cfg.layer_decay, cfg.layer_decay_type)), loader)
    run.schedule(len(loader))
    run.begin(
        Position(best=dict(best_bbox_mAP=-1.0, best_step=-1)),
        categories=cats.to_dict()["categories"],
        dropped=dict(train_ds.dropped),
        encoder_load=report and dict(layout=report.layout, missing=report.missing, ignored=report.ignored),
    )
    if run.is_main:
        write_atomic_text(run.out / "categories.json", json.dumps(cats.to_dict(), indent=1) + "\n")
    scores = {}
    model.train()
    while run.training:
        for (images, targets), last_micro in run.batches(loader):
            run.backward(lambda: model(images, targets), last_micro)  # torchvision's dict of loss parts
            if not last_micro:
                continue
            run.step()
            if due(run.pos.step, cfg.eval_every, run.sched.total):
                scores = validate(run, net, val_ds, gt, cats)
            run.checkpoint_if_due()
    run.finish(net, **scores, dropped=dict(train_ds.dropped))
    run.say(
        f"done: best bbox mAP {run.pos.best['best_bbox_mAP']:.4f} at step {run.pos.best['best_step']}; outputs "
        f"in {run.out}"
    )
    run.push(run.out)  # the best weights (last if no evaluation scored) as an exported detector folder


def evaluate_checkpoint(cfg) -> dict:
    """``--eval-only``: the COCO metrics of ``cfg.checkpoint`` on the validation set (each process
    predicts its share); printed as JSON, nothing written."""

    def run(accelerator) -> dict:
        net = load_detector(cfg.checkpoint).to(accelerator.device)
        cfg.masks = net.info["masks"]
        val = load_split(cfg, "val", False)
        gt = as_coco(val.coco) if accelerator.is_main_process else None
        return evaluate(accelerator, net, val, cfg.masks, gt)[0]

    return evaluate_only(cfg, run)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from ...training.config import cli

    cli(
        DetectConfig,
        lambda cfg: evaluate_checkpoint(cfg) if cfg.eval_only else detect(cfg),
        argv,
        description=USAGE,
        prog=prog,
    )


USAGE = """Object detection (Mask R-CNN FPN) fine-tuning from a pretrained encoder, and its evaluation.

Usage:
    accelerate launch -m fcmae detect --config configs/detect/convnextv2_base_coco_maskrcnn_3x.yaml \\
        --from-fcmae outputs/pretrain --data /data/coco --output-dir outputs/det_base
    fcmae detect --config configs/detect/small_data.yaml --from-fcmae outputs/pretrain \\
        --train-ann A.json --train-images DIR --val-ann B.json --val-images DIR --output-dir OUT
    fcmae detect --eval-only --checkpoint OUT --data /data/coco          # COCO metrics as JSON
    fcmae predict photo.jpg photos/ --checkpoint OUT --out-dir preds     # drawn PNG + JSON
    fcmae export --checkpoint OUT --out hub/det                          # weights, config, model card
    fcmae detect --help            # every field; any of them is a flag

--from-fcmae: a pretraining output directory, encoder.safetensors, fcmae.safetensors, a checkpoint
directory, the official checkpoints, a timm or transformers export, or hf-hub:owner/name; --model is
read from it (without --from-fcmae, give --model: the encoder then starts from scratch).
Data: --data DIR in the COCO 2017 layout (annotations/instances_{train,val}2017.json, train2017/,
val2017/), or --train-ann/--train-images/--val-ann/--val-images, or --dataset-name ID (a Hub dataset
with image and objects {bbox (x, y, w, h), category}). Category ids may be sparse: the model predicts
labels 1..K, and categories.json, config.yaml and the weights' metadata map them back to the ids.
--no-masks trains Faster R-CNN (boxes only). Sizes: --train-short-side (multiscale training),
--crop-size (--jitter lsj), --eval-short-side (--input-size and --eval-size: deprecated names).

The defaults are the ConvNeXt Mask R-CNN 3x recipe (the config's docstring; `fcmae detect --help`
shows each value). On a CPU pass --mixed-precision no.

Outputs in --output-dir: config.yaml, categories.json, log.jsonl (train rows: step, loss and its parts,
lr; eval rows: bbox_mAP, bbox_mAP_50, _75, _s, _m, _l and segm_* as fractions, val_images),
predictions/val_bbox.json and val_segm.json (the latest evaluation's detections, COCO results format,
original category ids), best.safetensors and last.safetensors (model, categories and sizes in their
metadata), checkpoints/step_N (resume exactly with --resume auto), final.yaml (with the annotations
left out of training: crowd, degenerate, without_mask).
"""
