"""N-channel arrays: reading (.npy, TIFF), integer scaling, transforms, per-channel statistics, CLI."""

import io
import itertools
import os

import numpy as np
import pytest
import tifffile
import torch
from conftest import run_cli
from PIL import Image

from fcmae.data.__main__ import list_files, main
from fcmae.data.arrays import array_eval_transform, array_train_transform, channel_stats, read_array

H, W = 6, 5
RNG = np.random.default_rng(0)


def u16(*shape):
    return RNG.integers(0, 65536, shape, dtype=np.uint16)


@pytest.mark.parametrize("bands", [1, 4, 7])
def test_tiff_band_layouts_round_trip(tmp_path, bands):
    hwn = u16(H, W, bands)
    want = hwn.astype(np.float64) / 65535
    nhw = np.ascontiguousarray(hwn.transpose(2, 0, 1))
    files = {  # (file written, channel_axis to read it with)
        "stack_last.tif": (lambda p: tifffile.imwrite(p, hwn, photometric="minisblack"), "last"),  # pages:
        "stack_first.tif": (lambda p: tifffile.imwrite(p, nhw, photometric="minisblack"), "first"),  # no band tag
    }
    if bands > 1:  # bands as samples per pixel (GDAL's layout): the tags say where they are
        files["contig.tif"] = (
            lambda p: tifffile.imwrite(p, hwn, photometric="minisblack", planarconfig="contig", metadata=None),
            "first",
        )
        files["planar.tif"] = (
            lambda p: tifffile.imwrite(p, nhw, photometric="minisblack", planarconfig="separate", metadata=None),
            "last",
        )
    else:
        files["plain.tiff"] = (lambda p: tifffile.imwrite(p, hwn[..., 0]), "first")
    for name, (write, axis) in files.items():
        write(tmp_path / name)
        got = read_array(tmp_path / name, channel_axis=axis, expected_channels=bands)
        assert got.dtype == np.float32 and got.shape == (H, W, bands), name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7, err_msg=name)
        np.testing.assert_array_equal(read_array((tmp_path / name).read_bytes(), axis), got)


def test_npy_layouts_round_trip(tmp_path):
    x = RNG.normal(size=(H, W, 3)).astype(np.float32) * 100  # floats: taken as given
    np.save(tmp_path / "last.npy", x)
    np.save(tmp_path / "first.npy", x.transpose(2, 0, 1))
    np.save(tmp_path / "flat.npy", x[..., 1])
    np.testing.assert_array_equal(read_array(tmp_path / "last.npy", "last"), x)
    np.testing.assert_array_equal(read_array(str(tmp_path / "first.npy"), "first"), x)
    np.testing.assert_array_equal(read_array({"bytes": None, "path": str(tmp_path / "flat.npy")}), x[..., 1:2])
    data = (tmp_path / "first.npy").read_bytes()
    np.testing.assert_array_equal(read_array({"bytes": data, "path": "x.npy"}, "first"), x)
    assert read_array(tmp_path / "first.npy", "last").shape == (3, H, W)  # as declared, not guessed


def test_integer_scaling_against_hand_values(tmp_path):
    cases = [
        (np.array([0, 51, 255], np.uint8), [0.0, 0.2, 1.0]),
        (np.array([0, 13107, 65535], np.uint16), [0.0, 0.2, 1.0]),
        (np.array([-32768, 0, 32767], np.int16), [0.0, 32768 / 65535, 1.0]),
        (np.array([False, True, True]), [0.0, 1.0, 1.0]),
        (np.array([-3.5, 0.25, 1e4], np.float64), [-3.5, 0.25, 1e4]),
    ]
    for values, want in cases:
        np.save(tmp_path / "v.npy", values.reshape(1, 3))
        got = read_array(tmp_path / "v.npy")
        assert got.dtype == np.float32 and got.shape == (1, 3, 1)
        np.testing.assert_allclose(got.ravel(), want, rtol=1e-7, err_msg=str(values.dtype))
        tifffile.imwrite(tmp_path / "v.tif", values.reshape(1, 3))
        np.testing.assert_array_equal(read_array(tmp_path / "v.tif"), got)


