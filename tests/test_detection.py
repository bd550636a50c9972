"""Detection: COCO data (checks, edge cases, jitter), the ConvNeXt FPN backbone and its encoder load,
layer-wise decay, a Mask R-CNN step, and COCO evaluation checked against a separate COCOeval."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _setup_scales

from fcmae.data import EpochSampler
from fcmae.data.detection import CategoryMap, DetectionDataset, ann_to_mask, coco_from_hub, collate, load_coco
from fcmae.models import create_fcmae, create_model
from fcmae.tasks.detect.evaluation import coco_evaluate, coco_results
from fcmae.tasks.detect.model import build_detector, load_encoder_into, lr_scale
from fcmae.tasks.detect.predict import class_color, detection_records, draw_detections, write_detections
from fcmae.training.layer_decay import layer_id, num_layers
from fcmae.training.optim import param_groups
from fcmae.weights import load_checkpoint

CATS = [{"id": 7, "name": "disc"}, {"id": 2, "name": "square"}, {"id": 11, "name": "bar"}]  # sparse, unsorted
# fewer proposals and sampled RoIs than torchvision's defaults: the same code paths, a CPU test's cost
SMALL = dict(
    rpn_pre_nms_top_n_train=200,
    rpn_post_nms_top_n_train=200,
    rpn_pre_nms_top_n_test=200,
    rpn_post_nms_top_n_test=100,
    box_batch_size_per_image=64,
    box_detections_per_img=20,
)
SIZES = {10: (96, 128), 20: (128, 96), 30: (64, 64), 40: (128, 128), 50: (80, 112), 60: (96, 96)}  # id: (h, w)


def _rect(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _ellipse(cx, cy, rx, ry, n=16):
    angles = [2 * math.pi * t / n for t in range(n)]
    return [[v for a in angles for v in (cx + rx * math.cos(a), cy + ry * math.sin(a))]]


def _rle(h, w, y0, y1, x0, x1, compressed=True):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    if compressed:
        rle = mask_utils.encode(np.asfortranarray(m))
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    flat, counts, cur, run = m.flatten(order="F"), [], 0, 0  # column-major runs, starting with zeros
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    return {"size": [h, w], "counts": counts + [run]}


def _ann(i, image_id, cat, bbox, segm, crowd=0):
    return {
        "id": i,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "segmentation": segm,
        "area": float(bbox[2] * bbox[3]),
        "iscrowd": crowd,
    }


ANNS = [
    _ann(1, 10, 2, [10, 10, 30, 40], _rect(10, 10, 30, 40)),
    _ann(2, 10, 7, [60, 20, 40, 30], _ellipse(80, 35, 20, 15)),
    _ann(3, 20, 11, [20, 30, 40, 20], _rle(128, 96, 30, 50, 20, 60)),  # compressed RLE
    _ann(4, 20, 7, [50, 70, 30, 40], _rle(128, 96, 70, 110, 50, 80, compressed=False), crowd=1),
    _ann(5, 40, 2, [-10, 100, 50, 40], _rect(-10, 100, 50, 40)),  # partly outside: clipped to [0, 100, 40, 128]
    _ann(6, 50, 7, [30, 20, 0.5, 20], _rect(30, 20, 0.5, 20)),  # degenerate: 0.5 px wide
    _ann(7, 50, 11, [5, 40, 60, 12], _rect(5, 40, 60, 12)),
    _ann(8, 60, 2, [50, 10, 30, 30], _rect(50, 10, 30, 30)),
    _ann(9, 60, 11, [10, 60, 50, 20], _ellipse(35, 70, 25, 10)),
]  # image 30 has no annotations


@pytest.fixture
def coco_data(tmp_path):
    """A tiny COCO dataset: (annotation path, image folder)."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    images = []
    rng = np.random.default_rng(0)
    for image_id, (h, w) in SIZES.items():
        im = Image.fromarray(rng.integers(0, 60, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(im)
        for a in ANNS:
            if a["image_id"] == image_id:
                x, y, bw, bh = a["bbox"]
                draw.ellipse([x, y, x + bw, y + bh], fill=(200, 50 * (a["category_id"] % 5), 90))
        im.save(images_dir / f"{image_id:06d}.png")
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "height": h, "width": w})
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": ANNS, "categories": CATS}))
    return ann_path, images_dir


