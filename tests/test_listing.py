"""Local listing: links to folders and files followed, link loops caught, hidden files skipped, splits
and class names as datasets' imagefolder gives them, one listing per run; and the entry points on
linked folders. Expected values are the files each test lays out, or datasets' own imagefolder."""

import json
import os
import time
from types import SimpleNamespace

import datasets
import pytest
import yaml
from conftest import ROOT, run_cli
from PIL import Image

from fcmae.data import DataConfig, build_pretrain_loader, decode_rgb, list_files, load_images, load_labelled
from fcmae.data.listing import class_labels, local_files


def image(path, colour=(10, 20, 30), size=(8, 8)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def tree(root, names, **kw):
    return [image(os.path.join(root, n), **kw) for n in names]


def rel(root, paths):
    return [os.path.relpath(p, root) for p in paths]


def labelled_cfg(data):
    return SimpleNamespace(
        data=str(data),
        dataset_name=None,
        dataset_config_name=None,
        train_split="train",
        val_split="validation",
        label_column=None,
        image_column=None,
    )


def test_linked_val_folder_and_linked_class_folders(tmp_path):
    tree(tmp_path / "store", ["val/cat/v0.png", "val/dog/v1.png", "kitties/c0.png", "kitties/c1.png", "puppies/d0.png"])
    data = tmp_path / "data"
    tree(data, ["train/bird/b0.png"])
    os.symlink(tmp_path / "store" / "val", data / "val")  # a linked split
    os.symlink(tmp_path / "store" / "kitties", data / "train" / "cat")  # linked class folders
    os.symlink(tmp_path / "store" / "puppies", data / "train" / "dog")
    files = list_files(str(data))
    assert {s: rel(data, fs) for s, fs in files.items()} == {
        "train": ["train/bird/b0.png", "train/cat/c0.png", "train/cat/c1.png", "train/dog/d0.png"],
        "validation": ["val/cat/v0.png", "val/dog/v1.png"],
    }
    _, train_labels, val, val_labels, names = load_labelled(labelled_cfg(data))
    assert names == ["bird", "cat", "dog"]  # the link names, not the targets' (kitties, puppies)
    assert train_labels == [0, 1, 1, 2] and val_labels == [1, 2]
    assert val.column_names == ["image"] and decode_rgb(val[1]["image"]).size == (8, 8)


def test_link_loops_raise_naming_the_link(tmp_path):
    tree(tmp_path / "a", ["train/cat/0.png", "train/dog/1.png"])
    os.symlink(tmp_path / "a", tmp_path / "a" / "train" / "cat" / "up")  # back to an ancestor
    with pytest.raises(ValueError, match=r"Link loop: .*train/cat/up leads back to .*a\b"):
        list_files(str(tmp_path / "a"))
    tree(tmp_path / "b", ["x/0.png", "y/1.png"])  # x/to_y -> y, y/to_x -> x: a loop through two links
    os.symlink(tmp_path / "b" / "y", tmp_path / "b" / "x" / "to_y")
    os.symlink(tmp_path / "b" / "x", tmp_path / "b" / "y" / "to_x")
    with pytest.raises(ValueError, match="Link loop: .*(to_x|to_y) leads back"):
        load_images(DataConfig(data=str(tmp_path / "b")))


def test_links_to_files_and_to_one_folder_twice(tmp_path):
    real = image(str(tmp_path / "elsewhere" / "photo.png"), colour=(200, 0, 0))
    tree(tmp_path / "data", ["cat/0.png"])
    os.symlink(real, tmp_path / "data" / "cat" / "linked.png")
    os.makedirs(tmp_path / "data" / "dog")
    os.symlink(tmp_path / "data" / "cat", tmp_path / "data" / "dog" / "same")  # not a loop: no ancestor
    ds = load_images(DataConfig(data=str(tmp_path / "data")))
    paths = rel(tmp_path / "data", [v["path"] for v in ds["image"]])
    assert paths == ["cat/0.png", "cat/linked.png", "dog/same/0.png", "dog/same/linked.png"]
    assert decode_rgb(ds[1]["image"]).getpixel((0, 0)) == (200, 0, 0)


def test_hidden_special_broken_and_non_image_files_are_left_out(tmp_path):
    root = tmp_path / "data"
    tree(root, ["a/0.png", "a/.hidden.png", ".git/1.png", "a/.ipynb_checkpoints/2.png", "__MACOSX/3.png", "b/__4.png"])
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("# data")
    os.symlink(tmp_path / "nowhere", root / "a" / "gone.png")
    with pytest.warns(UserWarning, match="1 broken link"):
        ds = load_images(DataConfig(data=str(root)))
    assert rel(root, [v["path"] for v in ds["image"]]) == ["a/0.png", "b/__4.png"]  # datasets keeps __x files


def test_splits_and_labels_match_datasets_imagefolder(tmp_path):
    root = tmp_path / "data"
    names = [
        f"{split}/{c}/{i}.{ext}"
        for split in ("train", "val", "test")
        for c in ("b_cls", "a-cls", "Z", "c 1")
        for i, ext in ((0, "png"), (1, "jpg"), (2, "PNG"))
    ] + ["val/only_in_val/9.png"]
    tree(root, names)
    (root / "train" / "a-cls" / "skip.txt").write_text("x")
    reference = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    assert sorted(list_files(str(root))) == sorted(reference)  # train, validation, test
    files = {split: local_files(str(root), split)[1] for split in reference}  # the images of each split
    for split, ds in reference.items():
        paths = [v["path"] for v in ds.cast_column("image", datasets.Image(decode=False))["image"]]
        # datasets lists val/only_in_val/9.png twice (it matches both '**/val/**' and '**/*_val/**'): once here
        assert list(dict.fromkeys(paths)) == files[split] and len(paths) == len(files[split]) + (split == "validation")
    got_names, labels = class_labels({s: files[s] for s in ("train", "validation")})
    pair = datasets.load_dataset(
        "imagefolder", data_files={s: files[s] for s in ("train", "validation")}, cache_dir=str(tmp_path / "cache")
    )
    assert got_names == pair["train"].features["label"].names
    assert labels == {s: pair[s]["label"] for s in ("train", "validation")}
    loaded = load_labelled(labelled_cfg(root))
    assert loaded[4] == got_names and loaded[1] == labels["train"] and loaded[3] == labels["validation"]
    # images at two depths: datasets gives no labels, nor does class_labels
    tree(tmp_path / "mixed", ["x/0.png", "y/1.png", "2.png"])
    mixed = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "mixed"), cache_dir=str(tmp_path / "c2"))
    assert "label" not in mixed["train"].features and class_labels(list_files(str(tmp_path / "mixed"))) is None


