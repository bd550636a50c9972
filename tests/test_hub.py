"""Hub export, push and load-back, all offline.

Every export is checked by loading it with an independent implementation (timm, transformers'
timm wrapper, transformers' native ConvNextV2) and comparing outputs with the fcmae model that
wrote the checkpoint. Push runs against an autospec'd ``huggingface_hub.HfApi``; ``hf-hub:`` loading
runs through a hand-built cache in huggingface_hub's real layout with HF_HUB_OFFLINE=1.
"""

import hashlib
import json
import logging
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import fcmae
from fcmae.weights import hub

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

SIZE = 64  # input size recorded in the runs: the exported pretrained_cfg must say it, not timm's 224/288
LABELS = ["cat", "dog", "eel", "fox", "gnu"]
FAKE_TOKEN = "hf_FAKEtoken0123456789abcdefghijklmnopq"


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every parameter (GRN starts at zero, norms at one): a mis-mapped tensor shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.02))
    return model


def _files(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


# --------------------------------------------------------------------------- runs built here, by hand


def _finetune_run(root: Path, name: str) -> tuple[Path, torch.nn.Module]:
    """A fine-tuning run as fcmae.finetune leaves it: best.safetensors (fcmae names; metadata with the
    class names, input size and the epoch's accuracy), config.yaml, labels.txt, log.jsonl, final.yaml."""
    torch.manual_seed(1)
    model = perturb_(fcmae.create_model(name, num_classes=len(LABELS))).eval()
    run = root / f"ft_{name}"
    run.mkdir()
    meta = {
        "format": "fcmae-classifier",
        "model": name,
        "num_classes": str(len(LABELS)),
        "class_names": json.dumps(LABELS),
        "input_size": str(SIZE),
        "epoch": "2",
        "acc1": "87.5",
    }
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / "best.safetensors"), meta)
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"model": name, "input_size": SIZE, "dataset_name": "owner/pets", "hub_token": FAKE_TOKEN, "lr": 1e-3}
        )
    )
    (run / "labels.txt").write_text("\n".join(reversed(LABELS)) + "\n")  # the metadata's names come first
    (run / "log.jsonl").write_text('{"epoch": 2, "acc1": 87.5, "loss": 0.42}\n{"epoch": 3, "acc1": 80.0}\n')
    (run / "final.yaml").write_text(yaml.safe_dump({"epochs": 4, "step": 40}))
    return run, model


def _pretrain_run(root: Path) -> tuple[Path, torch.nn.Module]:
    """A pretraining run as fcmae.engine exports it: encoder.safetensors and fcmae.safetensors with the
    metadata (format, model, step, config json), log.jsonl and final.yaml; decoder narrowed to 64."""
    torch.manual_seed(2)
    mae = perturb_(fcmae.create_fcmae("convnextv2_atto", decoder_dim=64)).eval()
    run = root / "pretrain"
    run.mkdir()
    cfg = {
        "model": "convnextv2_atto",
        "input_size": SIZE,
        "mask_ratio": 0.6,
        "decoder_dim": 64,
        "decoder_depth": 1,
        "norm_pix_loss": True,
        "dataset_name": None,
    }
    meta = {"format": "fcmae", "model": "convnextv2_atto", "step": "7", "config": json.dumps(cfg)}
    full = {k: v.contiguous() for k, v in mae.state_dict().items()}
    save_file(
        {k.removeprefix("encoder."): v for k, v in full.items() if k.startswith("encoder.")},
        str(run / "encoder.safetensors"),
        metadata={**meta, "format": "fcmae-encoder"},
    )
    save_file(full, str(run / "fcmae.safetensors"), metadata=meta)
    (run / "log.jsonl").write_text('{"step": 5, "loss": 0.91}\n{"step": 7, "loss": 0.875}\n')
    (run / "final.yaml").write_text(yaml.safe_dump({"step": 7, "num_bad": 0}))
    return run, mae


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hub")