def _coco_api(path):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


# ----------------------------------------------------------------------------- data


def test_category_map_round_trips_sparse_ids():
    cm = CategoryMap.from_categories(CATS)
    assert cm.label_to_cat == {1: 2, 2: 7, 3: 11} and cm.num_classes == 4
    assert cm.class_names == ["__background__", "square", "disc", "bar"]
    assert all(cm.cat_to_label[cm.label_to_cat[k]] == k for k in (1, 2, 3))
    assert json.loads(json.dumps(cm.to_dict()))["categories"][2] == {"label": 3, "id": 11, "name": "bar"}


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c["annotations"][2].update(image_id=999), ["annotation 3", "image_id 999"]),
        (lambda c: c["annotations"][0].update(category_id=5), ["annotation 1", "category_id 5"]),
        (lambda c: c["annotations"][1].update(bbox=[60, 20, -4, 30]), ["annotation 2", "bbox"]),
        (lambda c: c["images"][3].update(width=-128), ["image 40", "width"]),
        (lambda c: c.pop("categories"), ["categories"]),
    ],
)
def test_malformed_annotations_name_the_problem(coco_data, change, words):
    coco = json.loads(coco_data[0].read_text())
    change(coco)
    with pytest.raises(ValueError) as e:
        load_coco(coco)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_files_raise_file_not_found(coco_data):
    ann_path, images_dir = coco_data
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(ann_path.parent / "nope.json")
    (images_dir / "000050.png").unlink()
    with pytest.raises(FileNotFoundError, match="000050.png"):
        DetectionDataset(load_coco(ann_path), images_dir)


def test_masks_decode_like_pycocotools(coco_data):
    api = _coco_api(coco_data[0])
    for a in ANNS:  # polygons, compressed RLE, uncompressed (crowd) RLE
        h, w = SIZES[a["image_id"]]
        np.testing.assert_array_equal(ann_to_mask(a["segmentation"], h, w), api.annToMask(api.anns[a["id"]]))


def test_eval_targets_handle_crowd_empty_clipped_and_degenerate(coco_data):
    ds = DetectionDataset(load_coco(coco_data[0]), coco_data[1], train=False)
    assert ds.dropped == {"crowd": 1, "degenerate": 1}
    by_id = {ds.images[i]["id"]: ds[i] for i in range(len(ds))}
    image, t = by_id[20]
    assert image.shape == (3, 128, 96) and image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1
    assert t["labels"].tolist() == [3] and t["boxes"].tolist() == [[20, 30, 60, 50]]  # crowd left out
    assert by_id[30][1]["boxes"].shape == (0, 4) and by_id[30][1]["labels"].shape == (0,)
    assert by_id[40][1]["boxes"].tolist() == [[0, 100, 40, 128]]  # clipped
    assert by_id[50][1]["labels"].tolist() == [3]  # the 0.5 px box dropped
    assert by_id[10][1]["labels"].tolist() == [1, 2] and by_id[10][1]["image_id"] == 10


