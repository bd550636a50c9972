"""UPerNet segmentation: model build and strict encoder load, loss, layer decay, inference modes,
metrics, export to transformers, ADE20K-layout data and its mmseg pipeline, drawing, presets.

Independent references: fcmae's dense ConvNeXt (stage outputs), transformers' own UperNet loss and
AutoModelForSemanticSegmentation, torchmetrics and numpy brute force (metrics), hand-computed values
(layer decay, schedule, resize sizes), PIL (drawn files)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

import fcmae
from fcmae.data import segmentation as seg
from fcmae.tasks.segment import artifact as sa
from fcmae.tasks.segment import evaluation as se
from fcmae.tasks.segment import model as sm
from fcmae.tasks.segment import predict as sp
from fcmae.training.optim import param_groups, set_lr

COLOURS = {1: (220, 40, 40), 2: (40, 200, 40), 3: (40, 40, 220)}
SIZES = [(96, 128), (128, 96), (80, 120), (112, 112), (96, 128), (100, 140), (90, 120), (128, 128)]


def make_pair(rng, h, w):
    """Shapes on a noise texture: rectangle 1, disc 2, triangle 3; background 0 ("other")."""
    yy, xx = np.mgrid[:h, :w]
    label = np.zeros((h, w), np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    label[y0 : y0 + h // 3, x0 : x0 + w // 3] = 1
    cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), min(h, w) // 5
    label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 2
    label[(yy > h // 2) & (xx < w // 2) & (yy - h // 2 > xx)] = 3
    image = rng.normal(128, 40, (h, w, 3)).clip(0, 255).astype(np.uint8)
    for k, c in COLOURS.items():
        image[label == k] = c
    return image, label


@pytest.fixture
def ade(tmp_path):
    """An ADE20K-layout folder: 6 training and 2 validation images, 3 classes plus 0."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        split = "training" if i < 6 else "validation"
        image, label = make_pair(rng, h, w)
        for sub, arr, ext in (("images", image, "jpg"), ("annotations", label, "png")):
            (tmp_path / sub / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / sub / split / f"ADE_{i:04d}.{ext}")
    return tmp_path


@pytest.fixture(scope="module")
def atto():
    return sm.build_segmenter("convnextv2_atto", 3, head_channels=32).eval()


class Pointwise:
    """A stand-in segmenter: logits = 1x1 conv of the input (+ an optional ramp along the width)."""

    def __init__(self, k=4, ramp=False):
        self.w = torch.randn(k, 3, 1, 1)
        self.ramp = ramp

    def __call__(self, pixel_values):
        out = F.conv2d(pixel_values, self.w)
        if self.ramp:
            out = out + torch.linspace(-3, 3, out.shape[-1]) * torch.arange(out.shape[1])[:, None, None]
        return SimpleNamespace(logits=out)


# ----------------------------------------------------------------------------- model


def test_build_segmenter_follows_the_mmseg_recipe(atto):
    from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2Backbone

    cfg = atto.config
    assert isinstance(atto.backbone, ConvNextV2Backbone)
    assert cfg.backbone_config.out_features == sm.STAGES and cfg.backbone_config.layer_norm_eps == 1e-6
    assert (cfg.auxiliary_in_channels, cfg.auxiliary_channels, cfg.auxiliary_num_convs) == (160, 256, 1)
    assert list(cfg.pool_scales) == [1, 2, 3, 6] and cfg.hidden_size == 32 and cfg.loss_ignore_index == 255
    norms = [m for n, m in atto.backbone.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    assert [atto.backbone.hidden_states_norms[s].normalized_shape[0] for s in sm.STAGES] == [40, 80, 160, 320]
    assert atto(pixel_values=torch.randn(1, 3, 64, 96)).logits.shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="four-stage"):
        sm.build_segmenter("convnext_isotropic_small", 3)


