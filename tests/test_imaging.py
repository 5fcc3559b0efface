"""Image files: round trips per format and depth, the float scaling rule, feature-map sets, bad files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lying_files import header_only_png
from PIL import Image, ImageOps

from rmidl import DTypeError, ImageReadError, InputError, NonFiniteInput, OptionError, ShapeError
from rmidl.imaging import default_image, load_image, save_image, save_maps

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(1, 1), (7, 13), (48, 64)]


def pixels(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True, dtype=dtype)


LOSSLESS = [(suffix, c) for suffix in (".png", ".tif", ".tiff", ".bmp", ".ppm") for c in (None, 3)]


@pytest.mark.parametrize(("suffix", "channels"), [*LOSSLESS, (".pgm", None)])  # PGM is grayscale only
def test_lossless_8_bit_round_trip(tmp_path: Path, rng: np.random.Generator, suffix: str, channels) -> None:
    for h, w in SIZES:
        array = pixels(rng, (h, w) if channels is None else (h, w, channels), np.uint8)
        path = save_image(tmp_path / f"a{suffix}", array)
        got = load_image(path)
        assert got.dtype == np.uint8 and got.flags.writeable and got.flags.c_contiguous
        np.testing.assert_array_equal(got, array)
    assert [p.name for p in tmp_path.iterdir()] == [f"a{suffix}"]  # no temporary file left behind


@pytest.mark.parametrize("suffix", [".png", ".tif", ".pgm"])
def test_16_bit_round_trip(tmp_path: Path, rng: np.random.Generator, suffix: str) -> None:
    for h, w in SIZES:
        array = pixels(rng, (h, w), np.uint16)
        got = load_image(save_image(tmp_path / f"b{suffix}", array))
        assert got.dtype == np.uint16
        np.testing.assert_array_equal(got, array)


def test_jpeg_is_close(tmp_path: Path) -> None:
    smooth = default_image(np.uint8)[::4, ::4]
    got = load_image(save_image(tmp_path / "c.jpg", smooth, quality=95))
    assert got.shape == smooth.shape and np.abs(got.astype(int) - smooth).mean() < 2


def test_gray_option(tmp_path: Path, rng: np.random.Generator) -> None:
    colour = pixels(rng, (9, 11, 3), np.uint8)
    path = save_image(tmp_path / "rgb.png", colour)
    luma = colour.astype(np.float64) @ [0.299, 0.587, 0.114]
    gray = load_image(path, gray=True)
    assert gray.shape == (9, 11) and gray.dtype == np.uint8
    assert np.abs(gray - luma).max() <= 0.5 + 1e-9
    mono = pixels(rng, (5, 6), np.uint8)
    spread = load_image(save_image(tmp_path / "mono.png", mono), gray=False)
    assert spread.shape == (5, 6, 3) and all((spread[..., c] == mono).all() for c in range(3))
    assert load_image(tmp_path / "mono.png", gray=True).shape == (5, 6)


def test_other_pixel_modes_are_normalised(tmp_path: Path, rng: np.random.Generator) -> None:
    rgba = pixels(rng, (6, 7, 4), np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgba[..., :3])
    bilevel = rng.random((8, 16)) > 0.5
    Image.fromarray(bilevel).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(load_image(tmp_path / "bits.png"), bilevel * 255)
    rgb = pixels(rng, (5, 5, 3), np.uint8)
    Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MAXCOVERAGE).save(tmp_path / "pal.png")
    palette = load_image(tmp_path / "pal.png")
    assert palette.shape == (5, 5, 3) and palette.dtype == np.uint8
    floats = rng.standard_normal((4, 9)).astype(np.float32)
    Image.fromarray(floats).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "f.tif"), floats)


def test_exif_orientation_is_applied(tmp_path: Path, rng: np.random.Generator) -> None:
    array = pixels(rng, (20, 40), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    Image.fromarray(array).save(tmp_path / "o.jpg", exif=exif)
    assert load_image(tmp_path / "o.jpg").shape == (40, 20)


def test_float_scaling_rule(tmp_path: Path) -> None:
    def saved(array: np.ndarray, **options) -> np.ndarray:
        return load_image(save_image(tmp_path / "s.png", array, **options)).astype(np.int64)

    unit = np.array([[0.0, 0.25, 1.0]])
    np.testing.assert_array_equal(saved(unit), [[0, 64, 255]])
    np.testing.assert_array_equal(saved(unit, bits=16), [[0, 16384, 65535]])
    wide = np.array([[-2.0, 0.0, 2.0]], np.float32)
    np.testing.assert_array_equal(saved(wide), [[0, 128, 255]])
    np.testing.assert_array_equal(saved(wide, scale="unit"), [[0, 0, 255]])
    np.testing.assert_array_equal(saved(unit * 0.5, scale="stretch"), [[0, 64, 255]])
    np.testing.assert_array_equal(saved(np.full((2, 2), 7.5)), np.zeros((2, 2)))
    np.testing.assert_array_equal(saved(np.array([[True, False]])), [[255, 0]])
    np.testing.assert_array_equal(saved(np.array([[-5, 0, 5]], np.int32)), [[0, 128, 255]])
    np.testing.assert_array_equal(saved(np.array([[0, 1, 255]], np.uint8), bits=16), [[0, 257, 65535]])
    np.testing.assert_array_equal(saved(np.array([[0, 257, 65535]], np.uint16), bits=8), [[0, 1, 255]])
    np.testing.assert_array_equal(saved(np.ones((3, 3, 1), np.uint8) * 9), np.full((3, 3), 9))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", ["auto", "stretch", "robust"])
def test_values_near_dtype_limits_stretch_without_overflow(tmp_path: Path, dtype: type, scale: str) -> None:
    """A span wider than the dtype's largest value (max - min overflows) still stretches as documented."""
    top = float(np.finfo(dtype).max)
    fractions = np.array([-1.0, -0.6, 0.1, 0.7, 1.0])  # no pixel lands on a rounding tie
    low, high = np.percentile(fractions, [0.5, 99.5]) if scale == "robust" else (-1.0, 1.0)
    want = np.rint(np.clip((fractions - low) / (high - low), 0, 1) * 255)
    values = (fractions * top).astype(dtype)[None]
    got = load_image(save_image(tmp_path / "limits.png", values, scale=scale))
    np.testing.assert_array_equal(got, want[None])