def _mask_box(m):
    ys, xs = np.nonzero(m)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def test_multiscale_jitter_resizes_boxes_masks_and_image_together(coco_data):
    ann_path, images_dir = coco_data
    api, size = _coco_api(ann_path), 128
    ds = DetectionDataset(load_coco(ann_path), images_dir, train=True, scale=size, seed=3)
    allowed = {size * v / 800 for v in range(480, 801, 32)}
    flips = set()
    for epoch in range(4):
        for index in range(len(ds)):
            image, t = ds[(index, epoch)]
            im = ds.images[index]
            h, w = im["height"], im["width"]
            oh, ow = image.shape[-2:]
            assert min(oh, ow) in {round(a) for a in allowed} or max(oh, ow) == round(size * 1333 / 800)
            src = torch.from_numpy(np.asarray(Image.open(images_dir / im["file_name"]))).permute(2, 0, 1).float() / 255
            ref = F.interpolate(src[None], size=(oh, ow), mode="bilinear", antialias=True, align_corners=False)[0]
            flipped = not torch.allclose(image, ref, atol=1e-4)
            flips.add(flipped)
            torch.testing.assert_close(image, ref.flip(-1) if flipped else ref, atol=1e-4, rtol=0)
            anns = [a for a in api.imgToAnns[im["id"]] if not a["iscrowd"] and min(a["bbox"][2:]) >= 1]
            assert t["labels"].tolist() == [ds.categories.cat_to_label[a["category_id"]] for a in anns]
            for a, box, m in zip(anns, t["boxes"].numpy(), t["masks"].numpy()):
                x, y, bw, bh = a["bbox"]
                exp = np.array([max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)])
                exp = exp * [ow / w, oh / h, ow / w, oh / h]
                if flipped:
                    exp = np.array([ow - exp[2], exp[1], ow - exp[0], exp[3]])
                np.testing.assert_allclose(box, exp, atol=1e-3)
                ref_m = torch.from_numpy(api.annToMask(a))[None, None].float()
                ref_m = F.interpolate(ref_m, size=(oh, ow), mode="nearest")[0, 0]
                np.testing.assert_array_equal(m, (ref_m.flip(-1) if flipped else ref_m).numpy().astype(np.uint8))
        assert torch.equal(ds[(1, epoch)][0], ds[(1, epoch)][0])  # a pure function of (seed, epoch, index)
    assert flips == {True, False}


def test_fixed_jitter_trains_at_the_evaluation_scale_with_flips_only(coco_data):
    ann_path, images_dir = coco_data
    size = 96
    ds = DetectionDataset(load_coco(ann_path), images_dir, train=True, scale=size, jitter="fixed", seed=1)
    plain = DetectionDataset(load_coco(ann_path), images_dir, train=False)
    flips = set()
    for epoch in range(4):
        for index in range(len(ds)):
            image, t = ds[(index, epoch)]
            im = ds.images[index]
            scale = min(size / min(im["height"], im["width"]), size * 1333 / 800 / max(im["height"], im["width"]))
            assert tuple(image.shape[-2:]) == (round(im["height"] * scale), round(im["width"] * scale))
            ref = F.interpolate(plain[index][0][None], size=image.shape[-2:], mode="bilinear", antialias=True)[0]
            flipped = not torch.allclose(image, ref, atol=1e-4)
            flips.add(flipped)
            torch.testing.assert_close(image, ref.flip(-1) if flipped else ref, atol=1e-4, rtol=0)
            assert t["masks"].shape[-2:] == image.shape[-2:]
    assert flips == {True, False}


def test_lsj_crops_to_input_size_and_keeps_boxes_on_masks(coco_data):
    ds = DetectionDataset(load_coco(coco_data[0]), coco_data[1], train=True, scale=64, jitter="lsj")
    shapes = set()
    for epoch in range(6):
        for index in range(len(ds)):
            image, t = ds[(index, epoch)]
            shapes.add(tuple(image.shape[-2:]))
            assert max(image.shape[-2:]) <= 64 and t["masks"].shape[-2:] == image.shape[-2:]
            for box, m in zip(t["boxes"].numpy(), t["masks"].numpy()):
                assert box[2] > box[0] and box[3] > box[1]
                if m.any():  # the mask lies inside its (clipped) box, to a pixel of rounding
                    mb = _mask_box(m)
                    assert (mb[:2] >= box[:2] - 1.5).all() and (mb[2:] <= box[2:] + 1.5).all()
    assert (64, 64) in shapes and any(max(s) < 64 for s in shapes)  # both cropped and shrunk samples


def test_epoch_sampler_keys_and_collate(coco_data):
    ds = DetectionDataset(load_coco(coco_data[0]), coco_data[1], train=True, scale=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=EpochSampler(len(ds), seed=1), collate_fn=collate)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and len(images) == 3 and all(im.ndim == 3 for im in images)
    assert all(set(t) == {"boxes", "labels", "masks", "image_id"} for t in targets)


