"""The plain reference loops fcmae's downstream tasks are measured against: the field's own libraries,
used as their documentation shows, with nothing from fcmae but the generated data's layout (and,
for UperNet, fcmae's weight-name table to load the same encoder into transformers' backbone).

    python benchmarks/peer_loops.py detect --data DIR --encoder ENC.safetensors --steps 240 --size 256 \
        --seed 0 --out result.json
    python benchmarks/peer_loops.py segment --data DIR --encoder ENC.safetensors --steps 240 --size 256 \
        --num-classes 4 --seed 0 --out result.json

detect: torchvision's MaskRCNN on timm's convnextv2_atto (its four stage outputs through
``forward_intermediates``'s FeatureListNet, drop path 0.1) with torchvision's FeaturePyramidNetwork
and LastLevelMaxPool; every other MaskRCNN argument torchvision's default except min_size = the
image size (max_size x 1333/800). AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05 on >= 2-D
weights, no layer decay; linear warmup over a tenth of the steps, then x 0.1 at 27/36 and 33/36 of
them; horizontal flips only; batch 2; COCOeval (bbox and segm) on the validation set at the end.
segment: transformers' UperNetForSemanticSegmentation on a locally built ConvNextV2 backbone
(atto: depths 2, 2, 6, 2, widths 40..320, drop path 0.1; nothing downloaded), its own loss (auxiliary
FCN head 0.4), AdamW as above, warmup a tenth then linear decay to 0, horizontal flips only, whole-image
evaluation: mIoU (percent) over the classes from a confusion matrix on the validation set.
One thread (torch.set_num_threads(1)): the same as the fcmae runs it is compared with.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

DEPTHS, DIMS = (2, 2, 6, 2), (40, 80, 160, 320)  # convnextv2_atto


def _schedule(total: int, kind: str):
    warm = max(1, total // 10)
    miles = (round(27 / 36 * total), round(33 / 36 * total))

    def f(step):  # the lr factor for optimizer step `step` (0-based)
        if step < warm:
            return (step + 1) / warm
        if kind == "step":
            return 0.1 ** sum(step >= m for m in miles)
        return max(0.0, 1 - (step - warm) / max(1, total - warm))

    return f


def _adamw(model, lr, wd=0.05):
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}], lr=lr)


# ----------------------------------------------------------------------------- detection


def plain_detect(
    data, encoder=None, steps=240, size=256, seed=0, lr=1e-4, batch=2, drop_path=0.1, roi_per_image=512
) -> dict:
    import timm
    from PIL import Image
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    from safetensors.torch import load_file
    from timm.models._features import FeatureListNet
    from timm.models.convnext import checkpoint_filter_fn
    from torchvision.models.detection import MaskRCNN
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    from torchvision.transforms.functional import to_tensor

    torch.manual_seed(seed)
    data = Path(data)
    full = timm.create_model("convnextv2_atto", drop_path_rate=drop_path)
    if encoder:
        missing = full.load_state_dict(checkpoint_filter_fn(load_file(str(encoder)), full), strict=False).missing_keys
        assert all(k.startswith("head.") for k in missing), missing

    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = FeatureListNet(full, out_indices=(0, 1, 2, 3), flatten_sequential=True)
            self.fpn = FeaturePyramidNetwork(list(DIMS), 256, extra_blocks=LastLevelMaxPool())
            self.out_channels = 256

        def forward(self, x):
            return self.fpn({str(i): f for i, f in enumerate(self.body(x))})

    train, val = (COCO(str(data / "annotations" / f"instances_{s}2017.json")) for s in ("train", "val"))
    cat_to_label = {c: i + 1 for i, c in enumerate(sorted(train.getCatIds()))}
    label_to_cat = {v: k for k, v in cat_to_label.items()}
    model = MaskRCNN(
        Backbone(),
        num_classes=len(cat_to_label) + 1,
        min_size=size,
        max_size=round(size * 1333 / 800),
        box_batch_size_per_image=roi_per_image,
    )  # torchvision's default: 512

    def sample(coco, split, iid, flip):
        info = coco.imgs[iid]
        img = to_tensor(Image.open(data / f"{split}2017" / info["file_name"]).convert("RGB"))
        anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=iid)) if not a.get("iscrowd")]
        boxes = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            dtype=torch.float32,
        ).reshape(-1, 4)
        masks = (
            torch.from_numpy(np.stack([coco.annToMask(a) for a in anns]))
            if anns
            else torch.zeros(0, *img.shape[-2:], dtype=torch.uint8)
        )
        if flip:
            img, masks = img.flip(-1), masks.flip(-1)
            boxes = torch.stack([img.shape[-1] - boxes[:, 2], boxes[:, 1], img.shape[-1] - boxes[:, 0], boxes[:, 3]], 1)
        target = {
            "boxes": boxes,
            "labels": torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "masks": masks,
        }
        return img, target

    opt = _adamw(model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, "step"))
    rng, ids, order, t0, step = np.random.default_rng(seed), sorted(train.imgs), [], time.perf_counter(), 0
    model.train()
    while step < steps:
        if len(order) < batch:
            order = list(rng.permutation(ids))
        picked, order = order[:batch], order[batch:]
        images, targets = zip(*(sample(train, "train", int(i), rng.random() < 0.5) for i in picked))
        parts = model(list(images), list(targets))
        loss = sum(parts.values())
        if (step + 1) % 20 == 0:
            print(
                f"step {step + 1} loss {loss.item():.3f} " + " ".join(f"{k} {v.item():.3f}" for k, v in parts.items()),
                flush=True,
            )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
    train_s = time.perf_counter() - t0
    model.eval()
    bbox, segm = [], []
    with torch.no_grad():
        for iid in sorted(val.imgs):
            out = model([sample(val, "val", iid, False)[0]])[0]
            boxes = out["boxes"].clone()
            boxes[:, 2:] -= boxes[:, :2]
            binary = (out["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
            for b, s, lab, rle in zip(boxes.tolist(), out["scores"].tolist(), out["labels"].tolist(), rles):
                rle["counts"] = rle["counts"].decode("ascii")
                bbox.append({"image_id": iid, "category_id": label_to_cat[lab], "bbox": b, "score": s})
                segm.append({"image_id": iid, "category_id": label_to_cat[lab], "segmentation": rle, "score": s})
    result = {"steps": steps, "train_s": train_s, "wall_s": time.perf_counter() - t0}
    for kind, res in (("bbox", bbox), ("segm", segm)):
        if not res:
            result.update({f"{kind}_mAP": 0.0, f"{kind}_mAP_50": 0.0})
            continue
        ev = COCOeval(val, val.loadRes(res), kind)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        result.update({f"{kind}_mAP": float(ev.stats[0]), f"{kind}_mAP_50": float(ev.stats[1])})
    return result


# ----------------------------------------------------------------------------- segmentation


def plain_segment(
    data, encoder=None, steps=240, size=256, seed=0, lr=1e-4, batch=2, drop_path=0.1, num_classes=4, head_channels=512
) -> dict:
    from PIL import Image
    from transformers import ConvNextV2Config, UperNetConfig, UperNetForSemanticSegmentation

    torch.manual_seed(seed)
    data = Path(data)
    backbone = ConvNextV2Config(
        depths=list(DEPTHS),
        hidden_sizes=list(DIMS),
        drop_path_rate=drop_path,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    model = UperNetForSemanticSegmentation(
        UperNetConfig(
            backbone_config=backbone,
            num_labels=num_classes,
            hidden_size=head_channels,
            auxiliary_in_channels=DIMS[2],
            loss_ignore_index=255,
        )
    )
    if encoder:  # the same encoder as fcmae's arm; fcmae's table renames timm's names to transformers'
        from fcmae.tasks.segment.model import load_encoder_into

        load_encoder_into(model, str(encoder))
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def pairs(split):
        return [
            (p, data / "annotations" / split / f"{p.stem}.png") for p in sorted((data / "images" / split).glob("*.jpg"))
        ]

    def load(pair, flip=False):
        img = torch.from_numpy(np.array(Image.open(pair[0]).convert("RGB"))).permute(2, 0, 1).float() / 255
        lab = torch.from_numpy(np.array(Image.open(pair[1])).astype(np.int64))
        lab = torch.where(lab == 0, 255, lab - 1)  # ADE20K: 0 = other (ignored), 1..N -> 0..N-1
        if flip:
            img, lab = img.flip(-1), lab.flip(-1)
        return (img - mean) / std, lab

    train, val = pairs("training"), pairs("validation")
    opt = _adamw(model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(steps, "poly"))
    rng, order, t0, step = np.random.default_rng(seed), [], time.perf_counter(), 0
    model.train()
    while step < steps:
        if len(order) < batch:
            order = list(rng.permutation(len(train)))
        picked, order = order[:batch], order[batch:]
        images, labels = zip(*(load(train[i], rng.random() < 0.5) for i in picked))
        loss = model(pixel_values=torch.stack(images), labels=torch.stack(labels)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
    train_s = time.perf_counter() - t0
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for pair in val:
            img, lab = load(pair)
            pred = model(pixel_values=img[None]).logits.argmax(1)[0]
            keep = lab != 255
            conf += torch.bincount(lab[keep] * num_classes + pred[keep], minlength=num_classes**2).reshape(
                num_classes, num_classes
            )
    inter, union = conf.diag().float(), (conf.sum(0) + conf.sum(1) - conf.diag()).float()
    iou = inter / union
    return {
        "steps": steps,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t0,
        "mIoU": float(100 * iou[union > 0].mean()),
        "IoU": (100 * iou).tolist(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("detect", "segment"))
    p.add_argument("--data", required=True)
    p.add_argument("--encoder")
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--head-channels", type=int, default=512)
    p.add_argument("--roi-per-image", type=int, default=512, help="detect: RoIs sampled per image (torchvision 512)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    common = dict(encoder=a.encoder, steps=a.steps, size=a.size, seed=a.seed, lr=a.lr, batch=a.batch_size)
    r = (
        plain_detect(a.data, roi_per_image=a.roi_per_image, **common)
        if a.task == "detect"
        else plain_segment(a.data, num_classes=a.num_classes, head_channels=a.head_channels, **common)
    )
    print(json.dumps(r))
    if a.out:
        Path(a.out).write_text(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
