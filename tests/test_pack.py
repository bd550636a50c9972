"""`fcmae data pack` (fcmae.data.pack): an image folder with split and class folders, .npy arrays and a
corrupt file -> parquet / webdataset shards + manifest; output independent of --workers; resume after
an interrupted pack; checksums naming a damaged shard; read map-style by datasets and fcmae, streamed,
and trained on (pretraining with --streaming and --knn-data). CPU, offline."""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, run_cli
from PIL import Image

from fcmae.data import DataConfig, build_pretrain_loader, load_labelled, load_source
from fcmae.data.__main__ import main as data_main
from fcmae.data.pack import pack, verify


def noise(i, size=32):
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8))


def write_tree(root: Path, arrays: bool = True, broken: bool = True) -> Path:
    """train/ and val/ with cat/ and dog/ class folders of PNGs, two .npy arrays and a corrupt PNG."""
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                noise(100 * c + 10 * (split == "val") + i).save(root / split / name / f"{i:02d}.png")
    if arrays:
        for c, name in enumerate(("cat", "dog")):
            np.save(root / "train" / name / f"arr_{c}.npy", np.full((32, 32, 3), 40 * (c + 1), np.uint8))
    if broken:
        (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="module")
def packed(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    pack(str(tree), str(out), shard_size="16KB", workers=2, row_group_size="8KB", log=lambda *_: None)
    return out


def files(out: Path) -> dict:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and ".pack" not in p.parts
    }


@dataclass
class Labelled:  # the fields fcmae.data.load_labelled reads (fine-tuning's and --knn-data's config)
    data: str
    dataset_name: str = None
    dataset_config_name: str = None
    train_split: str = "train"
    val_split: str = "val"
    label_column: str = None
    image_column: str = None


def test_parquet_shards_columns_labels_arrays_and_manifest(tree, packed):
    manifest = json.loads((packed / "manifest.json").read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert (train["num_rows"], val["num_rows"]) == (19, 8) and manifest["label_names"] == ["cat", "dog"]
    assert len(train["shards"]) > 2 and set(manifest["columns"]) == {"image", "label", "shape", "dtype"}
    for s in train["shards"] + val["shards"]:  # counts and checksums hold
        data = (packed / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
        assert sum(s["row_groups"]) == s["num_rows"] == pq.read_metadata(packed / s["name"]).num_rows
    shards = sorted((packed / "train").glob("*.parquet"))
    table = [row for f in shards for row in pq.read_table(f).to_pylist()]
    by_path = {r["image"]["path"]: r for r in table}
    assert set(by_path) == {str(p.relative_to(tree)) for p in (tree / "train").rglob("*.*")}
    for path, row in by_path.items():
        assert row["image"]["bytes"] == (tree / path).read_bytes() and row["label"] == ["cat", "dog"].index(path[6:9])
        assert (row["shape"], row["dtype"]) == (([32, 32, 3], "|u1") if path.endswith(".npy") else (None, None))
    assert [p[6:9] for p in by_path] != sorted(p[6:9] for p in by_path)  # rows are shuffled, not class-sorted

    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in shards], split="train")
    assert ds.features["image"] == datasets.Image(decode=False)  # arrays inside: datasets must not open them
    assert ds.features["label"] == datasets.ClassLabel(names=["cat", "dog"])

    train_ds, _, val_ds, val_labels, names = load_labelled(Labelled(str(packed)))  # fine-tuning, k-NN
    assert (len(train_ds), len(val_ds), names) == (19, 8, ["cat", "dog"]) and sorted(val_labels) == [0] * 4 + [1] * 4
    assert load_source(DataConfig(data=str(packed)))[1] == 19
    for streaming in (False, True):  # the corrupt PNG is one bad image; the arrays are read as 3-channel images
        loader = build_pretrain_loader(
            DataConfig(data=str(packed), streaming=streaming, input_size=32, max_bad_fraction=0.5), batch_size=19
        )
        with pytest.warns(UserWarning, match="Skipping unreadable image train/dog/broken.png"):
            ((images, ok),) = list(loader)
        assert images.shape == (19, 3, 32, 32) and int((~ok).sum()) == 1


