"""rmidl.datasets.open: layouts and order, laziness (decodes counted), batches and prefetch, bad inputs,
.npz sources, descriptions for workers."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rmidl import ImageReadError, InputError, OptionError, ShapeError, datasets, load_image, save_image
from rmidl.datasets import _sources


def _png(path: Path, rng: np.random.Generator, shape: tuple[int, ...] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_image(path, rng.integers(0, 256, shape, dtype=np.uint8))


@pytest.fixture
def folder(tmp_path: Path, rng: np.random.Generator) -> Path:
    """Classes b, a, c (made out of order), a nested folder in c, hidden and non-image files."""
    root = tmp_path / "set"
    for name in ("b/2.png", "b/10.png", "a/x.png", "c/z/1.png", "c/y.png", "c/a.pgm"):
        _png(root / name, rng)
    (root / "a" / "notes.txt").write_text("not an image")
    _png(root / "a" / ".hidden.png", rng)
    _png(root / ".cache" / "skip.png", rng)
    return root


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every image file decoded, in order (wraps the load_image the file source calls)."""
    seen: list[str] = []

    def counting(path: str, **kwargs: object) -> np.ndarray:
        seen.append(str(path))
        return load_image(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_sources, "load_image", counting)
    return seen


def test_image_folder_order_labels_and_paths(folder: Path) -> None:
    ds = datasets.open(folder)
    assert ds.classes == ("a", "b", "c")
    relative = [os.path.relpath(p, folder) for p in ds.paths or ()]
    assert relative == ["a/x.png", "b/10.png", "b/2.png", "c/a.pgm", "c/y.png", "c/z/1.png"]
    assert ds.labels is not None and ds.labels.tolist() == [0, 1, 1, 2, 2, 2]
    assert all(os.path.isabs(p) for p in ds.paths or ())
    assert ds.ids.tolist() == list(range(6)) and len(ds) == 6
    assert datasets.open(folder).paths == ds.paths  # deterministic


def test_flat_folder_glob_and_single_file(tmp_path: Path, rng: np.random.Generator) -> None:
    for name in ("b.png", "a.png", "c.jpg"):
        _png(tmp_path / "flat" / name, rng)
    flat = datasets.open(tmp_path / "flat")
    assert [Path(p).name for p in flat.paths or ()] == ["a.png", "b.png", "c.jpg"]
    assert flat.labels is None and flat.classes == ()
    globbed = datasets.open(str(tmp_path / "flat" / "*.png"))
    assert [Path(p).name for p in globbed.paths or ()] == ["a.png", "b.png"]
    recursive = datasets.open(str(tmp_path / "**" / "*.jpg"))
    assert [Path(p).name for p in recursive.paths or ()] == ["c.jpg"]
    one = datasets.open(tmp_path / "flat" / "c.jpg")
    assert len(one) == 1 and one[0].shape == (12, 10)


def test_bad_layouts(tmp_path: Path, rng: np.random.Generator) -> None:
    _png(tmp_path / "mixed" / "loose.png", rng)
    _png(tmp_path / "mixed" / "class" / "x.png", rng)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    cases = [
        (tmp_path / "mixed", "both class folders (class, ...) and loose images (loose.png, ...)"),
        (tmp_path / "empty", "holds no images"),
        (str(tmp_path / "nothing" / "*.png"), "holds no images"),
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "notes.txt", "is not a directory, a glob, an .npz file or an image"),
    ]
    for path, text in cases:
        with pytest.raises(InputError) as caught:
            datasets.open(path)
        assert text in str(caught.value) and "\n" not in str(caught.value)