@pytest.fixture(scope="module")
def atto_export(root):
    run, model = _finetune_run(root, "convnextv2_atto")
    out = hub.export(
        run / "best.safetensors", root / "atto_export", model="convnextv2_atto", formats="both", license="mit"
    )
    return out, model


@pytest.fixture(scope="module")
def encoder_export(root):
    run, mae = _pretrain_run(root)
    return hub.export(run, root / "encoder_export", model="convnextv2_atto", formats="all"), mae


# --------------------------------------------------------------------------- (1) offline round trip


def _check_classifier_export(out: Path, model, rel_err, native: bool):
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = model(x)
        t = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # strict load inside timm
        assert rel_err(t(x), ref) < 1e-5
        wrapped = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
        assert type(wrapped).__name__ == "TimmWrapperForImageClassification"
        assert rel_err(wrapped(pixel_values=x).logits, ref) < 1e-4
    assert wrapped.config.id2label == dict(enumerate(LABELS))
    if native:
        hf = transformers.ConvNextV2ForImageClassification.from_pretrained(str(out / "transformers")).eval()
        with torch.no_grad():
            assert rel_err(hf(pixel_values=x).logits, ref) < 1e-4
        assert hf.config.layer_norm_eps == 1e-6
        assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.label2id["eel"] == 2
    return t