def test_output_does_not_depend_on_workers_and_an_interrupted_pack_resumes(tree, packed, tmp_path):
    one = tmp_path / "one"
    pack(str(tree), str(one), shard_size="16KB", workers=1, row_group_size="8KB", log=lambda *_: None)
    assert files(one) == files(packed)  # written by 1 and by 2 processes

    # a crash: no manifest yet, one shard never written, one half-written, a temporary file left behind
    (one / "manifest.json").unlink()
    (one / "train" / "shard-00001.parquet").unlink()
    with open(one / "train" / "shard-00002.parquet", "ab") as f:
        f.write(b"torn")
    (one / "train" / ".shard-00003.parquet.tmp-999").write_bytes(b"partial")
    untouched = one / "validation" / "shard-00000.parquet"
    mtime = untouched.stat().st_mtime_ns
    said = []
    pack(str(tree), str(one), shard_size="16KB", workers=2, row_group_size="8KB", log=said.append)
    n = sum(len(split["shards"]) for split in json.loads((packed / "manifest.json").read_text())["splits"].values())
    assert said[0] == f"resuming: {n - 2} of {n} shards already written"
    assert files(one) == files(packed) and untouched.stat().st_mtime_ns == mtime


def test_verify_names_a_damaged_shard_and_the_command_line(packed, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(packed, out)
    assert verify(str(out), log=lambda *_: None) == []
    victim = out / "train" / "shard-00001.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF  # a flipped bit: same size
    victim.write_bytes(bytes(data))
    assert data_main(["verify", str(out)]) == 2
    assert "damaged: train/shard-00001.parquet: sha256 differs" in capsys.readouterr().out
    assert data_main(["pack", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "is not a folder" in err[0]


def test_webdataset_shards_read_by_datasets_and_streamed(tmp_path):
    src = write_tree(tmp_path / "src", arrays=False, broken=False)  # one image type: datasets' loader needs it
    out = tmp_path / "wds"
    assert (
        data_main(
            ["pack", str(src), "--out", str(out), "--format", "webdataset", "--shard-size", "20KB", "--workers", "1"]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shard_format"] == "webdataset" and manifest["splits"]["train"]["num_rows"] == 16
    tars = sorted(str(p) for p in (out / "train").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files=tars, split="train")
    assert len(ds) == 16 and isinstance(ds.features["png"], datasets.Image) and sorted(ds["cls"]) == [0] * 8 + [1] * 8
    _, _, val, val_labels, _ = load_labelled(Labelled(str(out)))  # map-style through datasets' webdataset loader
    assert len(val) == 8 and sorted(val_labels) == [0] * 4 + [1] * 4
    loader = build_pretrain_loader(
        DataConfig(data=str(out), streaming=True, input_size=32), batch_size=4, num_workers=2
    )
    oks = [ok for _, ok in loader]
    assert len(oks) == 4 and all(ok.all() for ok in oks)


def test_pack_then_pretrain_streaming_with_knn(tmp_path):
    """The pretraining command streams the packed shards and its k-NN monitor reads them map-style
    (as fine-tuning does: both through fcmae.data.load_labelled, checked above)."""
    src = write_tree(tmp_path / "src", arrays=False, broken=False)
    out = tmp_path / "packed"
    assert data_main(["pack", str(src), "--out", str(out), "--shard-size", "20KB", "--workers", "2"]) == 0
    run_cli(
        [
            ROOT / "fcmae" / "pretrain.py",
            "--input-size",
            "64",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
            "--report-to",
            "none",
            "--model",
            "convnextv2_atto",
            "--decoder-dim",
            "32",
            "--num-recon",
            "1",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "1",
            "--data",
            out,
            "--streaming",
            "--knn-data",
            out,
            "--knn-every",
            "2",
            "--max-steps",
            "2",
            "--save-every",
            "2",
            "--output-dir",
            tmp_path / "pre",
        ]
    )
    final = yaml.safe_load((tmp_path / "pre" / "final.yaml").read_text())
    assert final["num_seen"] == 8 and final["num_bad"] == 0
    assert "knn_acc1" in (tmp_path / "pre" / "log.jsonl").read_text()