def test_nothing_is_decoded_until_read(folder: Path, decodes: list[str]) -> None:
    ds = datasets.open(folder)
    view = ds[2:5]
    assert (len(ds), len(view), view.ids.tolist()) == (6, 3, [2, 3, 4])
    assert view.labels is not None and view.labels.tolist() == [1, 2, 2]
    _ = ds.subset([5, 0]), ds.paths, ds.classes, repr(ds)
    assert decodes == []
    batch = view.read()
    assert batch.ids.tolist() == [2, 3, 4] and batch.images.shape == (3, 12, 10)
    # the first image is decoded once more, for the dataset's shape
    assert sorted(decodes) == sorted([*ds.paths[2:5], ds.paths[0]])  # type: ignore[index]
    decodes.clear()
    view.read()
    assert len(decodes) == 3


def test_values_are_unit_intensities(folder: Path) -> None:
    ds = datasets.open(folder)
    image = ds[0]
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, load_image(ds.paths[0]).astype(np.float32) / 255)  # type: ignore[index]
    np.testing.assert_array_equal(ds[-1], ds.read([5]).images[0])
    with pytest.raises(IndexError, match="image 6 is out of range"):
        ds[6]


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_batches_cover_every_id_in_order(folder: Path, prefetch: int) -> None:
    ds = datasets.open(folder)
    timings: dict[str, float] = {}
    batches = list(ds.batches(4, prefetch=prefetch, timings=timings))
    assert [b.ids.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    np.testing.assert_array_equal(np.concatenate([b.images for b in batches]), ds.read().images)
    assert np.concatenate([b.labels for b in batches if b.labels is not None]).tolist() == ds.labels.tolist()
    assert timings["LOAD"] > 0


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rmidl-dataset-prefetch"]


def test_prefetch_is_bounded_and_stops_when_closed(tmp_path: Path, rng: np.random.Generator,
                                                   decodes: list[str]) -> None:
    for i in range(40):
        _png(tmp_path / "many" / f"{i:02d}.png", rng)
    ds = datasets.open(tmp_path / "many")
    iterator = ds.batches(2, prefetch=2)
    first = next(iterator)
    assert first.ids.tolist() == [0, 1]
    # decoded: the shape probe, the batch taken, two queued and at most one in the worker's hands
    assert len(decodes) <= 1 + 2 * 4
    iterator.close()  # type: ignore[attr-defined]
    assert _prefetch_threads() == []
    assert len(decodes) <= 1 + 2 * 4


def test_errors_in_the_prefetch_thread_reach_the_consumer(folder: Path) -> None:
    path = Path(datasets.open(folder).paths[3])  # type: ignore[index]
    path.write_bytes(path.read_bytes()[:40])
    iterator = datasets.open(folder).batches(2, prefetch=2)
    assert next(iterator).ids.tolist() == [0, 1]
    with pytest.raises(ImageReadError, match=str(path)):
        next(iterator)
    assert _prefetch_threads() == []


def test_bad_files_stop_the_read_or_are_skipped_and_recorded(folder: Path) -> None:
    paths = datasets.open(folder).paths or ()
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:60])  # truncated
    os.remove(paths[4])
    os.mkfifo(paths[4])  # a FIFO where an image was: must not block
    with pytest.raises(ImageReadError) as caught:
        datasets.open(folder).read()
    assert paths[1] in str(caught.value) and "\n" not in str(caught.value)
    assert str(caught.value).endswith("(skip_bad=True, or --skip-bad, leaves such images out)")
    with pytest.raises(ImageReadError, match="is not a regular file"):
        datasets.open(folder)[4]
    ds = datasets.open(folder, skip_bad=True)
    batch = ds.read()
    assert batch.ids.tolist() == [0, 2, 3, 5] and len(batch.images) == 4
    assert batch.labels is not None and batch.labels.tolist() == [0, 1, 2, 2]
    assert set(ds.bad) == {1, 4}
    assert paths[1] in ds.bad[1] and "not a regular file" in ds.bad[4]


def test_every_image_bad_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"not a png")
    ds = datasets.open(tmp_path / "broken", skip_bad=True)
    with pytest.raises(InputError, match=r"has no readable image \(1 bad\)"):
        ds.read()