def test_hub_schema_adapter_from_local_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    rows, names = [], ["cat", "dog"]
    for i, (h, w) in enumerate([(64, 96), (80, 64), (64, 64)]):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        objs = [{"bbox": [4.0, 6.0, 20.0, 10.0 + i], "category": i % 2, "segmentation": _rect(4, 6, 20, 10 + i)}]
        rows.append(
            {"image": {"bytes": buf.getvalue(), "path": None}, "image_id": 100 + i, "objects": objs if i < 2 else []}
        )
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": datasets.Value("int64"),
            "objects": datasets.List(
                {
                    "bbox": datasets.List(datasets.Value("float32"), length=4),
                    "category": datasets.ClassLabel(names=names),
                    "segmentation": datasets.List(datasets.List(datasets.Value("float32"))),
                }
            ),
        }
    )
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    hf = datasets.load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train")
    coco = coco_from_hub(hf)
    assert coco["categories"] == [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}]
    sizes = [(im["id"], im["width"], im["height"]) for im in coco["images"]]
    assert sizes == [(100, 96, 64), (101, 64, 80), (102, 64, 64)]  # read from the image headers
    ds = DetectionDataset(coco, hf=hf, train=False)
    image, t = ds[1]
    assert image.shape == (3, 80, 64) and t["image_id"] == 101
    assert t["boxes"].tolist() == [[4, 6, 24, 17]] and t["labels"].tolist() == [2]  # category 1 -> label 2
    image, t = DetectionDataset(coco, hf=hf, train=True, scale=64)[(0, 0)]
    assert t["masks"].shape[0] == 1 and t["masks"].shape[-2:] == image.shape[-2:]


# ----------------------------------------------------------------------------- model


def _fcmae_checkpoint(tmp_path, name="convnextv2_atto"):
    fcmae = create_fcmae(name)
    with torch.no_grad():
        for n, p in fcmae.named_parameters():
            if ".grn." in n:  # GRN starts at zero: give it values so that it matters
                p.normal_(0, 0.5)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": fcmae.state_dict(), "epoch": 3}, path)
    return fcmae, path


def test_backbone_outputs_equal_forward_intermediates_after_load(tmp_path):
    fcmae, path = _fcmae_checkpoint(tmp_path)
    detector = build_detector("convnextv2_atto", num_classes=4, min_size=128).eval()
    report = load_encoder_into(detector, path)
    assert report.missing == []
    body = detector.backbone.body
    assert set(body.state_dict()) == set(fcmae.encoder.state_dict())  # nothing missing or unexpected
    dense = create_model("convnextv2_atto", num_classes=0)
    load_checkpoint(dense, path)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        outs, ref = body.forward_intermediates(x), dense.forward_intermediates(x)
        direct = fcmae.encoder.forward_intermediates(x)
        for o, r, d, s in zip(outs, ref, direct, (4, 8, 16, 32)):
            assert o.shape[-2:] == (96 // s, 128 // s)
            torch.testing.assert_close(o, r, atol=0, rtol=0)
            torch.testing.assert_close(o, d, atol=1e-5, rtol=1e-5)
        feats = detector.backbone(x)
        normed = {
            str(i): F.layer_norm(f.permute(0, 2, 3, 1), f.shape[1:2], n.weight, n.bias, 1e-6).permute(0, 3, 1, 2)
            for i, (f, n) in enumerate(zip(ref, detector.backbone.norms))
        }
        expected = detector.backbone.fpn(normed)
    assert list(feats) == ["0", "1", "2", "3", "pool"] and feats["pool"].shape[-2:] == (2, 2)
    for k in feats:
        assert feats[k].shape[1] == 256
        torch.testing.assert_close(feats[k], expected[k])


def test_encoder_load_drops_a_classifier_and_refuses_another_model(tmp_path):
    clf = create_model("convnextv2_atto", num_classes=10)
    torch.save(clf.state_dict(), tmp_path / "clf.pth")
    detector = build_detector("convnextv2_atto", num_classes=4, min_size=64)
    report = load_encoder_into(detector, tmp_path / "clf.pth")
    assert sorted(report.ignored) == ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]
    torch.testing.assert_close(detector.backbone.body.stem[0].weight, clf.stem[0].weight)
    torch.save(create_model("convnextv2_femto", num_classes=0).state_dict(), tmp_path / "femto.pth")
    with pytest.raises(ValueError, match="convnextv2_femto"):
        load_encoder_into(detector, tmp_path / "femto.pth")