def test_errors_name_the_file(tmp_path):
    np.save(tmp_path / "four.npy", u16(H, W, 4))
    with pytest.raises(ValueError, match=r"four\.npy.*4 channels.*expected 7"):
        read_array(tmp_path / "four.npy", expected_channels=7)
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match=r"junk\.tif"):
        read_array(tmp_path / "junk.tif")
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match=r"cube\.npy.*\(2, 3, 4, 5\)"):
        read_array(tmp_path / "cube.npy")
    with pytest.raises(ValueError, match="channel_axis"):
        read_array(tmp_path / "four.npy", channel_axis="middle")
    # LZW needs imagecodecs in tifffile: without it the message says so; with it, the file reads
    rgb = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    try:
        import imagecodecs  # noqa: F401

        np.testing.assert_allclose(read_array(tmp_path / "lzw.tif"), rgb / 255, atol=1e-7)
    except ImportError:
        with pytest.raises(ValueError, match=r"lzw\.tif.*pip install imagecodecs"):
            read_array(tmp_path / "lzw.tif")


def test_transforms_apply_one_geometry_to_every_band_then_normalise():
    base = torch.rand(1, 40, 48)
    bands = torch.arange(1, 8).float()[:, None, None]
    x = (base * bands).permute(1, 2, 0).numpy()  # (H, W, 7): band c = (c + 1) x band 0
    mean, std = [0.5] * 7, [2.0] * 7
    torch.manual_seed(3)
    out = array_train_transform(32, mean, std)(x)
    torch.manual_seed(3)
    assert torch.equal(array_train_transform(32, mean, std)(x), out)  # reproducible from the seed
    raw = out * 2.0 + 0.5  # undo the normalisation by hand
    assert out.shape == (7, 32, 32) and out.dtype == torch.float32
    torch.testing.assert_close(raw, raw[:1] * bands)  # bicubic is linear: same crop for every band
    # eval: a 36 x 36 input is already at 32 / 0.875 = 36, so the resize is the identity: a centre crop
    y = torch.rand(4, 36, 36)
    mean, std = [0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0]
    got = array_eval_transform(32, mean, std)(y)
    want = (y[:, 2:34, 2:34] - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="fcmae.data stats"):
        array_eval_transform(32, mean[:3], std[:3])(y)


def _folder(tmp_path):
    folder = tmp_path / "arrays"
    (folder / "sub").mkdir(parents=True)
    shapes = [(H, W), (9, 4), (3, 11), (7, 7), (5, 8)]  # different sizes: stats are per pixel, not per file
    arrays = [u16(*s, 3) for s in shapes]
    for i, a in enumerate(arrays):
        np.save(folder / ("sub" if i % 2 else ".") / f"a{i}.npy", a.transpose(2, 0, 1))
    # the values the loaders see: x / 65535 rounded to float32
    return folder, [(a.reshape(-1, 3) / 65535).astype(np.float32).astype(np.float64) for a in arrays]


