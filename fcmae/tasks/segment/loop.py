"""UPerNet semantic segmentation (``fcmae segment``): the loop over the training core. One process
per device (Accelerate).

Augmentation is a pure function of (seed, epoch, index) and dropout draws from the RNGs reseeded at
every optimizer step (fcmae.training.run), so a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...data import resolve_workers
from ...data import segmentation as seg
from ...training.optim import adamw
from ...training.run import Position, due, evaluate_only, launch
from .artifact import load_segmenter
from .config import SegmentConfig
from .evaluation import evaluate, validate
from .model import block_classes, build, lr_scale, model_name_of, train_loss


def segment(cfg: SegmentConfig) -> Path:
    return launch(cfg, "fcmae-segment", lambda run: train(run, cfg), wrap=block_classes())


def load_data(cfg: SegmentConfig, rank: int = 0, world: int = 1, train: bool = True):
    """(training set or None, validation set). This process's share of the validation label maps is
    checked now, so a bad one fails before training rather than at the first evaluation."""
    source = cfg.data or cfg.dataset_name

    def split(name: str, is_train: bool) -> seg.SegmentationImages:
        hf = seg.load_split(
            source,
            name,
            image_column=cfg.image_column,
            label_column=cfg.label_column,
            dataset_config_name=cfg.dataset_config_name,
        )
        return seg.SegmentationImages(
            hf,
            cfg.num_classes,
            cfg.input_size,
            is_train,
            cfg.seed,
            cfg.reduce_zero_label,
            cfg.max_bad_fraction,
            f"{source} {name}",
            cfg.photometric,
            cfg.ratio_range,
        )

    val = split(cfg.val_split, False)
    val.check_labels(range(rank, len(val), world))
    return (split(cfg.train_split, True) if train else None), val


def train(run, cfg: SegmentConfig) -> None:
    names = seg.class_names(cfg.num_classes, cfg.class_names)
    train_ds, val_ds = load_data(cfg, run.rank, run.world)
    net, report = build(cfg, names)
    cfg.model = model_name_of(net)
    run.say(
        f"UPerNet {cfg.model} on {cfg.data or cfg.dataset_name}: {len(names)} classes, {len(train_ds)} train / "
        f"{len(val_ds)} val images | encoder " + (f"from {cfg.from_fcmae}: {report}" if report else "from scratch")
    )
    if run.world > 1 and run.device.type == "cuda":  # mmseg's SyncBN: statistics over the global batch of 16
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(memory_format=torch.channels_last) if cfg.channels_last else net
    workers = resolve_workers(cfg.num_workers)
    train_loader = seg.build_train_loader(
        train_ds, cfg.batch_size, workers, cfg.seed, run.world, run.device.type == "cuda"
    )
    val_loader = seg.build_val_loader(val_ds, run.rank, run.world, num_workers=workers)  # not prepared
    model, _, train_loader = run.prepare(
        net, adamw(net, cfg, lr_scale(net, cfg.layer_decay, cfg.layer_decay_type)), train_loader
    )
    run.schedule(len(train_loader))
    run.begin(
        Position(best=dict(best_mIoU=-1.0, best_step=-1)),
        classes=names,
        encoder_load=report and dict(layout=report.layout, missing=report.missing, ignored=report.ignored),
    )
    scores = {}
    model.train()
    while run.training:
        for (imgs, labels, ok), last_micro in run.batches(train_loader):
            if cfg.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            run.backward(lambda: train_loss(model, net, imgs, labels, cfg.aux_weight), last_micro, ok)
            if not last_micro:
                continue
            run.step()
            if due(run.pos.step, cfg.eval_every, run.sched.total):
                scores = validate(run, net, val_loader, names)
            run.checkpoint_if_due()
    run.finish(net, **scores)
    run.say(
        f"done: best mIoU {run.pos.best['best_mIoU']:.2f} at step {run.pos.best['best_step']}. Outputs in {run.out}"
    )
    run.push(run.out)  # the best weights (last if no evaluation scored) as a transformers UperNet folder


def evaluate_checkpoint(cfg) -> dict:
    """``--eval-only``: the metrics of ``cfg.checkpoint`` on the validation split at the input size it
    was trained at (every process scores its share); prints them as JSON and writes nothing."""

    def run(accelerator) -> dict:
        net, meta = load_segmenter(cfg.checkpoint)
        names, cfg.input_size = json.loads(meta["class_names"]), int(meta["input_size"])  # the crop it trained at
        if len(names) != cfg.num_classes:
            raise ValueError(
                f"--checkpoint {cfg.checkpoint} predicts {len(names)} classes; --num-classes is {cfg.num_classes}."
            )
        _, val = load_data(cfg, accelerator.process_index, accelerator.num_processes, train=False)
        loader = seg.build_val_loader(
            val, accelerator.process_index, accelerator.num_processes, num_workers=cfg.num_workers or 0
        )
        m = evaluate(accelerator, net.to(accelerator.device), loader, cfg, names)
        return {
            "eval_mode": cfg.eval_mode,
            "ms_flip": cfg.eval_ms_flip,
            **{k: v for k, v in m.items() if k != "class_names"},
        }

    return evaluate_only(cfg, run)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from ...training.config import cli

    cli(
        SegmentConfig,
        lambda cfg: evaluate_checkpoint(cfg) if cfg.eval_only else segment(cfg),
        argv,
        description=USAGE,
        prog=prog,
    )


USAGE = """Semantic segmentation (UperNet) fine-tuning from a pretrained encoder, and its evaluation.

Usage:
    accelerate launch -m fcmae segment --config configs/segment/convnextv2_base_ade20k_512.yaml \\
        --from-fcmae outputs/pretrain --data /data/ADEChallengeData2016 --output-dir outputs/seg_base
    fcmae segment --config configs/segment/small_data.yaml --from-fcmae outputs/pretrain --data DIR \\
        --num-classes 3 --output-dir OUT
    fcmae segment --eval-only --checkpoint OUT --data DIR --eval-ms-flip      # as mmseg's tools/test.py
    fcmae predict photo.jpg photos/ --checkpoint OUT --out-dir preds          # palette PNG + overlay
    fcmae export --checkpoint OUT --format transformers --out hub/seg         # transformers UperNet
    fcmae segment --help            # every field; any of them is a flag

--from-fcmae: a pretraining output directory, encoder.safetensors, fcmae.safetensors, a checkpoint
directory, the official checkpoints, a timm or transformers export, or hf-hub:owner/name; --model is
read from it (without --from-fcmae, give --model: the encoder then starts from scratch).
--data: an ADE20K-layout folder (images/training/x.jpg with annotations/training/x.png, and
validation/), or split parquet/arrow files; --dataset-name ID: a Hub dataset (scene_parse_150) with
--image-column / --label-column. Label maps hold one class index per pixel; with --reduce-zero-label
(the default, as ADE20K) values 1..N are the classes and 0 is ignored, as 255 always is.

The defaults are mmsegmentation's ConvNeXt UPerNet ADE20K recipe (the config's docstring;
`fcmae segment --help` shows each value). On a CPU pass --mixed-precision no. Several GPUs use
SyncBatchNorm.

Outputs in --output-dir: config.yaml, log.jsonl (train rows: step, loss, lr; eval rows: mIoU, mAcc,
aAcc in percent, val_images, val_pixels, best_mIoU), per_class_iou.json (the latest evaluation),
best.safetensors and last.safetensors (with the model, class names and input size in their metadata),
checkpoints/step_N (resume exactly with --resume auto), final.yaml.
"""
