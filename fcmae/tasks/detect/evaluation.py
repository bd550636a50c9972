"""Detection's evaluation: COCO results from torchvision's outputs, pycocotools' COCOeval, the
evaluation inside a run, and ``--eval-only``.

Validation images are split rank::world_size without padding, the COCO results gathered and scored
once by pycocotools on the main process, so each image counts once.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ...data import detection as det
from ...weights.files import write_atomic_text
from .artifact import detector_metadata

log = logging.getLogger(__name__)

METRICS = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")  # COCOeval stats[0:6], mmdetection's names


def coco_results(outputs, image_ids, label_to_cat: dict[int, int], masks: bool = True) -> tuple[list, list]:
    """COCO results (bbox, segm) from torchvision's eval outputs (boxes xyxy in original image
    coordinates, labels, scores, masks (N, 1, H, W) probabilities). Boxes become x, y, w, h;
    labels the original category ids; masks are thresholded at 0.5 (torchvision's references and
    mmdetection) and RLE-encoded with string counts, ready for JSON."""
    bbox, segm = [], []
    for out, image_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().float().cpu()
        boxes[:, 2:] -= boxes[:, :2]
        scores = out["scores"].detach().float().cpu().tolist()
        cats = [label_to_cat[int(label)] for label in out["labels"]]
        for b, s, c in zip(boxes.tolist(), scores, cats):
            bbox.append({"image_id": int(image_id), "category_id": c, "bbox": b, "score": s})
        if masks and "masks" in out and len(cats):
            binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            for rle, s, c in zip(mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))), scores, cats):
                rle["counts"] = rle["counts"].decode("ascii")
                segm.append({"image_id": int(image_id), "category_id": c, "segmentation": rle, "score": s})
    return bbox, segm


def as_coco(gt) -> COCO:
    """A pycocotools COCO from a COCO object, a dict or a path (its index printout silenced)."""
    if isinstance(gt, COCO):
        return gt
    coco = COCO()
    coco.dataset = {k: v for k, v in det.load_coco(gt if isinstance(gt, dict) else os.fspath(gt)).items()}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_evaluate(gt, bbox_results: list | None, segm_results: list | None = None, image_ids=None) -> dict[str, float]:
    """pycocotools COCOeval of the results against ``gt`` (COCO, dict or path): ``bbox_mAP``,
    ``bbox_mAP_50``, ``_75``, ``_s``, ``_m``, ``_l`` and the same for ``segm_`` (fractions; -1
    where the ground truth has nothing to find, as pycocotools). ``None`` skips a type; an empty
    list scores 0. ``image_ids`` limits the evaluation to those images (default: all)."""
    coco_gt = as_coco(gt)
    metrics = {}
    for iou_type, results in (("bbox", bbox_results), ("segm", segm_results)):
        if results is None:
            continue
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            if results:  # loadRes adds keys to the dicts it is given: hand it copies
                coco_dt = coco_gt.loadRes([dict(r) for r in results])
            else:  # loadRes fails on an empty list; an empty result set scores 0 where there is ground truth
                coco_dt = COCO()
                coco_dt.dataset = {
                    "images": coco_gt.dataset["images"],
                    "categories": coco_gt.dataset["categories"],
                    "annotations": [],
                }
                coco_dt.createIndex()
            ev = COCOeval(coco_gt, coco_dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = sorted({int(i) for i in image_ids})
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        log.info("COCO %s:\n%s", iou_type, text.getvalue().split("DONE")[-1].strip())
        metrics.update({f"{iou_type}_{m}": float(s) for m, s in zip(METRICS, ev.stats[:6])})
    return metrics


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
        b, s = coco_results(out, [target["image_id"]], label_to_cat, masks)
        ids.append(target["image_id"])
        bbox += b
        segm += s
    net.train()
    shares = gather_object([(ids, bbox, segm)])
    ids, bbox, segm = ([x for share in shares for x in share[k]] for k in range(3))
    metrics = [coco_evaluate(gt, bbox, segm if masks else None, image_ids=ids) if accelerator.is_main_process else None]
    metrics = broadcast_object_list(metrics) if world > 1 else metrics
    return {**metrics[0], "val_images": len(set(ids))}, bbox, segm


def validate(run, net, val, gt, cats: det.CategoryMap) -> dict:
    """Evaluate; log; write predictions/val_{bbox,segm}.json (original category ids), last and best."""
    pos, (m, bbox, segm) = run.pos, evaluate(run.accelerator, net, val, run.cfg.masks, gt)
    better = m["bbox_mAP"] > pos.best["best_bbox_mAP"]
    if better:
        pos.best.update(best_bbox_mAP=m["bbox_mAP"], best_step=pos.step)
    run.log(dict(step=pos.step, **m, **pos.best))
    run.say(
        f"step {pos.step}: bbox mAP {m['bbox_mAP']:.4f} AP50 {m['bbox_mAP_50']:.4f}"
        + (f" | segm mAP {m['segm_mAP']:.4f} AP50 {m['segm_mAP_50']:.4f}" if run.cfg.masks else "")
        + f" on {m['val_images']} images"
    )
    if run.is_main:
        for kind, results in (("bbox", bbox), ("segm", segm if run.cfg.masks else None)):
            if results is not None:
                (run.out / "predictions").mkdir(exist_ok=True)
                write_atomic_text(run.out / "predictions" / f"val_{kind}.json", json.dumps(results))
    for name in ("last.safetensors",) + (("best.safetensors",) if better else ()):
        run.save_weights(name, detector_metadata(run.cfg, cats, step=pos.step, bbox_mAP=m["bbox_mAP"]))
    return m