def test_save_maps_writes_each_map_and_a_montage(tmp_path: Path, rng: np.random.Generator) -> None:
    maps = rng.standard_normal((5, 20, 30)).astype(np.float32) * np.arange(1, 6)[:, None, None]
    written = save_maps(maps, tmp_path / "out" / "deep", scale="stretch")
    assert [p.name for p in written] == [*(f"map_{k:03d}.png" for k in range(5)), "montage.png"]
    for k, path in enumerate(written[:-1]):
        got = load_image(path)
        low, high = maps[k].min(), maps[k].max()
        expected = np.rint((maps[k].astype(np.float64) - low) / (high - low) * 255)
        assert np.abs(got - expected).max() <= 1  # float32 work may round a .5 the other way
    assert load_image(written[-1]).ndim in (2, 3)  # the montage's content: test_montage.py
    assert save_maps(maps[0], tmp_path / "one", montage=False) == [tmp_path / "one" / "map_000.png"]


def test_save_maps_robust_default_clips_outliers(tmp_path: Path, rng: np.random.Generator) -> None:
    feature = rng.uniform(-1, 1, (100, 100))
    feature[0, 0], feature[0, 1] = 1000.0, -1000.0  # two extreme responses must not gray out the rest
    (path, _) = save_maps(feature, tmp_path)
    got = load_image(path).astype(np.float64)
    low, high = np.percentile(feature, [0.5, 99.5])
    expected = np.rint(np.clip((feature - low) / (high - low), 0, 1) * 255)
    assert got[0, 0] == 255 and got[0, 1] == 0
    assert np.abs(got - expected).max() <= 1 and got.std() > 60


def test_default_image_is_photo_like() -> None:
    path = ROOT / "rmidl" / "data" / "default.png"
    assert path.stat().st_size < 1 << 20
    picture = default_image()
    assert picture.shape == (720, 1280) and picture.dtype == np.float32
    assert picture.min() >= 0 and picture.max() <= 1 and picture.std() > 0.1
    as_bytes = default_image(np.uint8)
    np.testing.assert_array_equal(as_bytes, load_image(path))
    np.testing.assert_allclose(picture, as_bytes / 255, rtol=1e-6)
    # photo-like, not noise: neighbours are strongly correlated, yet there are many sharp edges
    neighbours = np.corrcoef(picture[:, :-1].ravel(), picture[:, 1:].ravel())[0, 1]
    edges = (np.abs(np.diff(picture, axis=1)) > 0.1).mean()
    assert neighbours > 0.95 and 0.002 < edges < 0.1
    assert len(np.unique(as_bytes)) > 150


@pytest.mark.parametrize(("dtype", "message"), [(np.int32, "int32 must be a float type"),
                                               ("pixels", "'pixels' is not a numpy dtype")])
def test_default_image_refuses_other_dtypes(dtype: object, message: str) -> None:
    with pytest.raises(DTypeError, match=message):
        default_image(dtype)


def test_default_image_script_reproduces_the_shipped_file(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "make_default_image.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "d.png")], check=True, timeout=100,
                   capture_output=True)
    np.testing.assert_array_equal(load_image(tmp_path / "d.png"), default_image(np.uint8))