def test_channel_stats_equal_numpy_over_all_pixels(tmp_path):
    folder, arrays = _folder(tmp_path)
    files = list_files(str(folder), (".npy",))
    assert [os.path.basename(f) for f in files] == ["a0.npy", "a2.npy", "a4.npy", "a1.npy", "a3.npy"]
    mean, std = channel_stats(files, "first", sample=5)
    pixels = np.concatenate(arrays)
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-12)
    # a sample of 2: the statistics of one pair of files, drawn from the seed
    mean2, std2 = channel_stats(files, "first", sample=2, seed=1)
    pairs = [np.concatenate([arrays[i], arrays[j]]) for i, j in itertools.combinations(range(5), 2)]
    assert any(np.allclose(mean2, p.mean(0), rtol=1e-12) and np.allclose(std2, p.std(0), rtol=1e-12) for p in pairs)
    # images: RGB values / 255
    for i in range(3):
        Image.fromarray(RNG.integers(0, 256, (8 + i, 9, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    pngs = sorted(str(p) for p in tmp_path.glob("*.png"))
    rgb = np.concatenate([(np.asarray(Image.open(p)).reshape(-1, 3) / 255).astype(np.float32) for p in pngs])
    rgb = rgb.astype(np.float64)
    mean, std = channel_stats(pngs)
    np.testing.assert_allclose(mean, rgb.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, rgb.std(0), rtol=1e-12)


def test_cli_prints_stats_and_exits_2_on_user_errors(tmp_path, capsys):
    folder, arrays = _folder(tmp_path)
    os.symlink(folder / "sub", folder / "sub" / "loop")  # followed, but each real folder once
    (folder / "notes.txt").write_text("not a sample")
    assert main(["stats", str(folder), "--channel-axis", "first"]) == 0
    out = capsys.readouterr().out.splitlines()
    pixels = np.concatenate(arrays)
    assert out[0].startswith("# 3 channel(s)") and "5 of the 5 files" in out[0]
    mean = [float(v) for v in out[1].removeprefix("mean: [").removesuffix("]").split(",")]
    std = [float(v) for v in out[2].removeprefix("std: [").removesuffix("]").split(",")]
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-5)
    flags = out[3].removeprefix("# flags: ").split()
    assert flags[0] == "--mean" and [float(v) for v in flags[1].split(",")] == mean
    assert flags[2] == "--std" and [float(v) for v in flags[3].split(",")] == std
    (tmp_path / "empty").mkdir()
    assert main(["stats", str(tmp_path / "empty")]) == 2
    assert "No files" in capsys.readouterr().err
    proc = run_cli(["-m", "fcmae.data", "stats", str(tmp_path / "missing")], check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "missing" in proc.stderr and "not a folder" in proc.stderr


# ----------------------------------------------------------------------------- the loaders in array mode


def _constant_bands(folder, values, n=4, size=(40, 48), first=False):
    """n .npy files whose band c is the constant values[c] (uint16): any resize or crop keeps it."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = np.broadcast_to(np.asarray(values, np.uint16), (*size, len(values)))
        np.save(folder / f"c{i}.npy", np.moveaxis(a, -1, 0) if first else a)
    return folder


def test_pretrain_loader_and_recon_batch_of_four_channel_npy(tmp_path):
    from fcmae.data import DataConfig, build_pretrain_loader, recon_images

    values, mean, std = [0, 16384, 32768, 65535], [0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.2, 0.1]
    want = ((torch.tensor(values) / 65535 - torch.tensor(mean)) / torch.tensor(std))[:, None, None]  # by hand
    folder = _constant_bands(tmp_path / "npy", values, first=True)
    np.save(folder / "wrong.npy", np.zeros((3, 40, 48), np.uint16))  # 3 bands in a 4-band run: a bad file
    cfg = DataConfig(
        data=str(folder), input_size=32, in_chans=4, mean=mean, std=std, channel_axis="first", max_bad_fraction=0.5
    )
    with pytest.warns(UserWarning, match=r"wrong\.npy: 3 channels"):
        imgs, ok = next(iter(build_pretrain_loader(cfg, batch_size=5, seed=1)))
    assert imgs.shape == (5, 4, 32, 32) and ok.tolist().count(False) == 1
    torch.testing.assert_close(imgs, want.expand(5, 4, 32, 32), atol=1e-5, rtol=0)  # the stand-in included
    recon = recon_images(cfg, 3)
    assert recon.shape == (3, 4, 32, 32)
    torch.testing.assert_close(recon, want.expand(3, 4, 32, 32), atol=1e-5, rtol=0)


def test_streaming_all_bad_stand_in_has_n_channels():
    from fcmae.data import Reader, StreamingPretrainImages
    from fcmae.data.arrays import array_train_transform

    mean, std = [0.2] * 5, [0.5] * 5
    ds = StreamingPretrainImages(
        None, array_train_transform(32, mean, std), 2, 1, 32, max_bad_fraction=1.0, reader=Reader(5), mean=mean
    )
    with pytest.warns(UserWarning, match="Skipping"):
        out = list(ds._group(0, [b"not an array", b"nor this"]))
    assert [ok for _, ok in out] == [False, False]
    assert all(torch.allclose(x, torch.zeros(5, 32, 32), atol=1e-6) for x, _ in out)  # the mean, normalised


def test_labelled_npy_folders_train_and_val(tmp_path):
    from types import SimpleNamespace

    from fcmae.data import build_train_loader, build_val_loader, load_labelled

    for split in ("train", "val"):
        for k, name in enumerate(("a", "b")):
            _constant_bands(tmp_path / split / name, [1000 * (k + 1)] * 4, n=2)
    (tmp_path / "val" / "b" / "c1.npy").write_bytes(b"broken")
    cfg = SimpleNamespace(
        data=str(tmp_path),
        dataset_name=None,
        dataset_config_name=None,
        train_split="train",
        val_split="validation",
        label_column=None,
        image_column=None,
        input_size=32,
        batch_size=2,
        num_workers=0,
        seed=0,
        max_bad_fraction=0.5,
        aa="rand-m9-mstd0.5-inc1",
        reprob=0.25,
        color_jitter=0.4,
        crop_pct=None,
        eval_batch_size=4,
        in_chans=4,
        mean=[0.0] * 4,
        std=[1.0] * 4,
        channel_axis="last",
    )
    train, train_y, val, val_y, names = load_labelled(cfg)
    assert names == ["a", "b"] and sorted(train_y) == [0, 0, 1, 1]
    with pytest.warns(UserWarning, match="apply to RGB images only"):
        loader = build_train_loader(cfg, train, train_y, cfg.batch_size, cfg.seed, cfg.aa, cfg.reprob, cfg.color_jitter)
    loader.set_epoch(0)
    x, _, ok = next(iter(loader))
    assert x.shape == (2, 4, 32, 32) and ok.all()
    with pytest.warns(UserWarning, match=r"c1\.npy"):
        x, _, ok = next(iter(build_val_loader(cfg, val, val_y, cfg.eval_batch_size, cfg.crop_pct)))
    assert x.shape == (4, 4, 32, 32) and ok.tolist() == [True, True, True, False]
    assert torch.equal(x[3], torch.zeros(4, 32, 32))  # the placeholder of the unreadable file: 4 channels
    torch.testing.assert_close(x[0], torch.full((4, 32, 32), 1000 / 65535))  # mean 0, std 1: values as read


def test_reader_rgb_runs_read_npy_and_float_tiff(tmp_path):
    from fcmae.data import Reader

    rgb = RNG.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    reflectance = RNG.random((6, 5, 3), dtype=np.float32)
    tifffile.imwrite(tmp_path / "float.tif", reflectance, photometric="rgb")  # PIL cannot read float RGB
    np.save(tmp_path / "x.npy", rgb)
    Image.fromarray((rgb >> 8).astype(np.uint8)).save(tmp_path / "x.png")
    np.testing.assert_array_equal(Reader()(str(tmp_path / "float.tif")), reflectance)
    np.testing.assert_array_equal(Reader()(str(tmp_path / "x.npy")), (rgb / 65535).astype(np.float32))
    png = Reader()(str(tmp_path / "x.png"))
    assert isinstance(png, Image.Image) and np.array_equal(np.asarray(png), rgb >> 8)
    with pytest.raises(ValueError, match="neither a .npy nor a TIFF"):
        Reader(4)(str(tmp_path / "x.png"))  # an RGB image in a 4-channel run: a bad file


def test_too_many_bad_files_is_a_one_line_user_error_even_from_a_worker():
    from torch.utils.data import DataLoader

    from fcmae.data import Reader, TooManyBadFiles
    from fcmae.data.samples import PretrainImages

    class Rows(list):  # the datasets object's interface: rows with an 'image' value
        pass

    good = io.BytesIO()
    np.save(good, np.zeros((8, 8, 4), np.uint8))
    rows = Rows([{"image": b"not an array"}] * 29 + [{"image": good.getvalue()}])  # the last one stands in
    ds = PretrainImages(rows, lambda x: x, reader=Reader(4))
    with pytest.raises(TooManyBadFiles) as caught:  # the worker's warnings stay in the worker
        next(iter(DataLoader(ds, batch_size=30, num_workers=1)))  # raised in the worker, re-raised here
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, RuntimeError)
    assert str(caught.value).startswith("21 of 21 images") and "\n" not in str(caught.value)