def test_encoder_loads_strictly_and_matches_the_dense_model(tmp_path):
    from safetensors.torch import save_file

    mae = fcmae.create_fcmae("convnextv2_atto")
    with torch.no_grad():  # GRN starts at zero: make every parameter matter
        for p in mae.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_file(mae.state_dict(), str(tmp_path / "fcmae.safetensors"))
    net = sm.build_segmenter("convnextv2_atto", 3, head_channels=32).eval()
    report = sm.load_encoder_into(net, str(tmp_path / "fcmae.safetensors"))
    assert sorted(report.missing) == sorted(
        f"backbone.{k}" for k in net.backbone.state_dict() if k.startswith("hidden_states_norms.")
    )
    assert any(k.startswith("decoder.") for k in report.ignored)
    x = torch.randn(2, 3, 64, 96)
    enc = mae.encoder.eval()
    with torch.no_grad():
        ref = enc.forward_intermediates(x)
        out = net.backbone(x, output_hidden_states=True)
    stages = out.hidden_states[1:]  # hidden_states[0] is the stem's output
    for r, s, f, name in zip(ref, stages, out.feature_maps, sm.STAGES):
        assert (s - r).abs().max() <= 1e-5 * r.abs().max()
        norm = net.backbone.hidden_states_norms[name]
        expect = F.layer_norm(r.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, 1e-6)
        torch.testing.assert_close(f, expect.permute(0, 3, 1, 2), atol=1e-4, rtol=1e-4)


def test_encoder_of_another_size_names_both_models():
    net = sm.build_segmenter("convnextv2_atto", 3, head_channels=32)
    femto = fcmae.create_model("convnextv2_femto", num_classes=0).state_dict()
    with pytest.raises(ValueError) as e:
        sm.load_encoder_into(net, femto)
    assert "convnextv2_femto" in str(e.value) and "convnextv2_atto" in str(e.value)


def test_loss_is_transformers_loss_rescaled_to_all_pixels():
    net = sm.build_segmenter("convnextv2_atto", 3, head_channels=32, dropout=0.0).train()
    x, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    for ignored in (0.0, 0.3):
        labels = labels.masked_fill(torch.rand(labels.shape) < ignored, 255)
        out = net(pixel_values=x, labels=labels)  # transformers' loss: CE over labelled pixels, + 0.4 aux
        aux = net.auxiliary_head.__dict__.pop(sm.AUX_LOGITS)
        assert aux.shape[-1] == 4  # the stage-3 map: our loss upsamples it to the labels
        ours = sm.segmentation_loss(out.logits, aux, labels, 0.4)
        valid = (labels != 255).float().mean()
        torch.testing.assert_close(ours, out.loss * valid, rtol=1e-5, atol=1e-6)
    all_ignored = torch.full_like(labels, 255)
    assert sm.train_loss(net, net, x, all_ignored).item() == 0.0  # transformers' would be NaN


def test_layer_decay_by_hand_for_atto(atto):
    d = 0.9
    groups = param_groups(atto, 0.05, sm.lr_scale(atto, d, "single"))
    set_lr(SimpleNamespace(param_groups=groups), 1e-3)  # what every step does: lr x the group's scale
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(atto.named_parameters())
    assert len(by_param) == len(names) == sum(len(g["params"]) for g in groups)

    def group(name):
        return by_param[id(names[name])]

    b = "backbone.encoder.stages"
    # atto depths (2, 2, 6, 2): 12 layers; stem id 1, block j of stage i id sum(depths[:i]) + j + 1, head 13
    expect = {
        "backbone.embeddings.patch_embeddings.weight": d**12,
        f"{b}.0.layers.1.pwconv1.weight": d**11,
        f"{b}.1.downsampling_layer.1.weight": d**10,
        f"{b}.2.layers.5.dwconv.weight": d**3,
        f"{b}.3.layers.1.pwconv2.weight": d**1,
        "backbone.hidden_states_norms.stage4.weight": 1.0,
        "decode_head.classifier.weight": 1.0,
        "auxiliary_head.convs.0.conv.weight": 1.0,
    }
    for name, scale in expect.items():
        assert group(name)["lr_scale"] == pytest.approx(scale) and group(name)["lr"] == pytest.approx(1e-3 * scale)
    for name in (
        f"{b}.0.layers.0.grn.weight",
        f"{b}.0.layers.0.grn.bias",
        f"{b}.0.layers.0.dwconv.bias",
        "backbone.embeddings.layernorm.weight",
        "decode_head.bottleneck.batch_norm.weight",
    ):
        assert group(name)["weight_decay"] == 0.0, name
    for name in (f"{b}.0.layers.0.pwconv1.weight", "decode_head.bottleneck.conv.weight"):
        assert group(name)["weight_decay"] == 0.05, name
    # mmseg stage_wise, num_layers 6 (stage 3 has at most 9 blocks): stem/downsample d^7, stage i d^(6-i)
    stage = {id(p): g["lr_scale"] for g in param_groups(atto, 0.05, sm.lr_scale(atto, d, "stage")) for p in g["params"]}
    expect = {
        "backbone.embeddings.patch_embeddings.weight": d**7,
        f"{b}.2.downsampling_layer.1.weight": d**7,
        f"{b}.0.layers.1.pwconv1.weight": d**6,
        f"{b}.3.layers.0.dwconv.weight": d**3,
        "decode_head.classifier.weight": 1.0,
    }
    for name, scale in expect.items():
        assert stage[id(names[name])] == pytest.approx(scale), name


