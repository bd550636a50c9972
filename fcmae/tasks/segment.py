"""UPerNet semantic segmentation from a pretrained encoder: the config, the loop, its evaluation and
``--eval-only``. One process per device (Accelerate).

The defaults are the official ConvNeXt UPerNet ADE20K recipe as mmsegmentation runs it
(``convnext-*_upernet_8xb2-amp-160k_ade20k-512x512``): AdamW lr 1e-4, weight decay 0.05, stage-wise
layer decay 0.9, 1500 warmup iterations then poly (power 1) to 0 over 160k iterations, 2 images per
GPU on 8 GPUs, crops of 512, an auxiliary FCN head weighted 0.4, sliding-window evaluation every 16k.
Two departures: the warmup starts at lr 0 instead of lr x 1e-6 (one schedule function for every task;
the difference is below 1e-10 of the lr), and mixed precision is bf16 rather than fp16 (no loss scaling).

Augmentation is a pure function of (seed, epoch, index) and dropout draws from the RNGs reseeded at
every optimizer step (fcmae.training.run), so a resumed run repeats the uninterrupted one bit for bit.
Validation images are split rank::world_size without padding and the confusion matrices summed, so
each image counts once whatever the number of processes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from ..data import segmentation as seg
from ..training.config import RunConfig, cli, help_field
from ..training.optim import backward_micro_batch
from ..training.run import Health, Position, due, micro_batches, start
from ..training.state import save_checkpoint
from ..weights import open_pretrained
from ..weights.files import save_safetensors, write_atomic_text
from ..weights.hub import push
from . import segment_model as sm
from . import segment_predict as sp


@dataclass
class SegmentConfig(RunConfig):
    # model
    model: str | None = help_field("registered model name (default: the one --from-fcmae holds)")
    from_fcmae: str | None = help_field("pretrained encoder: a pretraining run dir, encoder/fcmae.safetensors, a "
                                        "checkpoint dir, an official/timm/transformers checkpoint, hf-hub:owner/name; "
                                        "none: train from scratch")
    input_size: int = help_field("training crop S (train scale (4S, S), as mmseg's (2048, 512)); eval short side", 512)
    head_channels: int = help_field("UPerHead channels (mmseg 512)", 512)
    aux_weight: float = help_field("loss weight of the auxiliary FCN head on stage 3 (mmseg 0.4)", 0.4)
    # data
    data: str | None = help_field("ADE20K-layout folder (images/ and annotations/, training/ and validation/), "
                                  "or split parquet/arrow files")
    dataset_name: str | None = help_field("Hub dataset id with image and label-map columns (e.g. scene_parse_150)")
    label_column: str | None = help_field("column holding the label maps (default: annotation/label/... or the "
                                          "second Image column)")
    train_split: str = "train"
    val_split: str = "validation"
    num_classes: int = help_field("classes the model predicts (ADE20K: 150)", 150)
    class_names: str | None = help_field("text file, one class name per line (default: class 0..N-1)")
    reduce_zero_label: bool = help_field("maps store classes as 1..N and 0 = other (ignored), as ADE20K", True)
    # optimisation: mmseg's ConvNeXt UPerNet ADE20K recipe
    batch_size: int = help_field("per process (mmseg: 2 x 8 GPUs = 16)", 2)
    max_steps: int | None = help_field("optimizer steps (mmseg 160k); none: --epochs", 160000)
    lr: float | None = help_field("absolute lr (mmseg 1e-4); not scaled by the batch", 1e-4)
    warmup_steps: int | None = help_field("linear warmup (default: mmseg's 1500, or a tenth of a run shorter than "
                                          "15000 steps)")
    layer_decay: float = 0.9
    layer_decay_type: str = help_field("stage (mmseg's stage_wise for ConvNeXt) | single | group", "stage")
    # evaluation
    eval_every: int | None = help_field("validate every N steps (and at the end; mmseg 16k)", 16000)
    eval_mode: str = help_field("whole | slide (windows of input_size, stride 2/3 of it: mmseg's 341 at 512)", "slide")
    eval_ms_flip: bool = help_field("multi-scale (0.5..1.75) + flip evaluation, as mmseg's aug_test", False)
    # runtime
    mixed_precision: str = help_field("bf16 | fp16 | no (pass no on CPUs without fast bf16)", "bf16")
    save_every: int | None = help_field("checkpoint every N optimizer steps (and at the end)", 16000)
    log_every: int = 50
    output_dir: str = "outputs/segment"
    eval_only: bool = help_field("evaluate --checkpoint on the validation split and exit", False)
    checkpoint: str | None = help_field("--eval-only: a segmentation run dir or its best/last.safetensors")

    def check(self) -> None:
        if self.layer_decay_type not in ("stage", "single", "group"):
            raise ValueError(f"--layer-decay-type must be stage, single or group; got {self.layer_decay_type!r}.")
        if self.eval_mode not in ("whole", "slide"):
            raise ValueError(f"--eval-mode must be whole or slide; got {self.eval_mode!r}.")
        if not (self.data or self.dataset_name):
            raise ValueError("Give the data: --data DIR (ADE20K layout or split parquet files) or --dataset-name ID.")
        if not 1 < self.num_classes < seg.IGNORE_INDEX:
            raise ValueError(f"--num-classes must be 2..254 (label maps are 8-bit, 255 is ignored); got "
                             f"{self.num_classes}.")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"--eval-every must be at least 1; got {self.eval_every}.")
        if self.in_chans != 3 or self.mean is not None or self.std is not None:
            raise ValueError("Segmentation reads RGB images normalised with ImageNet's mean and std (the encoders' "
                             "pretraining statistics): --in-chans, --mean and --std are not supported here.")
        if self.eval_only != bool(self.checkpoint):
            raise ValueError("--eval-only needs --checkpoint (a segmentation run or its best.safetensors), and "
                             "--checkpoint is for --eval-only (to continue a run use --resume).")


def load_data(cfg: SegmentConfig, rank: int = 0, world: int = 1, train: bool = True):
    """(training set or None, validation set). This process's share of the validation label maps is
    checked now, so a bad one fails before training rather than at the first evaluation."""
    source = cfg.data or cfg.dataset_name

    def split(name: str, is_train: bool) -> seg.SegmentationImages:
        hf = seg.load_split(source, name, image_column=cfg.image_column, label_column=cfg.label_column,
                            dataset_config_name=cfg.dataset_config_name)
        return seg.SegmentationImages(hf, cfg.num_classes, cfg.input_size, is_train, cfg.seed, cfg.reduce_zero_label,
                                      cfg.max_bad_fraction, f"{source} {name}")

    val = split(cfg.val_split, False)
    val.check_labels(range(rank, len(val), world))
    return (split(cfg.train_split, True) if train else None), val


def build(cfg: SegmentConfig, names: list[str]):
    """(segmenter, encoder LoadReport or None): ``cfg.model`` (or the source's) with the encoder of
    ``cfg.from_fcmae`` loaded strictly; the heads and per-stage output norms fresh."""
    weights, name = open_pretrained(cfg.from_fcmae, cfg.model)
    net = sm.build_segmenter(name, len(names), cfg.head_channels, cfg.drop_path, cfg.aux_weight, class_names=names)
    try:
        report = sm.load_encoder_into(net, weights) if weights is not None else None
    except ValueError as e:
        raise ValueError(f"--from-fcmae {cfg.from_fcmae}: {e}") from None
    return net, report


def resolve_warmup(cfg: SegmentConfig, batches_per_epoch: int) -> None:
    if cfg.warmup_steps is None:  # mmseg's 1500 of 160k; a short run would otherwise never reach its lr
        total = cfg.max_steps or cfg.epochs * (batches_per_epoch // cfg.grad_accum)
        cfg.warmup_steps = min(1500, total // 10)


@torch.no_grad()
def evaluate(accelerator: Accelerator, net, loader, cfg: SegmentConfig, names: list[str]) -> dict:
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
                scores = sp.predict_logits(net, image[None].to(device), cfg.eval_mode, crop=cfg.input_size,
                                           ms_ratios=sp.MS_RATIOS if cfg.eval_ms_flip else None, flip=cfg.eval_ms_flip,
                                           out_size=label.shape[-2:], num_classes=k)
            conf += sp.confusion_matrix(scores.argmax(1)[0], label, k)
        counts += torch.stack([torch.tensor(len(images)), (~ok).sum()]).to(device)
    net.train()
    conf, counts = accelerator.reduce(conf, "sum"), accelerator.reduce(counts, "sum")
    return {**sp.seg_metrics(conf, names), "val_images": int(counts[0]), "val_unreadable": int(counts[1]),
            "val_pixels": int(conf.sum())}


def sync_buffers(run, net) -> None:
    """DDP broadcasts rank 0's BatchNorm statistics at the start of each training forward, so every
    rank's last forward leaves its own: evaluate every share with rank 0's, the ones exported."""
    if run.world > 1 and torch.distributed.is_initialized():
        for buffer in net.buffers():
            torch.distributed.broadcast(buffer, src=0)


def export(run, model, name: str, names: list[str], **extra) -> None:
    state = run.accelerator.get_state_dict(model)  # a collective under FSDP: every rank calls it
    if run.is_main:
        cfg = run.cfg
        save_safetensors(state, run.out / name, sm.segmenter_metadata(
            cfg.model, names, cfg.input_size, cfg.head_channels, eval_mode=cfg.eval_mode,
            reduce_zero_label=cfg.reduce_zero_label, **extra))


def validate(run, model, net, loader, pos: Position, names: list[str]) -> dict:
    """Evaluate; log the metrics; write per_class_iou.json, last.safetensors and (if better) best.safetensors."""
    sync_buffers(run, net)
    m = evaluate(run.accelerator, net, loader, run.cfg, names)
    better = m["mIoU"] > pos.best["best_mIoU"]  # NaN (nothing labelled) is never better
    if better:
        pos.best.update(best_mIoU=m["mIoU"], best_step=pos.step)
    scores = {k: m[k] for k in ("mIoU", "mAcc", "aAcc", "val_images", "val_unreadable", "val_pixels")}
    run.log(dict(step=pos.step, **scores, **pos.best))
    run.say(f"step {pos.step}: mIoU {m['mIoU']:.2f} mAcc {m['mAcc']:.2f} aAcc {m['aAcc']:.2f} on {m['val_images']} "
            f"images (best {pos.best['best_mIoU']:.2f} at step {pos.best['best_step']})")
    if run.is_main:
        rows = [{"class": n, "IoU": _finite(i), "Acc": _finite(a)} for n, i, a in zip(names, m["IoU"], m["Acc"])]
        write_atomic_text(run.out / "per_class_iou.json", json.dumps({"step": pos.step, "mIoU": _finite(m["mIoU"]),
                                                                      "classes": rows}, indent=1) + "\n")
    export(run, model, "last.safetensors", names, step=pos.step, mIoU=m["mIoU"])
    if better:
        export(run, model, "best.safetensors", names, step=pos.step, mIoU=m["mIoU"])
    return scores


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


def segment(cfg: SegmentConfig) -> Path:
    run = start(cfg, "fcmae-segment", wrap=sm.block_classes())
    names = seg.class_names(cfg.num_classes, cfg.class_names)
    train_ds, val_ds = load_data(cfg, run.rank, run.world)
    net, report = build(cfg, names)
    cfg.model = sm.model_name_of(net)
    run.say(f"UPerNet {cfg.model} on {cfg.data or cfg.dataset_name}: {len(names)} classes, {len(train_ds)} train / "
            f"{len(val_ds)} val images | encoder " + (f"from {cfg.from_fcmae}: {report}" if report else "from scratch"))
    if run.world > 1 and run.device.type == "cuda":  # mmseg's SyncBN: statistics over the global batch of 16
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(memory_format=torch.channels_last) if cfg.channels_last else net
    train_loader = seg.build_train_loader(train_ds, cfg.batch_size, cfg.num_workers, cfg.seed, run.world,
                                          run.device.type == "cuda")
    val_loader = seg.build_val_loader(val_ds, run.rank, run.world, num_workers=cfg.num_workers)  # not prepared
    groups = sm.param_groups(net, 0.0, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2))
    model, optimizer, train_loader = run.prepare(net, optimizer, train_loader)
    resolve_warmup(cfg, len(train_loader))
    sched = run.schedule(len(train_loader), kind="poly")
    pos = Position(best=dict(best_mIoU=-1.0, best_step=-1))
    run.restore(pos)
    run.write_config(sched, pos, classes=names, encoder_load=report and dict(
        layout=report.layout, missing=report.missing, ignored=report.ignored))
    health, scores = Health(run, pos), {}
    model.train()
    while pos.step < sched.total:
        for (imgs, labels, ok), last_micro in micro_batches(run, train_loader, pos, sched, optimizer):
            if cfg.channels_last:
                imgs = imgs.contiguous(memory_format=torch.channels_last)
            loss = backward_micro_batch(run.accelerator, model, lambda: sm.train_loss(model, net, imgs, labels,
                                                                                      cfg.aux_weight),
                                        cfg.grad_accum, last_micro)
            health.add(loss, ok, pos.step)
            if not last_micro:
                continue
            run.step(model, optimizer, pos, sched, health)
            if due(pos.step, cfg.eval_every, sched.total):
                scores = validate(run, model, net, val_loader, pos, names)
            if due(pos.step, cfg.save_every, sched.total):
                health.check(pos)  # never checkpoint weights that saw a non-finite loss
                save_checkpoint(run.accelerator, run.out / "checkpoints", health.saved(pos), cfg.keep_last)
    run.finish(pos, net, **scores)
    run.say(f"done: best mIoU {pos.best['best_mIoU']:.2f} at step {pos.best['best_step']}. Outputs in {run.out}")
    publish(run)
    del model, optimizer, train_loader, val_loader, net
    run.close()
    return run.out


def publish(run) -> None:
    """``--push-to-hub``: the best weights (last if no evaluation scored) as a transformers UperNet folder."""
    if run.cfg.push_to_hub and run.is_main:
        datasets = [run.cfg.dataset_name] if run.cfg.dataset_name else []
        out = sm.export_segmenter(run.out, run.out / "hub", overwrite=True,  # best, else last
                                  repo_id=run.cfg.push_to_hub, datasets=datasets)
        run.say(f"pushed to {push(out, run.cfg.push_to_hub, private=run.cfg.hub_private)}")


def evaluate_checkpoint(cfg: SegmentConfig) -> dict:
    """``--eval-only``: the metrics of ``cfg.checkpoint`` on the validation split at the input size it
    was trained at (every process scores its share); prints them as JSON and writes nothing."""
    cfg.validate()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    net, meta = sm.load_segmenter(cfg.checkpoint)
    names, cfg.input_size = json.loads(meta["class_names"]), int(meta["input_size"])  # the crop it was trained at
    if len(names) != cfg.num_classes:
        raise ValueError(f"--checkpoint {cfg.checkpoint} predicts {len(names)} classes; --num-classes is "
                         f"{cfg.num_classes}.")
    _, val = load_data(cfg, accelerator.process_index, accelerator.num_processes, train=False)
    loader = seg.build_val_loader(val, accelerator.process_index, accelerator.num_processes,
                                  num_workers=cfg.num_workers)
    m = evaluate(accelerator, net.to(accelerator.device), loader, cfg, names)
    accelerator.print(json.dumps({"checkpoint": str(cfg.checkpoint), "eval_mode": cfg.eval_mode,
                                  "ms_flip": cfg.eval_ms_flip, **{k: v for k, v in m.items() if k != "class_names"}}))
    del net, loader
    accelerator.end_training()
    return m


def main(argv: list[str] | None = None, description: str = "") -> None:
    cli(SegmentConfig, lambda cfg: evaluate_checkpoint(cfg) if cfg.eval_only else segment(cfg), argv,
        description=description or __doc__)
