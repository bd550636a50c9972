"""Data layer: sources, RGB decoding, bad images, determinism and sharding. CPU, offline, own data."""

import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate import skip_first_batches
from accelerate.data_loader import prepare_data_loader
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from fcmae.data import (
    DEMO_DIR,
    BadImageCounter,
    DataConfig,
    PretrainImages,
    build_pretrain_loader,
    decode_rgb,
    load_images,
    pretrain_transform,
    to_rgb,
)


@pytest.fixture(autouse=True)
def no_stream_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s whenever a parquet stream ends or is closed (a guard against an Arrow
    # shutdown crash, apache/arrow#45214): harmless once per epoch, too slow for tests.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def index_image(i):
    """A solid 8x8 PNG whose colour encodes i, so a sample's index survives any resize."""
    return Image.new("RGB", (8, 8), (i % 256, i // 256, 7))


def read_index(x):
    return int(x[0, 0, 0]) + 256 * int(x[1, 0, 0])


def identity(image):  # keeps exact pixel values; module-level so workers can pickle it
    return pil_to_tensor(image.resize((8, 8)))


def png_bytes(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_folder(root, n, make=index_image, sub=lambda i: ""):
    for i in range(n):
        os.makedirs(root / sub(i), exist_ok=True)
        make(i).save(root / sub(i) / f"{i:04d}.png")
    return root


def write_parquet(path, n, column="image"):
    images = [{"bytes": png_bytes(index_image(i)), "path": f"{i}.png"} for i in range(n)]
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({column: pa.array(images, type=struct), "label": list(range(n))}), path)
    return path


def cfg_for(tmp_path, data, **kw):
    return DataConfig(data=str(data), cache_dir=str(tmp_path / "cache"), **kw)


def indices(loader):
    return [read_index(x) for images, _ in loader for x in images]


def test_folders_flat_and_class_subfolders_load(tmp_path):
    flat = write_folder(tmp_path / "flat", 6)
    classes = write_folder(tmp_path / "classes", 6, sub=lambda i: ["cat", "dog"][i % 2])
    for root in (flat, classes):
        ds = load_images(cfg_for(tmp_path, root))
        assert ds.column_names == ["image"] and len(ds) == 6  # class labels dropped
    loader = build_pretrain_loader(cfg_for(tmp_path, classes, input_size=64), batch_size=3)
    images, ok = next(iter(loader))
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32 and ok.all()


def test_demo_images_load():
    ds = load_images(DataConfig(data=None))
    assert len(ds) == len(list(DEMO_DIR.glob("*.jpg"))) >= 10
    assert all(decode_rgb(v).mode == "RGB" for v in ds["image"])


def test_parquet_with_embedded_bytes_map_and_streaming(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", 12, column="pixels")
    cfg = cfg_for(tmp_path, path, image_column="pixels")
    assert len(load_images(cfg)) == 12
    loader = build_pretrain_loader(cfg, batch_size=4, transform=identity)
    assert sorted(indices(loader)) == list(range(12))
    cfg.streaming = True
    loader = build_pretrain_loader(cfg, batch_size=4, transform=identity)
    assert len(loader) == 3 and sorted(indices(loader)) == list(range(12))


def _odd_mode_images():
    """(image file bytes, expected RGB value of pixel 0, of pixel 1), values worked out by hand."""
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putdata([1, 0])
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    sixteen = Image.fromarray(np.array([[65535, 32768]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    bits = Image.new("1", (2, 1))
    bits.putpixel((0, 0), 1)
    return {
        "L": (png_bytes(Image.new("L", (2, 1), 77)), (77,) * 3, (77,) * 3),
        "LA": (png_bytes(Image.new("LA", (2, 1), (77, 0))), (77,) * 3, (77,) * 3),
        "RGBA": (png_bytes(Image.new("RGBA", (2, 1), (10, 20, 30, 0))), (10, 20, 30), (10, 20, 30)),
        "P": (png_bytes(palette), (200, 100, 50), (0, 0, 0)),
        "P+transparency": (png_bytes(transparent), (200, 100, 50), (0, 0, 0)),
        "CMYK": (png_bytes(Image.new("CMYK", (2, 1), (0, 255, 255, 0)), "TIFF"), (255, 0, 0), (255, 0, 0)),
        "I;16 png": (png_bytes(sixteen), (255,) * 3, (128,) * 3),
        "I;16 tiff": (png_bytes(sixteen, "TIFF"), (255,) * 3, (128,) * 3),
        "1": (png_bytes(bits), (255,) * 3, (0,) * 3),
    }


def test_every_odd_mode_becomes_rgb_with_correct_values(tmp_path):
    cases = _odd_mode_images()
    names = list(cases)
    os.makedirs(tmp_path / "modes")
    for k, name in enumerate(names):  # through the real path: folder -> datasets -> wrapper
        suffix = ".tif" if "TIFF" in name.upper() or name == "CMYK" else ".png"
        (tmp_path / "modes" / f"{k:02d}{suffix}").write_bytes(cases[name][0])
    ds = PretrainImages(load_images(cfg_for(tmp_path, tmp_path / "modes")), pil_to_tensor)
    for k, name in enumerate(names):
        x, ok = ds[k]
        assert ok and x.shape == (3, 1, 2), name
        assert tuple(x[:, 0, 0].tolist()) == cases[name][1], name
        assert tuple(x[:, 0, 1].tolist()) == cases[name][2], name
    wide = Image.fromarray(np.array([[65535, 32768, 0]], dtype=np.int32))  # mode I
    assert wide.mode == "I" and np.asarray(to_rgb(wide))[0, :, 0].tolist() == [255, 128, 0]


def _write_bad(root):
    good = png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (root / "0001_truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "0002_garbage.jpg").write_bytes(b"this is not an image" * 10)
    (root / "0003_empty.png").write_bytes(b"")


def test_corrupt_images_are_replaced_flagged_and_counted(tmp_path):
    root = write_folder(tmp_path / "bad", 30)
    _write_bad(root)
    ds = PretrainImages(load_images(cfg_for(tmp_path, root)), identity, max_bad_fraction=0.5)
    files = [os.path.basename(v["path"]) for v in ds.hf["image"]]
    with pytest.warns(UserWarning, match="Skipping unreadable image"):
        samples = [ds[i] for i in range(len(ds))]
    bad = [i for i, f in enumerate(files) if not f[:4].isdigit() or "_" in f]
    assert [i for i, (_, ok) in enumerate(samples) if not ok] == bad and ds.num_bad == 3
    assert ds.num_seen == 33 and len(ds.bad_files) == 3
    for i in bad:  # stand-in: the next decodable index, so batch shapes stay fixed
        j = next(j for j in range(i + 1, len(ds)) if j not in bad)
        assert torch.equal(samples[i][0], samples[j][0])


def test_too_many_bad_images_raise(tmp_path):
    root = write_folder(tmp_path / "bad", 110)
    _write_bad(root)
    loader = build_pretrain_loader(cfg_for(tmp_path, root), batch_size=8, transform=identity)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match=r"3 of 1\d\d images .*1\.0%"):
        list(loader)  # the safety net inside the dataset
    counter = BadImageCounter(0.01)
    counter.update(torch.tensor([True] * 98 + [False]))
    with pytest.raises(RuntimeError, match=r"2 of 100 images \(2\.0%\).*max_bad_fraction"):
        counter.update(torch.tensor([False]))
    everything_bad = BadImageCounter(0.5)
    with pytest.raises(RuntimeError, match="21 of 21"):
        everything_bad.update(torch.zeros(21, dtype=torch.bool))


def test_errors_say_what_was_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(cfg_for(tmp_path, tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    for root in ("empty", "text"):
        with pytest.raises(FileNotFoundError, match=r"No images found.*\.jpeg.*\.png.*\.parquet"):
            load_images(cfg_for(tmp_path, tmp_path / root))
    path = write_parquet(tmp_path / "d.parquet", 4, column="pixels")
    with pytest.raises(ValueError, match=r"Available columns: \['pixels', 'label'\]"):
        load_images(cfg_for(tmp_path, path))  # no Image-typed column and none named image/img
    with pytest.raises(ValueError, match=r"no column 'photo'.*\['pixels', 'label'\]"):
        load_images(cfg_for(tmp_path, path, image_column="photo"))
    with pytest.raises(RuntimeError, match="needs network access, or a local copy"):
        load_images(DataConfig(dataset_name="someone/not-cached-anywhere"))
    with pytest.raises(ValueError, match="multiple of 32"):
        pretrain_transform(100)
    with pytest.raises(ValueError, match="too few"):
        build_pretrain_loader(cfg_for(tmp_path, path, image_column="pixels"), batch_size=3, world_size=2)


def noise_image(i):
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), dtype=np.uint8))


def batches(loader):
    return [(x.clone(), ok.clone()) for x, ok in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(p, q) for (x, p), (y, q) in zip(a, b))


@pytest.mark.parametrize("streaming", [False, True])
def test_same_seed_and_epoch_give_identical_batches(tmp_path, streaming):
    if streaming:
        images = [{"bytes": png_bytes(noise_image(i)), "path": f"{i}.png"} for i in range(16)]
        pq.write_table(pa.table({"image": images}), tmp_path / "d.parquet")
        cfg = cfg_for(tmp_path, tmp_path / "d.parquet", image_column="image", streaming=True, input_size=32)
    else:
        cfg = cfg_for(tmp_path, write_folder(tmp_path / "noise", 16, make=noise_image), input_size=32)
    rng_before = torch.get_rng_state()
    first = batches(build_pretrain_loader(cfg, batch_size=4, seed=5, epoch=3))
    assert torch.equal(torch.get_rng_state(), rng_before)  # augmentation leaves the main RNG alone
    assert same(first, batches(build_pretrain_loader(cfg, batch_size=4, seed=5, epoch=3)))
    assert same(first, batches(build_pretrain_loader(cfg, batch_size=4, num_workers=2, seed=5, epoch=3)))
    loader = build_pretrain_loader(cfg, batch_size=4, seed=5)
    loader.set_epoch(3)
    assert same(first[2:], batches(skip_first_batches(loader, 2)))  # exact mid-epoch resume
    loader.set_epoch(4)
    assert not torch.equal(batches(loader)[0][0], first[0][0])


def test_map_style_sharding_with_accelerate_covers_each_sample_once(tmp_path):
    cfg = cfg_for(tmp_path, write_folder(tmp_path / "idx", 25))
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = build_pretrain_loader(cfg, batch_size=3, seed=1, transform=identity, world_size=2)
            shard = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
            shard.set_epoch(epoch)
            resumed = indices(skip_first_batches(shard, 1))  # a resume skips on the prepared loader
            seen.append(indices(shard))
            assert len(seen[-1]) == 4 * 3  # 25 // 3 = 8 full batches -> 4 per rank
            assert resumed == seen[-1][3:]
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0] + seen[1])) == 24
        orders.append(seen)
    assert orders[0] != orders[1]


def test_streaming_sharding_covers_each_sample_once(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", 24)
    cfg = cfg_for(tmp_path, path, streaming=True)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            loader = build_pretrain_loader(
                cfg,
                batch_size=3,
                seed=2,
                epoch=epoch,
                rank=rank,
                world_size=2,
                transform=identity,
                num_workers=2 * rank,
            )
            seen.append(indices(loader))
            assert len(loader) == 4 and len(seen[-1]) == 12
        assert sorted(seen[0] + seen[1]) == list(range(24))