def test_rgb_encoder_into_a_four_channel_backbone_adapts_the_stem(tmp_path):
    from timm.models import adapt_input_conv

    rgb = create_model("convnextv2_atto", num_classes=0)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pth")
    with pytest.raises(ValueError, match="image_mean"):
        build_detector("convnextv2_atto", num_classes=3, min_size=64, in_chans=4)
    detector = build_detector(
        "convnextv2_atto", num_classes=3, min_size=64, in_chans=4, image_mean=[0.5] * 4, image_std=[0.25] * 4
    )
    load_encoder_into(detector, tmp_path / "rgb.pth")
    torch.testing.assert_close(detector.backbone.body.stem[0].weight, adapt_input_conv(4, rgb.stem[0].weight))
    torch.testing.assert_close(
        detector.backbone.body.stages[3].blocks[1].mlp.fc2.weight, rgb.stages[3].blocks[1].mlp.fc2.weight
    )


def test_layer_decay_matches_the_detection_configs():
    d = 0.95
    detector = build_detector("convnextv2_atto", num_classes=4, min_size=64, masks=False)
    groups = param_groups(detector, 0.05, lr_scale(detector, d))
    scale, wd = {}, {}
    for g in groups:
        for p in g["params"]:
            scale[id(p)], wd[id(p)] = g["lr_scale"], g["weight_decay"]
    named = dict(detector.named_parameters())
    assert len(scale) == len(named)  # every trainable parameter, once
    # atto (2, 2, 6, 2): L = 3 + 6 / 3 = 5, scale d ** (L + 1 - id), by hand
    expect = {
        "backbone.body.stem.0.weight": d**6,
        "backbone.body.stages.0.blocks.1.conv_dw.weight": d**5,
        "backbone.body.stages.1.downsample.1.weight": d**4,
        "backbone.body.stages.2.downsample.1.weight": d**3,
        "backbone.body.stages.2.blocks.2.mlp.fc1.weight": d**3,
        "backbone.body.stages.2.blocks.5.mlp.fc2.weight": d**2,
        "backbone.body.stages.3.downsample.1.weight": d,
        "backbone.body.stages.3.blocks.1.mlp.fc1.weight": d,
        "backbone.norms.3.weight": 1.0,
        "backbone.fpn.inner_blocks.0.0.weight": 1.0,
        "roi_heads.box_predictor.cls_score.weight": 1.0,
        "rpn.head.conv.0.0.weight": 1.0,
    }
    for n, s in expect.items():
        assert scale[id(named[n])] == pytest.approx(s), n
    for n, decayed in [
        ("backbone.body.stages.2.blocks.0.mlp.grn.weight", False),
        ("backbone.body.stem.0.bias", False),
        ("backbone.norms.0.weight", False),
        ("backbone.body.stages.2.blocks.0.mlp.fc1.weight", True),
        ("backbone.fpn.layer_blocks.1.0.weight", True),
        ("roi_heads.box_head.fc6.bias", False),
    ]:
        assert wd[id(named[n])] == (0.05 if decayed else 0.0), n
    # the official configs: tiny num_layers 6 (stem d ** 7), base 12 (stem d ** 13, last stage-3 block d ** 2)
    tiny, base = (3, 3, 9, 3), (3, 3, 27, 3)
    for name, depths, power in [
        ("stem.0.weight", tiny, 7),
        ("stages.2.blocks.8.conv_dw.weight", tiny, 2),
        ("stem.1.weight", base, 13),
        ("stages.2.blocks.26.norm.weight", base, 2),
        ("stages.3.blocks.2.mlp.fc1.weight", base, 1),
    ]:
        i, n = layer_id(name, depths, "layer_wise"), num_layers(depths, "layer_wise")
        assert n + 1 - i == power, name
    assert (layer_id("stem.0.weight", (3, 3, 9, 3), "single"), num_layers((3, 3, 9, 3), "single")) == (1, 18)