@pytest.mark.parametrize("name", ["convnextv2_atto", pytest.param("convnextv2_tiny", marks=pytest.mark.slow)])
def test_classifier_round_trip(name, root, atto_export, rel_err):
    if name == "convnextv2_atto":
        out, model = atto_export
    else:
        run, model = _finetune_run(root, name)
        out = hub.export(run / "best.safetensors", root / "tiny_export")  # timm's Linear-MLP layout
    t = _check_classifier_export(out, model, rel_err, native=name == "convnextv2_atto")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        fc1 = f.get_slice("stages.0.blocks.0.mlp.fc1.weight").get_shape()
        assert {"head.norm.weight", "head.fc.weight"} <= set(f.keys())
    assert len(fc1) == (4 if name == "convnextv2_atto" else 2)  # timm: 1x1 conv MLP for atto..nano only

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == name and config["num_classes"] == len(LABELS)
    assert config["num_features"] == model.num_features and config["global_pool"] == "avg"
    assert "num_classes" not in config["model_args"]  # transformers' wrapper would pass it twice
    assert config["label_names"] == LABELS
    registry = timm.models.get_pretrained_cfg(name).to_dict()  # timm's default weights: what must not leak
    assert registry["license"] == "cc-by-nc-4.0" and registry["tag"].startswith("fcmae_ft_in")
    assert registry["test_input_size"] == (3, 288, 288) and registry["hf_hub_id"]
    cfg = t.pretrained_cfg
    assert cfg["license"] == ("mit" if name == "convnextv2_atto" else "apache-2.0")
    assert cfg["tag"] == "fcmae_ft_pets" and cfg["input_size"] == (3, SIZE, SIZE)
    for leaked in ("test_input_size", "test_crop_pct", "hf_hub_id", "url", "origin_url"):
        assert cfg.get(leaked) is None, leaked
    assert cfg["num_classes"] == len(LABELS) and tuple(cfg["label_names"]) == tuple(LABELS)
    assert (cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"]) == ("bicubic", 0.875, "center")


def test_encoder_only_export(encoder_export, rel_err):
    out, mae = encoder_export
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = mae.encoder.forward_features(x)
        t = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert t.num_classes == 0 and t.pretrained_cfg["tag"] == "fcmae"
        assert rel_err(t.forward_features(x), ref) < 1e-5
        wrapped = transformers.AutoModel.from_pretrained(str(out)).eval()
        assert rel_err(wrapped(pixel_values=x).last_hidden_state, ref) < 1e-4
        native = transformers.ConvNextV2Model.from_pretrained(str(out / "transformers")).eval()
        assert rel_err(native(pixel_values=x).last_hidden_state, ref) < 1e-4
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # a fresh head.norm: timm loads strictly
        assert torch.equal(f.get_tensor("head.norm.weight"), torch.ones(320))
        assert torch.equal(f.get_tensor("head.norm.bias"), torch.zeros(320))
        assert "head.fc.weight" not in set(f.keys())

    # the full FCMAE continues: a fresh FCMAE given the export reproduces the original's loss and prediction
    desc = json.loads((out / "fcmae_config.json").read_text())
    assert desc["fcmae_args"]["decoder_dim"] == 64 and desc["step"] == 7
    again = fcmae.create_fcmae("convnextv2_atto", decoder_dim=desc["fcmae_args"]["decoder_dim"]).eval()
    hub.load_fcmae_weights(again, out)
    mask = again.gen_random_mask(x)
    with torch.no_grad():
        loss_a, pred_a, _ = mae(x, mask=mask)
        loss_b, pred_b, _ = again(x, mask=mask)
    assert torch.equal(pred_a, pred_b) and loss_a == loss_b
    with pytest.raises(ValueError, match="decoder_dim 512.*decoder_dim': 64"):
        hub.load_fcmae_weights(fcmae.create_fcmae("convnextv2_atto"), out)
    with pytest.raises(ValueError, match="No FCMAE decoder"):
        hub.load_fcmae_weights(again, out / "model.safetensors")


def test_model_card(atto_export, encoder_export):
    out, _ = atto_export
    meta = _front_matter(out / "README.md")
    assert meta["license"] == "mit" and meta["library_name"] == "timm"
    assert {"image-classification", "fcmae", "convnextv2", "timm"} <= set(meta["tags"])
    assert meta["datasets"] == ["owner/pets"] and meta["metrics"] == ["accuracy"]
    text = (out / "README.md").read_text()
    assert "| acc1 | 87.5 |" in text and "| epochs | 4 |" in text  # metrics read from the run
    assert "lr: 0.001" in text and "hub_token" not in text  # its config, without the credential
    assert 'timm.create_model("hf-hub:' in text and "AutoModelForImageClassification" in text
    assert "fcmae.load_checkpoint" in text
    for path in out.rglob("*"):  # the run config held a token under "hub_token": redacted everywhere
        assert not path.is_file() or FAKE_TOKEN.encode() not in path.read_bytes()
    enc, _ = encoder_export
    text = (enc / "README.md").read_text()
    assert "| loss | 0.875 |" in text and "load_fcmae_weights" in text and "head.norm" in text


def test_export_refuses_what_would_be_wrong(root, atto_export):
    run = root / "ft_convnextv2_atto"
    with pytest.raises(ValueError, match="5-class classifier"):
        hub.export(run / "best.safetensors", root / "x1", num_classes=10)
    with pytest.raises(ValueError, match="records model convnextv2_atto"):
        hub.export(run / "best.safetensors", root / "x2", model="convnextv2_femto")
    with pytest.raises(FileExistsError, match="not empty"):
        hub.export(run / "best.safetensors", atto_export[0])
    with pytest.raises(ValueError, match="label names for a 5-class"):
        hub.export(run / "best.safetensors", root / "x3", label_names=["a", "b"])
    with pytest.raises(ValueError, match="Unknown export format"):
        hub.parse_formats("timm,tflite")  # onnx is a format since fcmae 0.2
    assert hub.parse_formats("both,fcmae") == ["timm", "transformers", "fcmae"]


# --------------------------------------------------------------------------- (2) push


def test_push_through_autospec_hfapi(root, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    api = mock.create_autospec(hub.HfApi, instance=True)
    uploaded = {}

    def upload_folder(**kwargs):  # what would leave the machine, read at the moment of the call
        uploaded.update(_files(Path(kwargs["folder_path"])))
        return mock.DEFAULT

    api.upload_folder.side_effect = upload_folder
    monkeypatch.setattr(hub, "HfApi", mock.Mock(return_value=api))
    out = root / "push_export"
    with caplog.at_level(logging.DEBUG):
        hub.main(
            [
                "export",
                "--checkpoint",
                str(root / "ft_convnextv2_atto" / "best.safetensors"),
                "--out",
                str(out),
                "--repo-id",
                "me/atto-pets",
            ]
        )
        hub.main(
            [
                "push",
                "--folder",
                str(out),
                "--repo-id",
                "me/atto-pets",
                "--private",
                "--revision",
                "dev",
                "--commit-message",
                "first",
            ]
        )

    api.create_repo.assert_called_once_with("me/atto-pets", private=True, exist_ok=True, repo_type="model")
    api.create_branch.assert_called_once_with("me/atto-pets", branch="dev", repo_type="model", exist_ok=True)
    api.upload_folder.assert_called_once()
    kwargs = api.upload_folder.call_args.kwargs
    assert (kwargs["repo_id"], kwargs["revision"], kwargs["commit_message"]) == ("me/atto-pets", "dev", "first")
    assert kwargs["repo_type"] == "model" and Path(kwargs["folder_path"]) == out
    assert "token" not in kwargs and "token" not in api.create_repo.call_args.kwargs  # huggingface_hub finds it
    assert uploaded == _files(out) and set(uploaded) == {"config.json", "model.safetensors", "README.md"}
    assert "me/atto-pets" in (out / "README.md").read_text()

    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert FAKE_TOKEN not in text
    for path in out.rglob("*"):
        assert FAKE_TOKEN.encode() not in path.read_bytes()

    # the runners' helper: export next to the run, replace a previous export, push; no branch for main
    api.reset_mock()
    run = root / "ft_convnextv2_atto"
    for _ in range(2):
        hub.export_and_push(run / "best.safetensors", "me/atto-pets", api=api, formats=("timm",))
    assert api.upload_folder.call_args.kwargs["folder_path"] == str(run / "hub")
    assert api.upload_folder.call_args.kwargs["revision"] is None and not api.create_branch.called
    assert api.create_repo.call_args.kwargs["private"] is False


# --------------------------------------------------------------------------- (3) hf-hub: from the local cache


def _populate_cache(cache: Path, repo_id: str, folder: Path, commit: str) -> None:
    """huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<path> -> ../../blobs/<sha256>,
    refs/main holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for rel, sha in _files(folder).items():
        (repo / "blobs" / sha).write_bytes((folder / rel).read_bytes())
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / sha, link.parent))


def test_hf_hub_loading_from_offline_cache(tmp_path, monkeypatch, atto_export, encoder_export, rel_err):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # conftest: no request can leave the machine
    cache = tmp_path / "hub-cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    _populate_cache(cache, "owner/atto-pets", atto_export[0], commit)
    _populate_cache(cache, "owner/atto-fcmae", encoder_export[0], commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    _, model = atto_export
    for source in ("hf-hub:owner/atto-pets", f"hf-hub:owner/atto-pets@{commit}"):
        loaded = fcmae.create_model("convnextv2_atto", num_classes=len(LABELS))
        assert fcmae.load_checkpoint(loaded, source).missing == []
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        t = timm.create_model("hf-hub:owner/atto-pets", pretrained=True).eval()
        assert rel_err(t(x), model(x)) < 1e-5
        # transformers resolves its cache directory at import: give it the folder explicitly
        wrapped = transformers.AutoModelForImageClassification.from_pretrained("owner/atto-pets", cache_dir=cache)
        assert rel_err(wrapped.eval()(pixel_values=x).logits, model(x)) < 1e-4
    assert t.pretrained_cfg["license"] == "mit" and t.pretrained_cfg["hf_hub_id"] == "owner/atto-pets"

    _, mae = encoder_export
    again = fcmae.create_fcmae("convnextv2_atto", decoder_dim=64)
    hub.load_fcmae_weights(again, "hf-hub:owner/atto-fcmae")
    for k, v in mae.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="hf-hub:owner/not-cached"):  # offline: fails at once
        fcmae.load_checkpoint(fcmae.create_model("convnextv2_atto"), "hf-hub:owner/not-cached")
    with pytest.raises(FileNotFoundError, match="local cache"):
        hub.load_fcmae_weights(again, "hf-hub:owner/atto-pets")  # exported without --format fcmae


def test_official_fcmae_training_checkpoint_loads_whole(rel_err, tmp_path):
    """The official MinkowskiEngine FCMAE checkpoint (encoder kernels + dense decoder), built by the
    independent hand converter of test_checkpoints, loads into fcmae's FCMAE to continue pretraining."""
    from test_checkpoints import timm_reference, to_minkowski

    sd, x, features, _ = timm_reference("convnextv2_atto")
    official = to_minkowski(sd)
    torch.save({"model": official, "epoch": 799}, tmp_path / "checkpoint-799.pth")
    mae = fcmae.create_fcmae("convnextv2_atto").eval()
    hub.load_fcmae_weights(mae, tmp_path / "checkpoint-799.pth")
    with torch.no_grad():
        assert rel_err(mae.encoder.forward_features(x), features) < 1e-5
    block = mae.decoder[0]
    assert torch.equal(mae.mask_token, official["mask_token"]) and torch.equal(mae.pred.weight, official["pred.weight"])
    assert torch.equal(block.conv_dw.weight, official["decoder.0.dwconv.weight"])
    assert torch.equal(block.mlp.fc1.weight, official["decoder.0.pwconv1.weight"])
    assert torch.equal(block.mlp.grn.weight, official["decoder.0.grn.gamma"].flatten())
    assert torch.equal(block.mlp.grn.bias, official["decoder.0.grn.beta"].flatten())


@pytest.mark.parametrize("runner", ["pretrain", "finetune"])
def test_runner_push_to_hub(runner, tmp_path, monkeypatch):
    """--push-to-hub at the end of a run: exports, then create_repo + upload_folder on the real API surface."""
    from unittest import mock

    import numpy as np
    from huggingface_hub import HfApi
    from PIL import Image

    import fcmae.weights.hub

    api = mock.create_autospec(HfApi, instance=True)
    uploaded = {}
    api.upload_folder.side_effect = lambda **kw: uploaded.update(
        files=sorted(str(p.relative_to(kw["folder_path"])) for p in Path(kw["folder_path"]).rglob("*") if p.is_file())
    )
    monkeypatch.setattr(fcmae.weights.hub, "HfApi", lambda *a, **k: api)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "data" / split / label).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / label / f"{i}.png"
                )
    common = [
        "--model",
        "convnextv2_atto",
        "--input-size",
        "64",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--report-to",
        "none",
        "--output-dir",
        str(tmp_path / "out"),
        "--push-to-hub",
        "me/atto-test",
        "--hub-private",
    ]
    if runner == "pretrain":
        from fcmae.pretrain import main

        main(
            [
                *common,
                "--data",
                str(tmp_path / "data" / "train"),
                "--max-steps",
                "2",
                "--decoder-dim",
                "32",
                "--num-recon",
                "0",
            ]
        )
        expected = {"config.json", "model.safetensors", "README.md", "fcmae.safetensors"}
    else:
        from fcmae.finetune import main

        main([*common, "--data", str(tmp_path / "data"), "--epochs", "1", "--aa", "none", "--reprob", "0"])
        expected = {"config.json", "model.safetensors", "README.md", "transformers/config.json"}
    api.create_repo.assert_called_once()
    assert api.create_repo.call_args.args[0] == "me/atto-test" and api.create_repo.call_args.kwargs["private"] is True
    assert api.upload_folder.call_args.kwargs["repo_id"] == "me/atto-test"
    assert expected <= set(uploaded["files"])
