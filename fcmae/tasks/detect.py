"""Mask R-CNN (or Faster R-CNN, ``--no-masks``) object detection from a pretrained encoder: the
config, the loop, its COCO evaluation, ``--eval-only``, and the detector's export and load-back.

The defaults are the ConvNeXt Mask R-CNN 3x recipe (facebookresearch/ConvNeXt object_detection
configs; mmdetection's ConvNeXt-V2 project keeps the optimiser): AdamW lr 1e-4 (absolute), betas
(0.9, 0.999), weight decay 0.05, mmdetection's 'layer_wise' layer decay 0.95, 36 epochs with the lr
x 0.1 at epochs 27 and 33 after a linear warmup of 500 iterations, 2 images per GPU on 8 GPUs,
multi-scale training (short side 480..800, long side <= 1333), evaluation at 800 x 1333. Departures:
the warmup starts at lr 0 instead of lr x 0.001 (one warmup rule for every task), mixed precision
is bf16 rather than fp16, and ``--lr-milestones`` are read as fractions of ``--epochs`` so a run
shortened with ``--max-steps`` keeps the schedule's shape.

Augmentation is a pure function of (seed, epoch, index) (fcmae.data.detection) and drop path draws
from the RNGs reseeded at every optimizer step (fcmae.training.run), so a resumed run repeats the
uninterrupted one bit for bit. Validation images are split rank::world_size without padding, the
COCO results gathered and scored once by pycocotools on the main process, so each image counts once.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from safetensors.torch import load_file

from ..data import EpochLoader, EpochSampler, load_hub
from ..data import detection as det
from ..models.convnext import Block
from ..training.config import RunConfig, cli, help_field
from ..training.optim import backward_micro_batch, optimizer_step
from ..training.run import Health, Position, Schedule, due, micro_batches, start
from ..training.state import save_checkpoint
from ..weights import open_weights
from ..weights.files import save_safetensors, write_atomic_text
from ..weights.hub import push
from ..weights.source import find_weights, read_metadata
from . import detect_model as dm

FORMAT = "fcmae-detector"
WEIGHT_FILES = ("best.safetensors", "last.safetensors", "model.safetensors")


@dataclass
class DetectConfig(RunConfig):
    model: str | None = help_field("registered model name (default: the one --from-fcmae holds)")
    from_fcmae: str | None = help_field("pretrained encoder: any source finetune/run.py takes (a pretraining run, "
                                        "encoder/fcmae.safetensors, official/timm/transformers, hf-hub:); none: "
                                        "from scratch")
    input_size: int = help_field("training scale S: multiscale short side S x (480..800)/800, or the LSJ crop", 800)
    eval_size: int | None = help_field("evaluation short side (long side <= x 1333/800); default --input-size")
    jitter: str = help_field("multiscale (ConvNeXt 3x) | lsj (large-scale jitter, ConvNeXt-V2 mmdet config)",
                             "multiscale")
    masks: bool = help_field("Mask R-CNN; --no-masks: Faster R-CNN (boxes only)", True)
    drop_path: float = help_field("stochastic depth of the encoder (ConvNeXt-T/B 3x: 0.4)", 0.1)
    data: str | None = help_field("COCO 2017 layout: annotations/instances_{train,val}2017.json, {train,val}2017/")
    train_ann: str | None = help_field("COCO annotation JSON of the training images (overrides --data)")
    train_images: str | None = help_field("folder of the training images")
    val_ann: str | None = help_field("COCO annotation JSON of the validation images")
    val_images: str | None = help_field("folder of the validation images")
    dataset_name: str | None = help_field("Hub dataset id in the usual detection schema (image, objects.bbox/category)")
    train_split: str = "train"
    val_split: str = "validation"
    batch_size: int = help_field("per process (ConvNeXt 3x: 2 x 8 GPUs = 16)", 2)
    epochs: int = help_field("3x schedule: 36", 36)
    lr: float | None = help_field("absolute lr (ConvNeXt/mmdet: 1e-4); not scaled by the batch", 1e-4)
    warmup_steps: int | None = help_field("linear warmup (default: mmdet's 500, or a tenth of a shorter run)")
    lr_milestones: list[int] | None = field(default_factory=lambda: [27, 33], metadata={
        "help": "epochs of --epochs where the lr drops x 0.1 (3x: 27,33); none: cosine"})
    layer_decay: float = 0.95
    layer_decay_type: str = help_field("layer_wise (mmdet's ConvNeXt rule) | single (one id per block)", "layer_wise")
    eval_every: int | None = help_field("evaluate every N steps (and at the end)")
    mixed_precision: str = help_field("bf16 | fp16 | no (pass no on CPUs)", "bf16")
    save_every: int | None = help_field("checkpoint every N optimizer steps (and at the end)", 5000)
    log_every: int = 50
    output_dir: str = "outputs/detect"
    eval_only: bool = help_field("evaluate --checkpoint on the validation set and exit", False)
    checkpoint: str | None = help_field("--eval-only: a detection run dir or its best/last.safetensors")

    def check(self) -> None:
        if self.jitter not in det.JITTERS:
            raise ValueError(f"--jitter must be one of {', '.join(det.JITTERS)}; got {self.jitter!r}.")
        if self.layer_decay_type not in ("layer_wise", "single"):
            raise ValueError(f"--layer-decay-type must be layer_wise or single; got {self.layer_decay_type!r}.")
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError(f"--eval-every must be at least 1; got {self.eval_every}.")
        if self.eval_size is not None and self.eval_size < 32:
            raise ValueError(f"--eval-size must be at least 32; got {self.eval_size}.")
        if self.in_chans != 3 or self.mean is not None or self.std is not None:
            raise ValueError("Detection reads RGB images normalised with ImageNet's statistics: --in-chans, --mean "
                             "and --std are not supported here.")
        if self.eval_only != bool(self.checkpoint):
            raise ValueError("--eval-only needs --checkpoint (a detection run or its best.safetensors), and "
                             "--checkpoint is for --eval-only (to continue a run use --resume).")
        need = ("val",) if self.eval_only else ("train", "val")
        for split in need:
            ann, images = getattr(self, f"{split}_ann"), getattr(self, f"{split}_images")
            if not (self.data or self.dataset_name or (ann and images)):
                raise ValueError(f"Give the data: --data COCO_DIR, --dataset-name ID, or --{split}-ann JSON with "
                                 f"--{split}-images DIR.")


def load_split(cfg: DetectConfig, split: str, train: bool) -> det.DetectionDataset:
    """The ``train`` or ``val`` images: explicit --*-ann/--*-images, else a Hub dataset, else COCO 2017."""
    ann, images = getattr(cfg, f"{split}_ann"), getattr(cfg, f"{split}_images")
    common = dict(train=train, input_size=cfg.input_size, jitter=cfg.jitter, masks=cfg.masks, seed=cfg.seed)
    if ann or images or not cfg.dataset_name:
        if not (ann or cfg.data) or not (images or cfg.data):
            raise ValueError(f"Give both --{split}-ann and --{split}-images (or --data with the COCO 2017 layout).")
        ann = ann or Path(cfg.data) / "annotations" / f"instances_{split}2017.json"
        return det.DetectionDataset(det.load_coco(ann), image_dir=images or Path(cfg.data) / f"{split}2017", **common)
    hf = load_hub(cfg.dataset_name, cfg.dataset_config_name, cfg.train_split if train else cfg.val_split)
    return det.DetectionDataset(det.coco_from_hub(hf), hf=hf, **common)


def train_loader_of(ds: det.DetectionDataset, cfg: DetectConfig, world: int) -> EpochLoader:
    """Full batches in ``EpochSampler`` order (keys (index, epoch)); ``accelerate.prepare`` shards them."""
    if len(ds) // world // cfg.batch_size == 0:
        raise ValueError(f"{len(ds)} training images are too few for batch size {cfg.batch_size} on {world} "
                         "process(es). Lower --batch-size.")
    return EpochLoader(ds, sampler=EpochSampler(len(ds), cfg.seed), batch_size=cfg.batch_size, drop_last=True,
                       num_workers=cfg.num_workers, collate_fn=det.collate,
                       generator=torch.Generator().manual_seed(cfg.seed))


def build(cfg: DetectConfig, cats: det.CategoryMap):
    """(detector, encoder LoadReport or None): the encoder of ``--from-fcmae`` loaded strictly."""
    weights, name, what = None, cfg.model, f"--from-fcmae {cfg.from_fcmae}"
    if cfg.from_fcmae:
        try:
            weights = open_weights(cfg.from_fcmae)
        except (FileNotFoundError, ValueError, TypeError) as e:
            raise type(e)(f"{what}: {e}") from None
        name = name or weights.model_name(what)
    if name is None:
        raise ValueError("Name the model: --model NAME (e.g. convnextv2_tiny), or give --from-fcmae to take its model.")
    cfg.model = name
    net = dm.build_detector(name, cats.num_classes, cfg.eval_size or cfg.input_size, masks=cfg.masks,
                            drop_path=cfg.drop_path)
    return net, (dm.load_encoder_into(net, cfg.from_fcmae, what=what) if weights is not None else None)


def schedule(run, cfg: DetectConfig, batches: int) -> Schedule:
    """Warmup, then lr x 0.1 at each of ``--lr-milestones`` (fractions of ``--epochs`` of the run:
    mmdetection's MultiStepLR at epochs 27 and 33 of 36), or cosine without milestones."""
    total = cfg.max_steps or cfg.epochs * (batches // cfg.grad_accum)
    if cfg.warmup_steps is None:  # mmdet's 500 of ~270k; a short run would otherwise never reach its lr
        cfg.warmup_steps = min(500, total // 10)
    if cfg.lr_milestones is None:
        return run.schedule(batches, kind="cosine")
    return run.schedule(batches, kind="step", milestones=[round(m / cfg.epochs * total) for m in cfg.lr_milestones])


class LossParts:
    """torchvision's loss dict summed on the device between log rows: no host sync per step."""

    def __init__(self):
        self.names, self.sum = None, None

    def total(self, parts: dict) -> torch.Tensor:
        values = torch.stack([v.float() for v in parts.values()])
        self.names = self.names or list(parts)
        self.sum = values.detach() if self.sum is None else self.sum + values.detach()
        return values.sum()

    def take(self, accelerator, n: int) -> dict:
        if self.sum is None:
            return {}
        mean = accelerator.reduce(self.sum, "sum") / (n * accelerator.num_processes)
        self.sum = None
        return dict(zip(self.names, mean.tolist()))


@torch.no_grad()
def evaluate(accelerator: Accelerator, net, val: det.DetectionDataset, masks: bool, gt) -> tuple[dict, list, list]:
    """(COCO metrics, bbox results, segm results): each process predicts images rank::world, the
    results are gathered, pycocotools scores them on the main process, the metrics are broadcast."""
    rank, world, label_to_cat = accelerator.process_index, accelerator.num_processes, val.categories.label_to_cat
    ids, bbox, segm = [], [], []
    net.eval()
    for i in range(rank, len(val), world):
        image, target = val[i]
        with accelerator.autocast():
            out = net([image.to(accelerator.device)])
        b, s = det.coco_results(out, [target["image_id"]], label_to_cat, masks)
        ids.append(target["image_id"])
        bbox += b
        segm += s
    net.train()
    shares = gather_object([(ids, bbox, segm)])
    ids, bbox, segm = ([x for share in shares for x in share[k]] for k in range(3))
    metrics = [det.coco_evaluate(gt, bbox, segm if masks else None, image_ids=ids) if accelerator.is_main_process
               else None]
    metrics = broadcast_object_list(metrics) if world > 1 else metrics
    return {**metrics[0], "val_images": len(set(ids))}, bbox, segm


def export(run, model, name: str, cats: det.CategoryMap, **extra) -> None:
    state = run.accelerator.get_state_dict(model)  # a collective under FSDP: every rank calls it
    if run.is_main:
        cfg = run.cfg
        save_safetensors(state, run.out / name, {k: str(v) for k, v in dict(
            format=FORMAT, model=cfg.model, num_classes=cats.num_classes, categories=json.dumps(cats.to_dict()),
            input_size=cfg.eval_size or cfg.input_size, train_size=cfg.input_size, masks=json.dumps(cfg.masks),
            **extra).items()})


def validate(run, model, net, val, gt, pos: Position, cats: det.CategoryMap) -> dict:
    """Evaluate; log; write predictions/val_{bbox,segm}.json (original category ids), last and best."""
    m, bbox, segm = evaluate(run.accelerator, net, val, run.cfg.masks, gt)
    better = m["bbox_mAP"] > pos.best["best_bbox_mAP"]
    if better:
        pos.best.update(best_bbox_mAP=m["bbox_mAP"], best_step=pos.step)
    run.log(dict(step=pos.step, **m, **pos.best))
    run.say(f"step {pos.step}: bbox mAP {m['bbox_mAP']:.4f} AP50 {m['bbox_mAP_50']:.4f}"
            + (f" | segm mAP {m['segm_mAP']:.4f} AP50 {m['segm_mAP_50']:.4f}" if run.cfg.masks else "")
            + f" on {m['val_images']} images")
    if run.is_main:
        for kind, results in (("bbox", bbox), ("segm", segm if run.cfg.masks else None)):
            if results is not None:
                (run.out / "predictions").mkdir(exist_ok=True)
                write_atomic_text(run.out / "predictions" / f"val_{kind}.json", json.dumps(results))
    for name in ("last.safetensors",) + (("best.safetensors",) if better else ()):
        export(run, model, name, cats, step=pos.step, bbox_mAP=m["bbox_mAP"])
    return m


def detect(cfg: DetectConfig) -> Path:
    run = start(cfg, "fcmae-detect", wrap=(Block,))  # FSDP2 units: the encoder blocks
    train_ds, val_ds = load_split(cfg, "train", True), load_split(cfg, "val", False)
    cats, gt = train_ds.categories, det.as_coco(val_ds.coco) if run.is_main else None
    if val_ds.categories.cat_ids != cats.cat_ids:
        raise ValueError(f"The validation categories {val_ds.categories.cat_ids} differ from the training ones "
                         f"{cats.cat_ids}; the model predicts one set.")
    net, report = build(cfg, cats)
    run.say(f"{'Mask' if cfg.masks else 'Faster'} R-CNN {cfg.model}: {len(cats.cat_ids)} classes, {len(train_ds)} "
            f"train / {len(val_ds)} val images | encoder " + (f"from {cfg.from_fcmae}: {report}" if report else
                                                             "from scratch"))
    groups = dm.param_groups(net, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2))
    model, optimizer, train_loader = run.prepare(net, optimizer, train_loader_of(train_ds, cfg, run.world))
    sched = schedule(run, cfg, len(train_loader))
    pos = Position(best=dict(best_bbox_mAP=-1.0, best_step=-1))
    run.restore(pos)
    run.write_config(sched, pos, categories=cats.to_dict()["categories"],
                     lr_milestone_steps=list(sched.milestones or []),
                     dropped=dict(train_ds.dropped), encoder_load=report and dict(
                         layout=report.layout, missing=report.missing, ignored=report.ignored))
    if run.is_main:
        write_atomic_text(run.out / "categories.json", json.dumps(cats.to_dict(), indent=1) + "\n")
    health, parts, scores = Health(run, pos), LossParts(), {}
    model.train()
    while pos.step < sched.total:
        for (images, targets), last_micro in micro_batches(run, train_loader, pos, sched, optimizer):
            loss = backward_micro_batch(run.accelerator, model, lambda: parts.total(model(images, targets)),
                                        cfg.grad_accum, last_micro)
            health.add(loss, None, pos.step)
            if not last_micro:
                continue
            optimizer_step(run.accelerator, model, optimizer, cfg.clip_grad)
            run.end_step(pos, sched)
            if due(pos.step, cfg.log_every, sched.total):
                health.check(pos)
                n = (pos.step - health.since) * cfg.grad_accum
                mean_loss, ips = health.take_loss(pos)
                run.log(dict(step=pos.step, epoch=pos.epoch + pos.batch / sched.per_epoch, loss=mean_loss,
                             **parts.take(run.accelerator, n), lr=max(g["lr"] for g in optimizer.param_groups),
                             images_per_sec=ips))
            if due(pos.step, cfg.eval_every, sched.total):
                scores = validate(run, model, net, val_ds, gt, pos, cats)
            if due(pos.step, cfg.save_every, sched.total):
                health.check(pos)  # never checkpoint weights that saw a non-finite loss
                save_checkpoint(run.accelerator, run.out / "checkpoints", health.saved(pos), cfg.keep_last)
    run.finish(pos, net, **scores, dropped=dict(train_ds.dropped))
    run.say(f"done: best bbox mAP {pos.best['best_bbox_mAP']:.4f} at step {pos.best['best_step']}; outputs in "
            f"{run.out}")
    publish(run)
    del model, optimizer, train_loader, net
    run.close()
    return run.out


def publish(run) -> None:
    """``--push-to-hub``: the best weights (last if no evaluation scored) as an ``export_detector`` folder."""
    if run.cfg.push_to_hub and run.is_main:
        out = export_detector(run.out, run.out / "hub", overwrite=True)
        run.say(f"pushed to {push(out, run.cfg.push_to_hub, private=run.cfg.hub_private)}")


# ----------------------------------------------------------------------------- load-back, export, --eval-only

def load_detector(source) -> torch.nn.Module:
    """The detector saved in ``source`` (a detection run dir, its best/last.safetensors, or an
    ``export_detector`` folder), in eval mode. ``model.categories`` is its ``CategoryMap`` and
    ``model.info`` its metadata (model, input_size, masks, ...)."""
    path = find_weights(source, WEIGHT_FILES)
    config = path.with_name("config.json")
    meta = json.loads(config.read_text()) if path.name == "model.safetensors" and config.is_file() else \
        read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a detector saved by fcmae (format {meta.get('format')!r}); give a detection "
                         "run directory, its best.safetensors, or an exported detector folder.")
    cats = meta["categories"] if isinstance(meta["categories"], dict) else json.loads(meta["categories"])
    cats = det.CategoryMap([c["id"] for c in cats["categories"]], [c["name"] for c in cats["categories"]])
    masks = meta["masks"] if isinstance(meta["masks"], bool) else json.loads(meta["masks"])
    net = dm.build_detector(meta["model"], cats.num_classes, int(meta["input_size"]), masks=masks)
    net.load_state_dict(load_file(str(path)), strict=True)
    net.categories, net.info = cats, {**meta, "input_size": int(meta["input_size"]), "masks": masks, "path": str(path)}
    return net.eval()


def export_detector(checkpoint, out, overwrite: bool = False) -> Path:
    """``out``/model.safetensors, config.json (format, model, num_classes, categories, input_size,
    masks) and README.md (a model card with the two-line load-back) from a detection run or file."""
    net, out = load_detector(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or remove it.")
    out.mkdir(parents=True, exist_ok=True)
    src = Path(net.info["path"])
    shutil.copyfile(src, out / "model.safetensors")
    info = {"format": FORMAT, "model": net.info["model"], "num_classes": net.categories.num_classes,
            "categories": net.categories.to_dict(), "input_size": net.info["input_size"], "masks": net.info["masks"],
            **{k: net.info[k] for k in ("step", "bbox_mAP", "train_size") if k in net.info}}
    (out / "config.json").write_text(json.dumps(info, indent=1) + "\n")
    kind = "Mask R-CNN" if info["masks"] else "Faster R-CNN"
    names = ", ".join(net.categories.names)
    (out / "README.md").write_text(
        f"---\nlibrary_name: fcmae\ntags: [object-detection, convnextv2, fcmae, torchvision]\n---\n\n"
        f"# {kind} FPN on {info['model']}\n\ntorchvision's {kind} on a ConvNeXt FPN backbone whose encoder was "
        f"fine-tuned from FCMAE pretraining with fcmae. {len(net.categories.names)} classes: {names}. Evaluation "
        f"scale: short side {info['input_size']}." + (f" Validation box mAP: {float(info['bbox_mAP']):.4f}."
                                                     if "bbox_mAP" in info else "")
        + "\n\n## Use\n\n```python\nfrom fcmae.tasks.detect import load_detector\nmodel = load_detector(\"DIR\")  "
        "# eval mode; model([image (3, H, W) in [0, 1]]) -> boxes, labels, scores"
        + (", masks" if info["masks"] else "") + "\n```\n\nLabels are 1..K; `model.categories.label_to_cat` maps "
        "them to the dataset's category ids.\n")
    return out


def evaluate_checkpoint(cfg: DetectConfig) -> dict:
    """``--eval-only``: the COCO metrics of ``cfg.checkpoint`` on the validation set (each process
    predicts its share); printed as JSON, nothing written."""
    cfg.validate()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    net = load_detector(cfg.checkpoint).to(accelerator.device)
    cfg.masks = net.info["masks"]
    val = load_split(cfg, "val", False)
    gt = det.as_coco(val.coco) if accelerator.is_main_process else None
    m, _, _ = evaluate(accelerator, net, val, cfg.masks, gt)
    accelerator.print(json.dumps({"checkpoint": str(cfg.checkpoint), **m}))
    del net
    accelerator.end_training()
    return m


def main(argv: list[str] | None = None, description: str = "") -> None:
    cli(DetectConfig, lambda cfg: evaluate_checkpoint(cfg) if cfg.eval_only else detect(cfg), argv,
        description=description or __doc__)