def test_mixed_sizes_need_resize_or_crop(tmp_path: Path, rng: np.random.Generator) -> None:
    _png(tmp_path / "m" / "a.png", rng, (12, 10))
    _png(tmp_path / "m" / "b.png", rng, (9, 16))
    with pytest.raises(ShapeError) as caught:
        datasets.open(tmp_path / "m").read()
    message = str(caught.value)
    assert "b.png' is 16x9 " in message and "images are 10x12 " in message and "resize=" in message  # W x H
    with pytest.raises(ShapeError):  # skip_bad does not hide a configuration problem
        datasets.open(tmp_path / "m", skip_bad=True).read()
    assert datasets.open(tmp_path / "m", resize=(8, 6)).read().images.shape == (2, 8, 6)
    assert datasets.open(tmp_path / "m", crop=8).read().images.shape == (2, 8, 8)
    # resize=int sets the shorter side (aspect kept), so mixed aspects still need a crop
    assert datasets.open(tmp_path / "m" / "a.png", resize=5)[0].shape == (6, 5)
    assert datasets.open(tmp_path / "m", resize=9, crop=9).read().images.shape == (2, 9, 9)
    with pytest.raises(ShapeError, match="is 16x9, smaller than the crop 10x11"):  # W x H
        datasets.open(tmp_path / "m", crop=(11, 10)).read()
    skipped = datasets.open(tmp_path / "m", crop=(11, 10), skip_bad=True)
    assert skipped.read().ids.tolist() == [0] and "smaller than the crop" in skipped.bad[1]