def test_segmentation_schedule_is_mmseg_poly_by_hand():
    """The core's schedule with kind='poly' (mmseg's LinearLR warmup then PolyLR, power 1, eta_min 0),
    here from 0 rather than mmseg's lr x 1e-6: at most 1e-6 of the lr apart during the warmup."""
    from fcmae.training.optim import lr_at

    assert lr_at(0, 1000, 100, 1.0, kind="poly") == 0.0
    assert lr_at(50, 1000, 100, 1.0, kind="poly") == pytest.approx(0.5)
    assert lr_at(100, 1000, 100, 1.0, kind="poly") == pytest.approx(1.0)
    assert lr_at(550, 1000, 100, 1.0, kind="poly") == pytest.approx(0.5)
    assert lr_at(1000, 1000, 100, 1.0, kind="poly") == 0.0
    for step in (0, 37, 99):  # mmseg's LinearLR(start_factor=1e-6) over 100 iterations
        assert abs(lr_at(step, 1000, 100, 1.0, kind="poly") - (1e-6 + (1 - 1e-6) * step / 100)) <= 1e-6


# ----------------------------------------------------------------------------- inference and metrics


def test_slide_equals_whole_when_the_crop_covers_the_image(atto):
    x = torch.randn(2, 3, 64, 96)
    whole = se.predict_logits(atto, x)
    assert torch.equal(se.predict_logits(atto, x, mode="slide", crop=128, stride=64), whole)
    stub = Pointwise()  # position-free: every overlapping window gives each pixel the same logits
    torch.testing.assert_close(se.predict_logits(stub, x, mode="slide", crop=(32, 40), stride=(20, 24)), stub(x).logits)


def test_flip_and_multi_scale_average_probabilities():
    x = torch.randn(1, 3, 32, 48)
    stub = Pointwise(ramp=True)
    base = F.conv2d(x, stub.w)
    ramp = torch.linspace(-3, 3, 48) * torch.arange(4)[:, None, None]
    # the mirrored view sees the ramp reversed; its probabilities are mirrored back before averaging
    expect = (torch.softmax(base + ramp, 1) + torch.softmax(base + ramp.flip(-1), 1)) / 2
    torch.testing.assert_close(se.predict_logits(stub, x, flip=True), expect)
    const = Pointwise()
    const.w = torch.zeros(4, 3, 1, 1)
    out = se.predict_logits(const, x, ms_ratios=(0.5, 1.0, 1.5), flip=True, out_size=(40, 60))
    torch.testing.assert_close(out, torch.full((1, 4, 40, 60), 0.25))


def test_metrics_match_torchmetrics_and_brute_force():
    from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

    g = torch.Generator().manual_seed(0)
    k = 5  # class 4 absent from labels and predictions, class 3 only predicted
    label = torch.randint(0, 3, (2, 16, 16), generator=g)
    label[torch.rand(label.shape, generator=g) < 0.2] = 255
    pred = torch.randint(0, 4, (2, 16, 16), generator=g)
    conf = se.confusion_matrix(pred, label, k)
    brute = np.zeros((k, k), np.int64)
    for t, p in zip(label.flatten().tolist(), pred.flatten().tolist()):
        if t != 255:
            brute[t, p] += 1
    assert np.array_equal(conf.numpy(), brute)
    m = se.seg_metrics(conf)
    iou_tm = MulticlassJaccardIndex(k, ignore_index=255, average=None, zero_division=float("nan"))(pred, label) * 100
    np.testing.assert_allclose(m["IoU"], iou_tm.numpy(), rtol=1e-5)
    assert m["mIoU"] == pytest.approx(MulticlassJaccardIndex(k, ignore_index=255)(pred, label).item() * 100, rel=1e-5)
    acc_tm = MulticlassAccuracy(k, ignore_index=255, average=None)(pred, label).numpy() * 100
    assert np.isnan(m["Acc"][3:]).all() and np.isnan(m["IoU"][4]) and m["IoU"][3] == 0.0
    np.testing.assert_allclose(m["Acc"][:3], acc_tm[:3], rtol=1e-5)
    assert m["mAcc"] == pytest.approx(acc_tm[:3].mean(), rel=1e-5)
    valid = label != 255
    assert m["aAcc"] == pytest.approx((pred[valid] == label[valid]).double().mean().item() * 100)