def test_a_folder_is_listed_once_until_it_changes(tmp_path, monkeypatch):
    root = tmp_path / "data"
    tree(root, ["train/cat/0.png", "train/dog/1.png"])
    past = time.time() - 3600
    for folder in (root, root / "train", root / "train" / "cat", root / "train" / "dog"):
        os.utime(folder, (past, past))  # settled folders: recent times would be listed again (racy clocks)
    calls = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: calls.append(p) or real_scandir(p))
    first = list_files(str(root))
    assert len(calls) == 4
    cfg = DataConfig(data=str(root), input_size=32)
    build_pretrain_loader(cfg, batch_size=2)
    load_images(cfg)
    assert list_files(str(root)) is first and len(calls) == 4  # no second walk
    image(str(root / "train" / "dog" / "2.png"))  # dog's time changes
    assert rel(root, list_files(str(root))["train"])[-1] == "train/dog/2.png" and len(calls) == 8


# ----------------------------------------------------------------------------- entry points


def linked_labelled_folder(tmp_path):
    """data/train/{circle,square} are links; data/val is a link. 8 training images, 4 validation."""
    store = tmp_path / "store"
    for name, colour in (("circle", (250, 40, 40)), ("square", (40, 40, 250))):
        tree(store / f"{name}_files", [f"{i}.png" for i in range(4)], colour=colour, size=(80, 72))
        tree(store / "val" / name, [f"{i}.png" for i in range(2)], colour=colour, size=(72, 80))
    data = tmp_path / "data"
    os.makedirs(data / "train")
    for name in ("circle", "square"):
        os.symlink(store / f"{name}_files", data / "train" / name)
    os.symlink(store / "val", data / "val")
    return data


def test_finetune_runs_on_linked_val_and_class_folders(tmp_path):
    data = linked_labelled_folder(tmp_path)
    out = tmp_path / "out"
    run_cli(
        [
            ROOT / "finetune" / "run.py",
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
            "--epochs",
            "1",
            "--warmup-epochs",
            "0",
            "--data",
            data,
            "--output-dir",
            out,
        ]
    )
    assert (out / "labels.txt").read_text().split() == ["circle", "square"]  # the link names
    (row,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert row["val_samples"] == 4  # every image of the linked val/ was evaluated


def test_pretrain_runs_on_linked_class_folders(tmp_path):
    data = linked_labelled_folder(tmp_path) / "train"
    out = tmp_path / "out"
    run_cli(
        [
            ROOT / "fcmae" / "pretrain.py",
            "--model",
            "convnextv2_atto",
            "--decoder-dim",
            "32",
            "--input-size",
            "64",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--report-to",
            "none",
            "--num-recon",
            "2",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "1",
            "--max-steps",
            "2",
            "--save-every",
            "2",
            "--data",
            data,
            "--output-dir",
            out,
        ]
    )
    # the encoder is a whole timm ConvNeXt V2 trunk: every key and shape, nothing left over (strict),
    # the head's norm and fc aside (the classifier is fine-tuning's)
    import timm
    from safetensors.torch import load_file

    trunk = timm.create_model("convnextv2_atto", num_classes=0, conv_mlp=False)  # nn.Linear MLPs, as fcmae
    missing, unexpected = trunk.load_state_dict(load_file(str(out / "encoder.safetensors")), strict=False)
    assert unexpected == [] and set(missing) <= {"head.norm.weight", "head.norm.bias"}, (missing, unexpected)
    # both linked class folders were read: 8 images, 2 steps of 4 an epoch, each image seen once
    config, final = (yaml.safe_load((out / name).read_text()) for name in ("config.yaml", "final.yaml"))
    assert config["steps_per_epoch"] == 2 and (final["epochs"], final["num_seen"], final["num_bad"]) == (1, 8, 0)