@pytest.mark.parametrize("masks", [True, False])
def test_detector_trains_one_step(coco_data, masks):
    ann_path, images_dir = coco_data
    ds = DetectionDataset(load_coco(ann_path), images_dir, train=True, scale=128, masks=masks)
    images, targets = collate([ds[(0, 0)], ds[(2, 0)]])  # image 30 has no objects
    assert targets[1]["boxes"].shape == (0, 4)
    detector = build_detector(
        "convnextv2_atto", num_classes=ds.categories.num_classes, min_size=128, masks=masks, **SMALL
    ).train()
    losses = detector(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if masks else set())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    stem = detector.backbone.body.stem[0].weight.grad
    assert stem is not None and torch.isfinite(stem).all() and stem.abs().sum() > 0


def test_roi_pools_use_the_fpn_strides_whatever_batch_comes_first():
    """torchvision's RoIAlign infers its level scales from the first batch and keeps them: a 40 px high
    image padded to 64 rounds the stride-4 level to 1/2, and a resumed run (whose first batch differs)
    pooled from other levels. The detector's pools pool like torchvision's own on a batch where the
    inference is exact (an unpadded 64 x 64 image), after any first batch."""
    torch.manual_seed(0)
    detector = build_detector("convnextv2_atto", num_classes=4, min_size=64, **SMALL).eval()
    with torch.no_grad():
        feats = detector.backbone(torch.rand(1, 3, 64, 64))
        boxes = [torch.tensor([[2.0, 3.0, 30.0, 40.0], [0.0, 0.0, 63.0, 63.0], [10.0, 10.0, 14.0, 15.0]])]
        levels = [feats[k] for k in ("0", "1", "2", "3")]
        assert _setup_scales(levels, [(40, 64)], 224, 4)[0][0] == 0.5  # what torchvision would keep
        scales = _setup_scales(levels, [(64, 64)], 224, 4)[0]
        for pool in (detector.roi_heads.box_roi_pool, detector.roi_heads.mask_roi_pool):
            pool(feats, boxes, [(40, 64)])  # a first batch torchvision would mis-read
            assert pool.scales == scales == [0.25, 0.125, 0.0625, 0.03125]
            plain = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=pool.output_size, sampling_ratio=0)
            assert torch.equal(pool(feats, boxes, [(64, 64)]), plain(feats, boxes, [(64, 64)]))


def test_small_head_init_starts_the_mask_loss_at_log_2(coco_data):
    """torchvision's mask logits init (kaiming, fan_out = the class count) gives a first mask loss of ~3
    with 3 classes; 'small' (detectron2's N(0, 0.001)) starts it at log 2."""
    ann_path, images_dir = coco_data
    ds = DetectionDataset(load_coco(ann_path), images_dir, train=True, scale=128)
    images, targets = collate([ds[(0, 0)], ds[(3, 0)]])
    loss = {}
    for init in ("small", "torchvision"):
        torch.manual_seed(0)
        detector = build_detector("convnextv2_atto", ds.categories.num_classes, 128, head_init=init, **SMALL).train()
        with torch.no_grad():
            loss[init] = detector(images, targets)["loss_mask"].item()
    assert loss["small"] == pytest.approx(math.log(2), abs=0.01) and loss["torchvision"] > 1.0
    with pytest.raises(ValueError, match="head_init"):
        build_detector("convnextv2_atto", 4, 64, head_init="xavier")