def test_metrics_after_reduce_zero_label_match_torchmetrics_on_raw_labels():
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 4, (24, 24)).astype(np.uint8)  # 0 = other, classes 1..3
    raw[:2] = 255
    reduced = seg.decode_label({"bytes": _png(raw), "path": None}, 3, True, "x")
    assert np.array_equal(reduced, np.where((raw == 0) | (raw == 255), 255, raw - 1))
    pred = torch.from_numpy(rng.integers(0, 3, (24, 24)))
    m = se.seg_metrics(se.confusion_matrix(pred, torch.from_numpy(reduced).long(), 3))
    raw_t = torch.from_numpy(raw.astype(np.int64)).masked_fill(torch.from_numpy(raw == 255), 0)
    tm = MulticlassJaccardIndex(4, ignore_index=0, average=None)(pred + 1, raw_t)[1:] * 100
    np.testing.assert_allclose(m["IoU"], tm.numpy(), rtol=1e-5)


def test_confusion_matrix_makes_no_host_reads():
    pred = torch.empty(2, 32, 32, dtype=torch.long, device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.bincount(pred.flatten())  # the instrument: bincount reads the input's range on the host
    assert se.confusion_matrix(pred, pred, 150).shape == (150, 150)


# ----------------------------------------------------------------------------- export and checkpoints


def test_export_loads_in_transformers_with_the_same_logits(atto, tmp_path):
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    names = ["sky", "tree", "road"]
    sa.export_transformers(atto, tmp_path / "hf", names, 64)
    hf = AutoModelForSemanticSegmentation.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == "UperNetForSemanticSegmentation" and hf.config.id2label == dict(enumerate(names))
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref, got = atto(pixel_values=x).logits, hf(pixel_values=x).logits
    assert (got - ref).abs().max() <= 1e-4
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    processor = AutoImageProcessor.from_pretrained(str(tmp_path / "hf"))
    pixels = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, seg.eval_transform(image, 64), atol=1e-5, rtol=1e-5)