def test_resize_matches_pillow_and_crop_is_centred(tmp_path: Path, rng: np.random.Generator) -> None:
    from PIL import Image

    path = _png(tmp_path / "one.png", rng, (12, 10))
    pixels = load_image(path).astype(np.float32) / 255
    expected = np.asarray(Image.fromarray(pixels).resize((5, 7), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(datasets.open(path, resize=(7, 5))[0], expected)
    np.testing.assert_array_equal(datasets.open(path, crop=(4, 6))[0], pixels[4:8, 2:8])


def test_channels_must_agree_unless_gray_is_given(tmp_path: Path, rng: np.random.Generator) -> None:
    _png(tmp_path / "c" / "a.png", rng, (12, 10))
    _png(tmp_path / "c" / "b.png", rng, (12, 10, 3))
    with pytest.raises(ShapeError, match="gray="):
        datasets.open(tmp_path / "c").read()
    assert datasets.open(tmp_path / "c", gray=True).read().images.shape == (2, 12, 10)
    assert datasets.open(tmp_path / "c", gray=False).read().images.shape == (2, 12, 10, 3)


BAD_OPTIONS: list[tuple[dict[str, object], str]] = [
    ({"resize": 0}, "resize=0"),
    ({"resize": (3, 0)}, "resize=(3, 0)"),
    ({"crop": "big"}, "crop='big'"),
    ({"gray": "yes"}, "gray='yes'"),
    ({"skip_bad": 1}, "skip_bad=1"),
]


@pytest.mark.parametrize(("options", "text"), BAD_OPTIONS)
def test_bad_options(folder: Path, options: dict[str, object], text: str) -> None:
    with pytest.raises(OptionError, match=None) as caught:
        datasets.open(folder, **options)  # type: ignore[arg-type]
    assert text in str(caught.value)


def test_bad_batch_options_and_positions(folder: Path) -> None:
    ds = datasets.open(folder)
    for kwargs, text in (({"batch_size": 0}, "batch_size=0"),
                         ({"batch_size": 2, "prefetch": -1}, "prefetch=-1")):
        with pytest.raises(OptionError, match=text):
            ds.batches(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="cannot take positions"):
        ds.subset([0, 9])


def _npz(path: Path, compressed: bool, **arrays: np.ndarray) -> Path:
    with path.open("wb") as handle:
        (np.savez_compressed if compressed else np.savez)(handle, **arrays)
    return path


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize(("dtype", "channels"), [(np.uint8, None), (np.float32, 3), (np.uint16, 1)])
def test_npz_images_are_read_one_at_a_time(tmp_path: Path, rng: np.random.Generator, compressed: bool,
                                           dtype: type, channels: int | None) -> None:
    shape = (7, 9, 8) if channels is None else (7, 9, 8, channels)
    top = 255 if dtype == np.uint8 else 60000 if dtype == np.uint16 else 1
    images = (rng.random(shape) * top).astype(dtype)
    labels = np.array([2, 0, 1, 1, 0, 2, 2])
    path = _npz(tmp_path / "set.npz", compressed, images=images, labels=labels,
                classes=np.array(["cat", "dog", "emu"]))
    with datasets.open(path) as ds:
        assert len(ds) == 7 and ds.classes == ("cat", "dog", "emu") and ds.paths is None
        assert ds.labels is not None and ds.labels.tolist() == labels.tolist()
        expected = images.astype(np.float32)
        if dtype != np.float32:
            expected /= np.iinfo(dtype).max
        if channels == 1:
            expected = expected[..., 0]
        for i in (6, 0, 3, 2):  # out of order: a compressed member restarts its decompression
            np.testing.assert_array_equal(ds[i], expected[i])
        np.testing.assert_array_equal(ds.read().images, expected)
        assert "image 3 of" in ds.name(3)


def test_npz_labels_without_classes_and_gray(tmp_path: Path, rng: np.random.Generator) -> None:
    rgb = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    path = _npz(tmp_path / "rgb.npz", False, images=rgb, labels=np.array([0, 2, 1]))
    ds = datasets.open(path, gray=True)
    assert ds.classes == ("0", "1", "2") and ds[0].shape == (4, 5)
    luma = np.clip(np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(ds.read().images, luma.astype(np.float32) / 255)


def test_bad_npz_files(tmp_path: Path, rng: np.random.Generator) -> None:
    good = np.zeros((3, 4, 4), np.uint8)
    bad_values = np.ones((2, 4, 4), np.float32)
    bad_values[1, 2, 2] = np.nan
    cases: list[tuple[str, dict[str, np.ndarray], str]] = [
        ("noimages.npz", {"pixels": good}, "holds no array 'images' (arrays: pixels)"),
        ("flat.npz", {"images": np.zeros((3, 4))}, "expected (n, H, W) or (n, H, W, C)"),
        ("empty.npz", {"images": np.zeros((0, 4, 4))}, "holds no images"),
        ("bool.npz", {"images": np.zeros((2, 4, 4), bool)}, "dtype bool"),
        ("fortran.npz", {"images": np.asfortranarray(np.zeros((2, 4, 4)))}, "Fortran order"),
        ("labels.npz", {"images": good, "labels": np.array([0, 1])}, "'labels' must be 3 integers"),
        ("negative.npz", {"images": good, "labels": np.array([0, -1, 1])}, "negative value -1"),
        ("classes.npz", {"images": good, "labels": np.array([0, 3, 1]), "classes": np.array(["a", "b"])},
         "label 3 has no class (2 classes)"),
    ]
    for name, arrays, text in cases:
        _npz(tmp_path / name, False, **arrays)
        with pytest.raises(InputError) as caught:
            datasets.open(tmp_path / name)
        assert text in str(caught.value) and "\n" not in str(caught.value), name
    whole = _npz(tmp_path / "whole.npz", False, images=good).read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"is not a readable \.npz file"):
        datasets.open(tmp_path / "cut.npz")
    os.mkfifo(tmp_path / "fifo.npz")
    with pytest.raises(InputError, match="is not a regular file"):
        datasets.open(tmp_path / "fifo.npz")
    nan = _npz(tmp_path / "nan.npz", False, images=bad_values)
    with pytest.raises(ImageReadError, match=r"image 1 of .* contains NaN"):
        datasets.open(nan).read()
    assert datasets.open(nan, skip_bad=True).read().ids.tolist() == [0]


def test_a_truncated_npz_member_names_the_image(tmp_path: Path) -> None:
    path = _npz(tmp_path / "t.npz", False, images=np.arange(4 * 16, dtype=np.uint8).reshape(4, 4, 4))
    ds = datasets.open(path)
    data = path.read_bytes()
    magic = data.index(b"\x93NUMPY")  # a version 1.0 header: magic, version, 2-byte length, text
    start = magic + 10 + int.from_bytes(data[magic + 8 : magic + 10], "little")
    # cut the file inside the last image (the central directory goes too, but ds knows the offset)
    path.write_bytes(data[: start + 3 * 16 + 5])
    np.testing.assert_array_equal(ds[0], np.arange(16, dtype=np.float32).reshape(4, 4) / 255)
    with pytest.raises(ImageReadError, match=r"image 3 of .* is truncated \(5 of 16 bytes\)"):
        ds[3]


@pytest.mark.parametrize("kind", ["files", "npz"])
def test_descriptions_rebuild_views_for_workers(folder: Path, tmp_path: Path, kind: str) -> None:
    if kind == "npz":
        source = datasets.open(folder)
        _npz(tmp_path / "d.npz", True, images=(source.read().images * 255).astype(np.uint8),
             labels=source.labels)  # type: ignore[arg-type]
        ds = datasets.open(tmp_path / "d.npz", crop=8)
    else:
        ds = datasets.open(folder, crop=8)
    view = ds.subset([4, 1, 5])
    description = json.loads(json.dumps(view.to_dict()))  # plain JSON
    assert description["ids"] == [4, 1, 5] and description["shape"] == [8, 8]
    if kind == "files":
        assert description["source"]["paths"] == list(view.paths or ())
    rebuilt = datasets.from_dict(description)
    assert rebuilt.ids.tolist() == [4, 1, 5] and rebuilt.labels.tolist() == view.labels.tolist()  # type: ignore[union-attr]
    np.testing.assert_array_equal(rebuilt.read().images, view.read().images)
    assert rebuilt[1:].read().ids.tolist() == [1, 5]
    rebuilt.close()
    ds.close()


def test_bad_descriptions(folder: Path) -> None:
    good = datasets.open(folder)[1:3].to_dict()
    changes: list[tuple[Callable[[dict], None], str]] = [
        (lambda d: d.update(format="x"), "not a dataset description"),
        (lambda d: d.update(version=7), "version 7"),
        (lambda d: d.pop("ids"), "malformed"),
        (lambda d: d["source"].update(kind="s3"), "unknown source kind 's3'"),
        (lambda d: d["source"]["paths"].pop(), "1 paths for 2 ids"),
        (lambda d: d.update(labels=[1]), "1 labels for 2 ids"),
        (lambda d: d.update(crop=[0, 2]), "crop=[0, 2]"),
    ]
    for change, text in changes:
        description = json.loads(json.dumps(good))
        change(description)
        with pytest.raises(InputError, match=None) as caught:
            datasets.from_dict(description)
        assert text in str(caught.value), text


def test_a_tree_of_splits_opened_one_level_too_high_is_warned_about(tmp_path: Path, caplog) -> None:
    from conftest import write_image_folder

    write_image_folder(tmp_path / "set" / "train", per_class=2)
    write_image_folder(tmp_path / "set" / "test", per_class=1)
    with caplog.at_level("WARNING", logger="rmidl.datasets"):
        whole = datasets.open(tmp_path / "set")
    assert whole.classes == ("test", "train")
    assert "look like the splits" in caplog.text and "set/train" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="rmidl.datasets"):
        split = datasets.open(tmp_path / "set" / "train")
    assert split.classes == ("c0", "c1") and caplog.text == ""