def broken(tmp_path: Path, name: str) -> Path:
    """Write one kind of unreadable image into tmp_path and return its path."""
    rng = np.random.default_rng(3)
    path = tmp_path / name
    good = tmp_path / f"good{Path(name).suffix}"
    if name in ("truncated.png", "truncated.jpg", "corrupt.png"):
        Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(good)
        data = bytearray(good.read_bytes())
        if name == "corrupt.png":
            data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
        else:
            data = data[: len(data) // 2]
        path.write_bytes(bytes(data))
    elif name == "garbage.png":
        path.write_bytes(b"hello, not an image")
    elif name == "empty.png":
        path.write_bytes(b"")
    elif name == "anim.gif":
        Image.new("L", (4, 4)).save(path)
    elif name == "folder.png":
        path.mkdir()
    elif name == "bomb.png":  # a valid header claiming 30000x30000 pixels, no data
        header_only_png(path, 30000, 30000)
    return path


READ_FAILURES = [
    ("missing.png", "does not exist"),
    ("folder.png", "is a directory"),
    ("garbage.png", "is not a PNG, JPEG, TIFF, BMP or PGM/PPM image"),
    ("empty.png", "is not a PNG"),
    ("anim.gif", "is not a PNG"),
    ("truncated.png", "corrupt or truncated"),
    ("truncated.jpg", "corrupt or truncated"),
    ("corrupt.png", "corrupt or truncated"),
    ("bomb.png", "too large to decode safely"),
]


@pytest.mark.parametrize(("name", "message"), READ_FAILURES)
def test_unreadable_files(tmp_path: Path, name: str, message: str) -> None:
    path = broken(tmp_path, name)
    with pytest.raises(ImageReadError, match=message) as raised:
        load_image(path)
    assert str(path) in str(raised.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(tmp_path: Path) -> None:
    path = save_image(tmp_path / "p.png", np.zeros((2, 2), np.uint8))
    path.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied"):
        load_image(path)


def test_an_unsupported_pixel_mode_is_named_not_called_corrupt(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every mode Pillow 13 opens is handled, so a future one is simulated: its message must come through."""
    path = save_image(tmp_path / "m.png", np.zeros((2, 2), np.uint8))

    def decoded_as_unknown_mode(image: Image.Image, *, in_place: bool) -> None:
        image._mode = "I;32"  # Pillow's storage behind Image.mode

    monkeypatch.setattr(ImageOps, "exif_transpose", decoded_as_unknown_mode)
    with pytest.raises(ImageReadError, match=r"^image '[^']*m\.png' has pixel mode I;32, which rmidl"):
        load_image(path)


def test_bad_gray_option(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="gray='yes'"):
        load_image(tmp_path / "x.png", gray="yes")  # type: ignore[arg-type]


z = np.zeros((4, 4), np.float32)
SAVE_FAILURES = [
    ("x.gif", z, {}, OptionError, "suffix '.gif' is not one of"),
    ("noext", z, {}, OptionError, r"suffix '\(none\)'"),
    ("x.png", np.zeros((4, 4, 2)), {}, ShapeError, r"\(4, 4, 2\) is not \(H, W\)"),
    ("x.png", np.zeros((0, 4)), {}, ShapeError, r"\(0, 4\)"),
    ("x.png", np.zeros(4), {}, ShapeError, r"\(4,\)"),
    ("x.png", np.zeros((4, 4), complex), {}, DTypeError, "complex128"),
    ("x.png", np.array([[np.nan, 0.0]]), {}, NonFiniteInput, "NaN or Inf"),
    ("x.jpg", z, {"bits": 16}, OptionError, "JPEG files are 8-bit"),
    ("x.bmp", np.zeros((4, 4), np.uint16), {}, OptionError, "BMP files are 8-bit"),
    ("x.png", np.zeros((4, 4, 3)), {"bits": 16}, OptionError, "colour files are 8-bit"),
    ("x.png", z, {"bits": 12}, OptionError, "bits=12"),
    ("x.png", z, {"scale": "log"}, OptionError, "scale 'log'"),
    ("x.jpg", z, {"quality": "high"}, OptionError, "quality='high'"),
    ("x.jpg", z, {"quality": 101}, OptionError, "quality=101"),
    ("missing/dir/x.png", z, {}, InputError, "cannot write image"),
]


@pytest.mark.parametrize("case", SAVE_FAILURES, ids=[f"{c[0]}-{c[3].__name__}" for c in SAVE_FAILURES])
def test_save_failures(tmp_path: Path, case: tuple) -> None:
    name, array, options, error, message = case
    with pytest.raises(error, match=message):
        save_image(tmp_path / name, array, **options)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_save_maps_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ShapeError, match=r"\(2, 2, 2, 2\)"):
        save_maps(np.zeros((2, 2, 2, 2)), tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="cannot create directory"):
        save_maps(np.zeros((1, 2, 2)), tmp_path / "file" / "sub")
    with pytest.raises(NonFiniteInput, match="map 1"):
        save_maps(np.array([np.zeros((2, 2)), np.full((2, 2), np.inf)]), tmp_path / "maps")
