"""load_checkpoint against independent implementations: timm, transformers, and official layouts
rebuilt here by hand from timm weights (the official code's and timm's checkpoint layouts), never with
fcmae's rename tables."""

import argparse
import functools

import pytest
import torch

import fcmae
from fcmae.weights import load_checkpoint
from fcmae.weights.convert import convert_state_dict

timm = pytest.importorskip("timm")

N_CLASSES = 7  # not 1000, so a head that silently kept its own shape cannot pass
ARCH = {  # the ConvNeXt V2 paper and README, written out so the transformers configs do not come from fcmae
    "convnextv2_atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnextv2_femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnextv2_pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnextv2_nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnextv2_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextv2_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
}
V2 = [n for n in ARCH if n.startswith("convnextv2_")]
HEAD = ["head.fc.bias", "head.fc.weight", "head.norm.bias", "head.norm.weight"]


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter: GRN weight/bias (zero at init), norms, biases, layer scale (1e-6
    at init) all become non-trivial, so a mis-mapped tensor changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.02))
    return model


@functools.cache
def timm_reference(name: str):
    """(state dict, input, features, logits) of a perturbed timm model; 2 images of 64x96."""
    torch.manual_seed(sorted(ARCH).index(name))
    model = perturb_(timm.create_model(name, num_classes=N_CLASSES)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model.forward_head(features)
    assert logits.std() > 0.1 and torch.isfinite(logits).all()
    return {k: v.clone() for k, v in model.state_dict().items()}, x, features, logits


def fresh(name: str):
    return fcmae.create_model(name, num_classes=N_CLASSES).eval()


def blank(name: str):
    """Our model with uninitialised memory for parameters (no init cost): every value an
    equivalence test sees must come from the checkpoint, or the output is garbage."""
    with torch.device("meta"):
        model = fcmae.create_model(name, num_classes=N_CLASSES)
    return model.to_empty(device="cpu").eval()


def forward(model, x, features_only=False):
    with torch.no_grad():
        return model.forward_features(x) if features_only else model(x)


# --------------------------------------------------------------------------- timm


@pytest.mark.parametrize("fmt", ["state_dict", "safetensors", "pth"])
@pytest.mark.parametrize("name", list(ARCH))
def test_timm_weights_give_timm_logits(name, fmt, tmp_path, rel_err):
    sd, x, _, logits = timm_reference(name)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        source = tmp_path / "model.safetensors"
        save_file(sd, str(source))
    elif fmt == "pth":
        source = tmp_path / "checkpoint.pth"
        torch.save({"model": sd}, source)
    else:
        source = sd
    model = blank(name)
    report = load_checkpoint(model, source)
    assert (report.layout, report.missing, report.ignored) == ("timm", [], [])
    assert rel_err(forward(model, x), logits) < 1e-5


@pytest.mark.parametrize("name", ["convnextv2_large", "convnextv2_huge"])
def test_large_timm_keys_and_shapes_convert(name):
    with torch.device("meta"):
        theirs = timm.create_model(name).state_dict()
        model = fcmae.create_model(name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in theirs.items()} == ours  # tiny and up: timm uses Linear too
    layout, converted, ignored = convert_state_dict(theirs)
    assert layout == "timm" and not ignored
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    assert load_checkpoint(model, theirs).missing == []  # meta into meta: the checks, no copying


# --------------------------------------------------------------------------- transformers


def _hf_reference(name: str, v1: bool):
    transformers = pytest.importorskip("transformers")
    depths, dims = ARCH[name]
    kind = "ConvNext" if v1 else "ConvNextV2"
    config = getattr(transformers, f"{kind}Config")(
        depths=list(depths), hidden_sizes=list(dims), layer_norm_eps=1e-6, num_labels=N_CLASSES
    )
    hf = perturb_(getattr(transformers, f"{kind}ForImageClassification")(config)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        return hf.state_dict(), x, hf(pixel_values=x).logits


@pytest.mark.parametrize("name", V2 + ["convnext_tiny"])
def test_transformers_weights_give_transformers_logits(name, rel_err):
    sd, x, logits = _hf_reference(name, v1=name == "convnext_tiny")
    assert logits.std() > 0.1
    model = blank(name)
    assert load_checkpoint(model, sd).layout == "transformers"
    assert rel_err(forward(model, x), logits) < 1e-4


# --------------------------------------------------------------------------- official layouts


def to_official(sd: dict, grn_shape=(1, 1, 1, -1), with_head=True) -> dict:
    """timm names -> the official dense code's (ConvNeXt V1/V2 models/convnext*.py)."""
    out = {}
    for key, v in sd.items():
        p = key.split(".")
        if p[0] == "stem":  # stem.{0,1}.w -> downsample_layers.0.{0,1}.w
            new = f"downsample_layers.0.{p[1]}.{p[2]}"
        elif p[0] == "stages" and p[2] == "downsample":  # stages.i.downsample.{0,1}.w
            new = f"downsample_layers.{p[1]}.{p[3]}.{p[4]}"
        elif p[0] == "stages":  # stages.i.blocks.j.<rest>
            block, rest = f"stages.{p[1]}.{p[3]}", p[4:]
            if rest[0] == "conv_dw":
                new = f"{block}.dwconv.{rest[1]}"
            elif rest[0] in ("norm", "gamma"):
                new = ".".join([block] + rest)
            elif rest[1] == "grn":
                new = f"{block}.grn.{'gamma' if rest[2] == 'weight' else 'beta'}"
                v = v.reshape(grn_shape)
            else:  # mlp.fc1 / mlp.fc2: Linear, whatever timm used (1x1 conv for atto..nano)
                new = f"{block}.pwconv{rest[1][-1]}.{rest[2]}"
                v = v.reshape(v.shape[0], -1) if rest[2] == "weight" else v
        elif p[0] == "head":
            if not with_head:
                continue
            new = f"norm.{p[2]}" if p[1] == "norm" else f"head.{p[2]}"
        else:
            raise AssertionError(key)
        out[new] = v
    return out


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny", "convnext_tiny"])
def test_official_dense_layout(name, rel_err, tmp_path):
    sd, x, _, logits = timm_reference(name)
    torch.save({"model": to_official(sd)}, tmp_path / "official.pth")
    model = blank(name)
    report = load_checkpoint(model, tmp_path / "official.pth")
    assert (report.layout, report.missing) == ("official", [])
    assert rel_err(forward(model, x), logits) < 1e-5


def test_official_released_encoder_only(rel_err, tmp_path):
    """*_fcmae.pt: dense names, no final norm, no head, GRN as (1, C)."""
    sd, x, features, _ = timm_reference("convnextv2_atto")
    torch.save({"model": to_official(sd, grn_shape=(1, -1), with_head=False)}, tmp_path / "atto_fcmae.pt")
    model = blank("convnextv2_atto")
    report = load_checkpoint(model, tmp_path / "atto_fcmae.pt")
    assert report.layout == "official" and sorted(report.missing) == HEAD
    assert rel_err(forward(model, x, features_only=True), features) < 1e-5


def minkowski_kernel(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """Dense conv weight -> MinkowskiEngine kernel, offsets enumerated first axis fastest:
    kernel[h + k * w] holds weight[..., h, w], as (Cin, Cout), or (C,) for a depthwise conv."""
    k = weight.shape[-1]
    kernel = torch.empty(k * k, *((weight.shape[0],) if depthwise else (weight.shape[1], weight.shape[0])))
    for h in range(k):
        for w in range(k):
            kernel[h + k * w] = weight[:, 0, h, w] if depthwise else weight[:, :, h, w].T
    return kernel


def to_minkowski(sd: dict, decoder_dim: int = 512) -> dict:
    """timm names -> an official FCMAE training checkpoint's ``model`` (sparse encoder + decoder)."""
    out = {}
    for key, v in sd.items():
        p = key.split(".")
        if p[0] == "head":
            continue  # the FCMAE encoder has no final norm and no head
        if p[0] == "stem":  # the stem is dense in the official FCMAE
            out[f"encoder.downsample_layers.0.{p[1]}.{p[2]}"] = v
        elif p[2] == "downsample" and p[3] == "0":
            out[f"encoder.downsample_layers.{p[1]}.0.ln.{p[4]}"] = v
        elif p[2] == "downsample":
            name = "kernel" if p[4] == "weight" else "bias"
            out[f"encoder.downsample_layers.{p[1]}.1.{name}"] = (
                minkowski_kernel(v, depthwise=False) if p[4] == "weight" else v.reshape(1, -1)
            )
        else:
            block, rest = f"encoder.stages.{p[1]}.{p[3]}", p[4:]
            if rest == ["conv_dw", "weight"]:
                out[f"{block}.dwconv.kernel"] = minkowski_kernel(v, depthwise=True)
            elif rest == ["conv_dw", "bias"]:
                out[f"{block}.dwconv.bias"] = v.reshape(1, -1)
            elif rest[0] == "norm":
                out[f"{block}.norm.ln.{rest[1]}"] = v
            elif rest[1] == "grn":
                out[f"{block}.grn.{'gamma' if rest[2] == 'weight' else 'beta'}"] = v.reshape(1, -1)
            else:
                out[f"{block}.pwconv{rest[1][-1]}.linear.{rest[2]}"] = v.reshape(v.shape[0], -1) if v.ndim > 1 else v
    d, c4 = decoder_dim, sd["head.norm.weight"].shape[0]
    decoder = {
        "proj.weight": (d, c4, 1, 1),
        "proj.bias": (d,),
        "mask_token": (1, d, 1, 1),
        "decoder.0.dwconv.weight": (d, 1, 7, 7),
        "decoder.0.dwconv.bias": (d,),
        "decoder.0.norm.weight": (d,),
        "decoder.0.norm.bias": (d,),
        "decoder.0.pwconv1.weight": (4 * d, d),
        "decoder.0.pwconv1.bias": (4 * d,),
        "decoder.0.grn.gamma": (1, 1, 1, 4 * d),
        "decoder.0.grn.beta": (1, 1, 1, 4 * d),
        "decoder.0.pwconv2.weight": (d, 4 * d),
        "decoder.0.pwconv2.bias": (d,),
        "pred.weight": (32 * 32 * 3, d, 1, 1),
        "pred.bias": (32 * 32 * 3,),
    }
    out.update({k: torch.randn(shape) for k, shape in decoder.items()})
    return out


def test_minkowski_kernel_index_order():
    """The hand-written enumeration itself: offset (h=1, w=0) of a 2x2 kernel is index 1."""
    weight = torch.arange(4.0).reshape(1, 1, 2, 2)  # weight[0, 0, h, w] = 2h + w
    assert minkowski_kernel(weight, depthwise=True).flatten().tolist() == [0.0, 2.0, 1.0, 3.0]


def test_official_minkowski_training_checkpoint(rel_err, tmp_path):
    sd, x, features, _ = timm_reference("convnextv2_atto")
    model_sd = to_minkowski(sd)
    # the official training checkpoint, as its save_model writes it (args is an argparse.Namespace)
    ckpt = {
        "model": model_sd,
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 799,
        "scaler": {"scale": 65536.0},
        "args": argparse.Namespace(model="convnextv2_atto", mask_ratio=0.6),
    }
    torch.save(ckpt, tmp_path / "checkpoint-799.pth")
    model = blank("convnextv2_atto")
    report = load_checkpoint(model, tmp_path / "checkpoint-799.pth")
    assert report.layout == "official-minkowski"
    assert sorted(report.missing) == HEAD
    assert sorted(report.ignored) == sorted(k for k in model_sd if not k.startswith("encoder."))
    assert rel_err(forward(model, x, features_only=True), features) < 1e-5


# --------------------------------------------------------------------------- bad input


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="Known models") as e:
        fcmae.create_model("convnextv2_atoo")
    assert all(n in str(e.value) for n in ("convnextv2_atto", "convnextv2_huge", "convnext_tiny"))


def test_wrong_architecture_names_both():
    with torch.device("meta"):
        tiny = timm.create_model("convnextv2_tiny").state_dict()
    with pytest.raises(ValueError) as e:
        load_checkpoint(fresh("convnextv2_atto"), tiny)
    assert "convnextv2_tiny" in str(e.value) and "convnextv2_atto" in str(e.value)


def test_partial_checkpoint_names_the_missing_key():
    sd = dict(timm_reference("convnextv2_atto")[0])
    model = fresh("convnextv2_atto")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["stages.2.blocks.4.mlp.fc1.weight"]
    with pytest.raises(ValueError, match=r"stages\.2\.blocks\.4\.mlp\.fc1\.weight"):
        load_checkpoint(model, sd)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing half-loaded


def test_image_size_not_multiple_of_32():
    model = fresh("convnextv2_atto")
    with pytest.raises(ValueError, match="32"):
        model(torch.zeros(1, 3, 64, 80))
    with pytest.raises(ValueError, match="32"):
        model.forward_features(torch.zeros(1, 3, 100, 64))


def test_unreadable_sources(tmp_path):
    model = fresh("convnextv2_atto")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(model, tmp_path / "nope.pth")
    torch.save("not a state dict", tmp_path / "str.pth")
    with pytest.raises(TypeError, match="dict of tensors"):
        load_checkpoint(model, tmp_path / "str.pth")
    torch.save({"model": {"epoch": 3}}, tmp_path / "no_tensors.pth")
    with pytest.raises(ValueError, match="No tensors"):
        load_checkpoint(model, tmp_path / "no_tensors.pth")
    (tmp_path / "garbage.pth").write_bytes(b"\x00not a pickle")
    with pytest.raises(ValueError, match="Could not read"):
        load_checkpoint(model, tmp_path / "garbage.pth")
    with pytest.raises(ValueError, match="Unrecognised checkpoint layout"):
        load_checkpoint(model, {"conv1.weight": torch.zeros(1)})
