"""N-channel arrays: reading (.npy, TIFF), integer scaling, transforms, per-channel statistics, CLI."""
import itertools
import os

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import run_cli
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
        files["contig.tif"] = (lambda p: tifffile.imwrite(p, hwn, photometric="minisblack",
                                                         planarconfig="contig", metadata=None), "first")
        files["planar.tif"] = (lambda p: tifffile.imwrite(p, nhw, photometric="minisblack",
                                                         planarconfig="separate", metadata=None), "last")
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
    assert any(np.allclose(mean2, p.mean(0), rtol=1e-12) and np.allclose(std2, p.std(0), rtol=1e-12)
               for p in pairs)
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