def test_heads_keep_float32_boxes_under_bf16_autocast():
    # torchvision decodes boxes in the dtype of its regression output: under bf16 they would snap to a
    # 4 px grid between 512 and 1024 px
    detector = build_detector("convnextv2_atto", num_classes=3, min_size=640, box_score_thresh=0.0, **SMALL).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert detector.backbone(torch.rand(1, 3, 64, 64))["0"].dtype == torch.bfloat16  # the backbone does run in bf16
        out = detector([torch.rand(3, 480, 720)])[0]
    assert out["boxes"].dtype == out["scores"].dtype == torch.float32 and len(out["boxes"]) > 0
    big = out["boxes"][out["boxes"] > 512 * 480 / 640]  # > 512 px in the network's frame
    assert len(big) > 0 and not torch.all(big * 640 / 480 % 4 == 0)
    target = {
        "boxes": torch.tensor([[600.0, 100.0, 700.0, 300.0]]),
        "labels": torch.tensor([1]),
        "masks": torch.zeros(1, 480, 720, dtype=torch.uint8),
    }
    target["masks"][0, 100:300, 600:700] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = detector.train()([torch.rand(3, 480, 720)], [target])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert isinstance(detector.rpn, RegionProposalNetwork) and isinstance(detector.roi_heads, RoIHeads)
    assert set(detector.state_dict()) == set(build_detector("convnextv2_atto", 3, 640).state_dict())


# ----------------------------------------------------------------------------- evaluation


def _independent_cocoeval(ann_path, results_path, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_path))
        ev = COCOeval(gt, gt.loadRes(str(results_path)), iou_type)
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return ev.stats[:6]