def test_segmenter_checkpoint_round_trip(atto, tmp_path):
    from safetensors.torch import save_file

    meta = sa.segmenter_metadata("convnextv2_atto", ["a", "b", "c"], 64, 32)
    save_file(atto.state_dict(), str(tmp_path / "best.safetensors"), metadata=meta)
    net, got = sa.load_segmenter(tmp_path / "best.safetensors")
    assert json.loads(got["class_names"]) == ["a", "b", "c"] and got["input_size"] == "64"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(pixel_values=x).logits, atto(pixel_values=x).logits)
    assert sa.load_segmenter(tmp_path)[1]["model"] == "convnextv2_atto"  # a run directory: its best.safetensors
    assert sa.is_segmenter(tmp_path) and sa.is_segmenter(tmp_path / "best.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "fcmae-classifier"})
    assert not any(sa.is_segmenter(s) for s in (tmp_path / "other.safetensors", tmp_path / "nothing", "hf-hub:a/b"))
    with pytest.raises(ValueError, match="not a fine-tuned fcmae segmenter"):
        sa.load_segmenter(tmp_path / "other.safetensors")


def test_export_segmenter_writes_only_into_an_export_folder(atto, tmp_path):
    from safetensors.torch import save_file

    meta = sa.segmenter_metadata("convnextv2_atto", ["a", "b", "c"], 64, 32, mIoU=51.234, step=7)
    save_file(atto.state_dict(), str(tmp_path / "best.safetensors"), metadata=meta)
    out = sa.export_segmenter(tmp_path, tmp_path / "hub", repo_id="me/seg", datasets=["me/data"])
    card = (out / "README.md").read_text()
    assert "mIoU 51.23 (step 7" in card and 'from_pretrained("me/seg")' in card and "datasets: [me/data]" in card
    assert sorted(p.name for p in out.iterdir()) == sorted(sa.EXPORT_FILES)
    with pytest.raises(FileExistsError, match="--overwrite"):
        sa.export_segmenter(tmp_path, out)
    sa.export_segmenter(tmp_path, out, overwrite=True)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        sa.export_segmenter(tmp_path, out, overwrite=True)
    with pytest.raises(ValueError, match="own directory"):
        sa.export_segmenter(tmp_path / "best.safetensors", tmp_path)
    from fcmae.cli.predict import checkpoint_of
    from fcmae.weights.artifacts import identify

    def is_segmenter_export(argv):  # the dispatch of fcmae export: the kind of its --checkpoint
        checkpoint = checkpoint_of(argv[1:]) if argv[0] == "export" else None
        try:
            return checkpoint is not None and identify(checkpoint).kind.name == "segmenter"
        except (ValueError, FileNotFoundError):
            return False

    assert is_segmenter_export(["export", "--out", "x", "--checkpoint", str(tmp_path)])
    assert is_segmenter_export(["export", f"--checkpoint={tmp_path / 'best.safetensors'}", "--out", "x"])
    assert not is_segmenter_export(["export", "--checkpoint", str(out / "model.safetensors"), "--out", "x"])
    assert not is_segmenter_export(["push", "--folder", str(tmp_path), "--repo-id", "a/b"])


def test_push_to_hub_exports_the_best_segmenter(atto, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from fcmae.training.run import Run
    from fcmae.weights import hub

    save_file(
        atto.state_dict(),
        str(tmp_path / "best.safetensors"),
        metadata=sa.segmenter_metadata("convnextv2_atto", ["a", "b", "c"], 64, 32, mIoU=40.0, step=3),
    )
    pushed = []
    monkeypatch.setattr(
        hub, "push", lambda folder, repo, private, **kw: pushed.append((folder, repo, private)) or "url"
    )
    cfg = SimpleNamespace(push_to_hub="me/seg", hub_private=True, dataset_name="me/ade")
    Run.push(SimpleNamespace(cfg=cfg, out=tmp_path, is_main=True, say=print), tmp_path)
    assert pushed == [(tmp_path / "hub", "me/seg", True)]
    assert "datasets: [me/ade]" in (tmp_path / "hub" / "README.md").read_text()
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["id2label"] == {"0": "a", "1": "b", "2": "c"}


# ----------------------------------------------------------------------------- data


def _png(arr) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_ade20k_folder_pairs_and_samples(ade):
    train = seg.load_split(str(ade), "train")
    assert len(train) == 6 and train.column_names == ["image", "label"]
    ds = seg.SegmentationImages(train, 3, 64, train=True, seed=1)
    image, label, ok = ds[(2, 0)]
    assert image.shape == (3, 64, 64) and label.shape == (64, 64) and label.dtype == torch.long and ok
    assert set(label.unique().tolist()) <= {0, 1, 2, 255}
    again, other = ds[(2, 0)], ds[(2, 1)]
    assert torch.equal(again[0], image) and torch.equal(again[1], label) and not torch.equal(other[0], image)
    val = seg.SegmentationImages(seg.load_split(str(ade), "validation"), 3, 64, train=False)
    image, label, ok = val[0]  # 90 x 120: short side to 64 keeping aspect (mmcv.imrescale), label untouched
    assert image.shape == (3, 64, int(120 * 64 / 90 + 0.5)) and label.shape == SIZES[6] and ok
    shares = [list(seg.build_val_loader(val, rank, 2).sampler) for rank in (0, 1)]
    assert sorted(shares[0] + shares[1]) == [0, 1]
    images, labels, ok = next(iter(seg.build_val_loader(val)))
    assert len(images) == len(labels) == 1 and ok.tolist() == [True]


def test_train_pipeline_moves_image_and_label_together():
    """Image grey level = 60 x raw class: after resize, crop, flip and pad, every labelled pixel two
    pixels from an edge still has its class's grey level (the label's nearest resize is aligned with the
    image's bilinear one); padding is label 255 with a zero (normalised) image."""
    raw = np.zeros((48, 72), np.uint8)
    raw[5:30, 10:40], raw[20:45, 45:70], raw[30:48, 0:20] = 1, 2, 3
    image = np.repeat((raw * 60)[..., None], 3, axis=2).astype(np.uint8)
    label = np.where(raw == 0, 255, raw - 1).astype(np.uint8)
    mean = torch.tensor(seg.IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(seg.IMAGENET_DEFAULT_STD)[:, None, None]
    padded = 0
    for seed in range(20):
        x, y = seg.train_transform(image, label, 64, np.random.default_rng(seed), photometric=False)
        grey = ((x * std + mean) * 255)[0]
        framed = F.pad(y[None, None].float(), (2, 2, 2, 2), value=-1)  # the crop's border: outside unknown
        inside = (F.max_pool2d(framed, 5, 1) == -F.max_pool2d(-framed, 5, 1))[0, 0] & (y != 255)
        assert (grey[inside] - 60 * (y[inside] + 1)).abs().max() <= 1.0
        pad = (x == 0).all(0)
        padded += int(pad.sum())
        assert (y[pad] == 255).all()
    assert padded > 0  # ratios below 1 shrink this image under the crop size: the pad rule was exercised
    x1, _ = seg.train_transform(image, label, 64, np.random.default_rng(3))
    x2, _ = seg.train_transform(image, label, 64, np.random.default_rng(3))
    assert torch.equal(x1, x2)


def test_ratio_one_without_photometric_is_the_image_itself_or_its_mirror():
    """The small-data preset's --ratio-range 1,1 --no-photometric on an S x S image: no rescale, the crop
    is the whole image, so each sample is the normalised image (or its mirror) and the same label map."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    label = rng.integers(0, 4, (64, 64), dtype=np.uint8)
    mean = torch.tensor(seg.IMAGENET_DEFAULT_MEAN)[:, None, None]
    std = torch.tensor(seg.IMAGENET_DEFAULT_STD)[:, None, None]
    want = (torch.from_numpy(image).permute(2, 0, 1).float() / 255 - mean) / std
    flips = 0
    for seed in range(16):
        x, y = seg.train_transform(image, label, 64, np.random.default_rng(seed), False, (1.0, 1.0))
        flip = not torch.equal(y, torch.from_numpy(label).long())
        flips += flip
        assert torch.equal(y, torch.from_numpy(label[:, ::-1].copy() if flip else label).long())
        torch.testing.assert_close(x, want.flip(-1) if flip else want, atol=1e-5, rtol=0)
    assert 0 < flips < 16
    # and the default pipeline does rescale and distort: the same seeds do not give the image back
    x, _ = seg.train_transform(image, label, 64, np.random.default_rng(0))
    assert not (torch.allclose(x, want, atol=1e-3) or torch.allclose(x, want.flip(-1), atol=1e-3))


def test_segment_flags_reach_the_training_samples(ade):
    from fcmae.tasks.segment import SegmentConfig
    from fcmae.tasks.segment.loop import load_data
    from fcmae.training.config import parse_args

    base = ["--data", str(ade), "--num-classes", "3", "--input-size", "32"]
    cfg = parse_args(SegmentConfig, [*base, "--ratio-range", "1,1", "--no-photometric"])
    cfg.validate()
    train_ds, _ = load_data(cfg, 0, 1)
    assert (train_ds.photometric, train_ds.ratio_range) == (False, (1.0, 1.0))
    default, _ = load_data(parse_args(SegmentConfig, base), 0, 1)
    assert (default.photometric, default.ratio_range) == (True, (0.5, 2.0))
    for bad in ("2,1", "0,1", "1"):
        with pytest.raises(ValueError, match="--ratio-range"):
            parse_args(SegmentConfig, [*base, "--ratio-range", bad]).validate()


def test_small_data_preset_keeps_the_optimiser_and_drops_the_ade20k_augmentation(ade):
    from fcmae.tasks.segment import SegmentConfig
    from fcmae.training.config import parse_args

    preset = Path(__file__).resolve().parents[1] / "configs" / "segment" / "small_data.yaml"
    cfg = parse_args(SegmentConfig, ["--config", str(preset), "--data", str(ade), "--num-classes", "3"])
    cfg.validate()
    assert (cfg.ratio_range, cfg.photometric, cfg.eval_mode, cfg.drop_path) == ([1.0, 1.0], False, "whole", 0.1)
    assert (cfg.lr, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type) == (1e-4, 0.05, 0.9, "stage")


def test_cat_max_ratio_redraws_crops(monkeypatch):
    label = np.zeros((256, 1024), np.uint8)
    label[:, 900:] = 1  # class 0 covers 88 %: most random crops hold it alone
    image = np.zeros((256, 1024, 3), np.uint8)

    def mixed(tries):
        monkeypatch.setattr(seg, "CROP_TRIES", tries)
        n = 0
        for s in range(40):
            _, y = seg.train_transform(image, label, 128, np.random.default_rng(s), photometric=False)
            counts = torch.bincount(y[y != 255].flatten(), minlength=2)
            n += bool((counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75)
        return n

    assert mixed(10) > mixed(0) + 10


def test_label_errors_are_named_and_one_line(ade):
    (ade / "annotations" / "training" / "ADE_0001.png").unlink()
    with pytest.raises(ValueError, match="ADE_0001.jpg has no label map"):
        seg.load_split(str(ade), "train")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ade / "annotations" / "training" / "ADE_0001.png")
    with pytest.raises(seg.LabelMapError, match=r"ADE_0001.png is 10x10 but its image .* is 96x128"):
        seg.load_split(str(ade), "train")
    bad = np.zeros(SIZES[1], np.uint8)
    bad[0, 0] = 7
    Image.fromarray(bad).save(ade / "annotations" / "training" / "ADE_0001.png")
    ds = seg.SegmentationImages(seg.load_split(str(ade), "train"), 3, 64, train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, sampler=[0, 1])
    with pytest.raises(ValueError) as e:
        next(iter(loader))
    assert "Traceback" not in str(e.value) and str(e.value).endswith("pass the right --num-classes.")
    assert "ADE_0001.png: label value 7 is above the 3 classes" in str(e.value)
    Image.fromarray(np.zeros((*SIZES[1], 3), np.uint8)).save(ade / "annotations" / "training" / "ADE_0001.png")
    with pytest.raises(seg.LabelMapError, match="mode RGB"):
        ds[1]


def test_check_labels_finds_a_bad_map_without_training(ade, tmp_path):
    val = seg.SegmentationImages(seg.load_split(str(ade), "validation"), 3, 64, train=False)
    val.check_labels()  # all good
    bad = np.zeros(SIZES[7], np.uint8)
    bad[3, 4] = 200
    Image.fromarray(bad).save(ade / "annotations" / "validation" / "ADE_0007.png")
    val.check_labels([0])  # only the rows asked for
    with pytest.raises(seg.LabelMapError, match="ADE_0007.png: label value 200"):
        val.check_labels()
    assert seg.header_size(str(ade / "images" / "validation" / "ADE_0006.jpg")) == SIZES[6][::-1]
    (tmp_path / "broken.jpg").write_bytes(b"no image")
    assert seg.header_size(str(tmp_path / "broken.jpg")) is None
    assert seg.header_size({"bytes": _png(bad), "path": None}) == SIZES[7][::-1]


def test_parquet_with_named_columns_gives_the_folder_samples(ade, tmp_path):
    import datasets

    folder = seg.load_split(str(ade), "train")
    rows = {"img": [], "seg": [], "scene": []}
    for r in folder:
        for src, dst in (("image", "img"), ("label", "seg")):
            rows[dst].append({"bytes": Path(r[src]["path"]).read_bytes(), "path": Path(r[src]["path"]).name})
        rows["scene"].append("synthetic")
    feats = datasets.Features({"img": datasets.Image(), "seg": datasets.Image(), "scene": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=feats).to_parquet(str(tmp_path / "train-00000.parquet"))
    table = seg.load_split(str(tmp_path / "train-00000.parquet"), "train", image_column="img", label_column="seg")
    a = seg.SegmentationImages(folder, 3, 64, train=True, seed=5)
    b = seg.SegmentationImages(table, 3, 64, train=True, seed=5)
    for i in (0, 4):
        for u, v in zip(a[(i, 2)], b[(i, 2)]):
            assert torch.equal(torch.as_tensor(u), torch.as_tensor(v))
    with pytest.raises(ValueError, match="--label-column"):
        seg.load_split(str(tmp_path / "train-00000.parquet"), "train", label_column="mask")
    default = datasets.Dataset.from_dict(
        {"image": rows["img"], "annotation": rows["seg"]},
        features=datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()}),
    )
    default.to_parquet(str(tmp_path / "hub.parquet"))
    assert len(seg.load_split(str(tmp_path / "hub.parquet"), "train")) == 6


def test_class_names(tmp_path):
    assert seg.class_names(2) == ["class 0", "class 1"]
    (tmp_path / "names.txt").write_text("wall\n\nbuilding\nsky\n")
    assert seg.class_names(3, tmp_path / "names.txt") == ["wall", "building", "sky"]
    with pytest.raises(ValueError, match="names 3 classes but --num-classes is 4"):
        seg.class_names(4, tmp_path / "names.txt")


# ----------------------------------------------------------------------------- drawing and presets


def test_save_prediction_writes_palette_and_overlay(tmp_path):
    image = Image.fromarray(np.full((20, 30, 3), 100, np.uint8))
    labels = np.zeros((20, 30), np.int64)
    labels[:, 10:20], labels[:, 20:] = 2, 255
    mask_path, overlay_path = sp.save_prediction(image, labels, tmp_path, "x", ["a", "b", "c"])
    mask = Image.open(mask_path)
    assert mask.mode == "P" and mask.size == (30, 20)
    assert np.array_equal(np.asarray(mask), labels.astype(np.uint8))
    pal = np.array(mask.getpalette()).reshape(-1, 3)
    assert tuple(pal[255]) == (0, 0, 0) and len({tuple(c) for c in pal[:150]}) == 150
    assert json.loads(mask.text["classes"]) == {"a": pal[0].tolist(), "c": pal[2].tolist()}
    overlay = np.asarray(Image.open(overlay_path))
    assert overlay.shape == (20, 30, 3) and (overlay[:, 20:] == 100).all()
    np.testing.assert_allclose(overlay[0, 0], np.round(0.5 * 100 + 0.5 * pal[0]), atol=1)


def test_segment_config_defaults_are_the_ade20k_recipe_and_errors_name_the_flag():
    from fcmae.tasks.segment import SegmentConfig
    from fcmae.training.config import parse_args

    cfg = parse_args(SegmentConfig, ["--data", "d"])
    cfg.validate()
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_type) == (
        1e-4,
        0.9,
        0.999,
        0.05,
        0.9,
        "stage",
    )
    assert (cfg.max_steps, cfg.batch_size, cfg.input_size, cfg.head_channels, cfg.aux_weight, cfg.num_classes) == (
        160000,
        2,
        512,
        512,
        0.4,
        150,
    )
    assert (cfg.eval_mode, cfg.eval_every, cfg.mixed_precision) == (
        "slide",
        16000,
        "auto",
    )  # bf16 on a GPU that has it (the presets say bf16)
    for argv, flag in (
        (["--model", "convnextv2_atto"], "--data"),
        (["--data", "d", "--eval-mode", "ms"], "--eval-mode"),
        (["--data", "d", "--num-classes", "300"], "--num-classes"),
        (["--data", "d", "--layer-decay-type", "block"], "--layer-decay-type"),
        (["--data", "d", "--in-chans", "4", "--mean", "0,0,0,0", "--std", "1,1,1,1"], "--in-chans"),
        (["--data", "d", "--eval-only"], "--checkpoint"),
    ):
        with pytest.raises(ValueError, match=flag):
            parse_args(SegmentConfig, argv).validate()


@pytest.mark.parametrize("size", ["tiny", "base", "large"])
def test_ade20k_presets(size):
    path = Path(__file__).resolve().parents[1] / "configs" / "segment" / f"convnextv2_{size}_ade20k_512.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert set(cfg) == {
        "model",
        "input_size",
        "batch_size",
        "max_steps",
        "warmup_steps",
        "lr",
        "weight_decay",
        "layer_decay",
        "layer_decay_type",
        "drop_path",
        "head_channels",
        "aux_weight",
        "mixed_precision",
        "eval_every",
        "eval_mode",
        "num_classes",
    }
    assert cfg["model"] in fcmae.list_models() and cfg["num_classes"] == 150
    assert (cfg["lr"], cfg["weight_decay"], cfg["layer_decay"], cfg["warmup_steps"], cfg["max_steps"]) == (
        1e-4,
        0.05,
        0.9,
        1500,
        160000,
    )
    assert all(
        line.split("#")[1].strip().startswith(("published", "reasoned"))
        for line in path.read_text().splitlines()
        if line and not line.startswith(("#", "model:"))
    )
    from fcmae.tasks.segment import SegmentConfig
    from fcmae.training.config import parse_args

    parsed = parse_args(SegmentConfig, ["--config", str(path), "--data", "ADEChallengeData2016"])
    parsed.validate()
    assert parsed.model == cfg["model"] and parsed.drop_path == cfg["drop_path"]