def _gt_outputs(ann_path, cat_to_label, noise=0.0, seed=0):
    """torchvision-style outputs made from the ground truth (optionally jittered, random scores)."""
    api, rng, outs = _coco_api(ann_path), np.random.default_rng(seed), []
    for image_id, (h, w) in SIZES.items():
        anns = [a for a in api.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # x, y, w, h -> x1, y1, x2, y2
        boxes += torch.from_numpy(rng.normal(0, noise, boxes.shape).astype(np.float32))
        masks = torch.from_numpy(np.stack([api.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8))
        masks = masks[:, None].float() * 0.4 + 0.3  # probabilities: 0.7 on the object, 0.3 off it
        if noise:
            masks = torch.roll(masks, shifts=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), dims=(2, 3))
        scores = torch.from_numpy(rng.uniform(0.1, 1, len(anns)).astype(np.float32)) if noise else torch.ones(len(anns))
        labels = torch.tensor([cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        outs.append({"boxes": boxes, "labels": labels, "scores": scores, "masks": masks})
    return outs, list(SIZES)


def test_perfect_predictions_score_one_and_empty_results_zero(coco_data):
    ann_path = coco_data[0]
    cm = CategoryMap.from_categories(CATS)
    outs, ids = _gt_outputs(ann_path, cm.cat_to_label)
    bbox, segm = coco_results(outs, ids, cm.label_to_cat)
    assert {r["category_id"] for r in bbox} == {2, 7, 11}
    assert [cm.cat_to_label[r["category_id"]] for r in bbox] == torch.cat([o["labels"] for o in outs]).tolist()
    metrics = coco_evaluate(ann_path, bbox, segm)
    assert metrics["bbox_mAP"] == pytest.approx(1.0) and metrics["segm_mAP"] == pytest.approx(1.0)
    some = [10, 20, 30]  # perfect on these images, nothing on the others
    part = coco_evaluate(ann_path, [r for r in bbox if r["image_id"] in some], None, image_ids=some)
    assert part["bbox_mAP"] == pytest.approx(1.0) and "segm_mAP" not in part
    assert coco_evaluate(ann_path, [r for r in bbox if r["image_id"] in some], None)["bbox_mAP"] < 0.9
    empty = coco_evaluate(ann_path, [], [])
    assert (
        empty["bbox_mAP"] == 0.0
        and empty["segm_mAP"] == 0.0
        and set(empty)
        == {f"{t}_{m}" for t in ("bbox", "segm") for m in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")}
    )


def test_logged_metrics_equal_cocoeval_of_the_saved_json(coco_data, tmp_path):
    ann_path, _ = coco_data
    cm = CategoryMap.from_categories(CATS)
    outs, ids = _gt_outputs(ann_path, cm.cat_to_label, noise=3.0)
    bbox, segm = coco_results(outs, ids, cm.label_to_cat)
    write_detections(tmp_path / "predictions" / "val_bbox.json", bbox)
    write_detections(tmp_path / "predictions" / "val_segm.json", segm)
    metrics = coco_evaluate(ann_path, bbox, segm)
    for t in ("bbox", "segm"):
        stats = _independent_cocoeval(ann_path, tmp_path / "predictions" / f"val_{t}.json", t)
        names = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
        np.testing.assert_allclose([metrics[f"{t}_{m}"] for m in names], stats)
    assert 0.05 < metrics["bbox_mAP"] < 0.95 and 0.05 < metrics["segm_mAP"] < 0.95  # not a trivial case
    assert not list((tmp_path / "predictions").glob("*.tmp*"))


def test_detector_eval_outputs_become_coco_results(coco_data, tmp_path):
    ann_path, images_dir = coco_data
    ds = DetectionDataset(load_coco(ann_path), images_dir, train=False)
    detector = build_detector(
        "convnextv2_atto", num_classes=ds.categories.num_classes, min_size=64, box_score_thresh=0.0, **SMALL
    ).eval()
    images, targets = collate([ds[i] for i in range(3)])
    with torch.no_grad():
        outs = detector(images)
    for im, out in zip(images, outs):  # results in original image coordinates
        h, w = im.shape[-2:]
        assert out["masks"].shape[-2:] == (h, w) and len(out["boxes"]) > 0
        assert (out["boxes"][:, 2] <= w + 1e-3).all() and (out["boxes"][:, 3] <= h + 1e-3).all()
    ids = [t["image_id"] for t in targets]
    bbox, segm = coco_results(outs, ids, ds.categories.label_to_cat)
    assert len(bbox) == len(segm) == sum(len(o["boxes"]) for o in outs)
    assert {r["category_id"] for r in bbox} <= {2, 7, 11}
    write_detections(tmp_path / "b.json", bbox)
    write_detections(tmp_path / "s.json", segm)
    metrics = coco_evaluate(ann_path, bbox, segm, image_ids=ids)
    for t, path in (("bbox", tmp_path / "b.json"), ("segm", tmp_path / "s.json")):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(ann_path))
            ev = COCOeval(gt, gt.loadRes(str(path)), t)
            ev.params.imgIds = ids
            ev.evaluate(), ev.accumulate(), ev.summarize()
        assert metrics[f"{t}_mAP"] == pytest.approx(ev.stats[0])
        assert metrics[f"{t}_mAP_50"] == pytest.approx(ev.stats[1])


# ----------------------------------------------------------------------------- drawing


def test_draw_detections_blends_masks_and_draws_boxes_over_threshold():
    image = Image.new("RGB", (64, 64), (100, 100, 100))
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [4.0, 52.0, 20.0, 62.0]])
    labels, scores = torch.tensor([1, 2]), torch.tensor([0.9, 0.1])
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, 0, 30:45, 15:40] = 0.8
    masks[1, 0, 54:60, 6:18] = 0.9
    names = ["bg", "a", "b"]
    out = np.asarray(draw_detections(image, boxes, labels, scores, masks, names, score_thresh=0.5, alpha=0.5))
    color = np.array(class_color(1))
    np.testing.assert_allclose(out[40, 25], 0.5 * 100 + 0.5 * color, atol=1)  # mask blended
    np.testing.assert_array_equal(out[40, 10], color)  # the box's left edge
    np.testing.assert_array_equal(out[57, 10], [100, 100, 100])  # below the threshold: nothing drawn
    np.testing.assert_array_equal(out[5, 60], [100, 100, 100])
    records = detection_records({"boxes": boxes, "labels": labels, "scores": scores}, names, {1: 7, 2: 11}, 0.5)
    assert records == [{"box": [10.0, 10.0, 50.0, 50.0], "score": 0.9, "label": 1, "name": "a", "category_id": 7}]
