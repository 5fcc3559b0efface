"""make_textures: layout and counts, byte-identical for a seed, disjoint photo regions, bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rmidl import InputError, OptionError, datasets, load_image
from rmidl.datasets import _textures
from rmidl.datasets._procedural import PROCEDURAL

HAVE_PHOTOS = _textures._photo_files() is not None
SOURCES = ["procedural", pytest.param("photos", marks=pytest.mark.skipif(
    not HAVE_PHOTOS, reason="scikit-image (rmidl[data]) is not installed"))]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("source", SOURCES)
def test_layout_counts_and_pixels(tmp_path: Path, source: str) -> None:
    made = datasets.make_textures(tmp_path / "tex", per_class=5, size=40, seed=3, source=source)
    assert made.source == source and made.classes == tuple(sorted(_textures.TEXTURE_CLASSES[source]))
    assert made.counts == {"train": 4, "test": 1} and len(made.classes) == 6
    train, test = datasets.open(made.train), datasets.open(made.test)
    assert train.classes == test.classes == made.classes
    assert (len(train), len(test)) == (24, 6)
    assert train.labels is not None and np.bincount(train.labels).tolist() == [4] * 6
    for path in (train.paths or ())[:3]:
        pixels = load_image(path)
        assert pixels.dtype == np.uint8 and pixels.shape == (40, 40)
    images = train.read().images
    assert images.std(axis=(1, 2)).min() > 0.005  # textures, not flat fields
    manifest = json.loads((made.root / "textures.json").read_text())
    assert manifest["source"] == source and manifest["counts"] == made.counts and manifest["seed"] == 3


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    first = datasets.make_textures(tmp_path / "a", per_class=3, size=32, seed=1)
    second = datasets.make_textures(tmp_path / "b", per_class=3, size=32, seed=1)
    other = datasets.make_textures(tmp_path / "c", per_class=3, size=32, seed=2)
    files = _files(first.root)
    assert len(files) == 6 * 3 + 1 and files == _files(second.root)
    different = _files(other.root)
    assert files.keys() == different.keys()
    images = [name for name in files if name.endswith(".png")]
    assert all(files[name] != different[name] for name in images)


def test_photo_crops_of_the_two_splits_never_share_a_row() -> None:
    rng = np.random.default_rng(0)
    boxes = {split: [_textures.crop_box((512, 512), split, rng) for _ in range(2000)]
             for split in ("train", "test")}
    last_train_row = max(row + side for row, _, side in boxes["train"])
    first_test_row = min(row for row, _, _ in boxes["test"])
    assert last_train_row <= first_test_row - _textures._GAP
    for split_boxes in boxes.values():
        assert all(col >= 0 and col + side <= 512 and row + side <= 512 for row, col, side in split_boxes)
        sides = [side for _, _, side in split_boxes]
        assert min(sides) >= _textures._CROP[0] and max(sides) <= _textures._CROP[1]
    # both splits draw crops of the same scales, so test images look like training ones
    assert abs(np.mean([b[2] for b in boxes["train"]]) - np.mean([b[2] for b in boxes["test"]])) < 3


def test_procedural_classes_differ_and_are_seeded() -> None:
    for name, generate in PROCEDURAL.items():
        a = generate(np.random.default_rng(5), 48)
        assert a.shape == (48, 48) and np.isfinite(a).all(), name
        np.testing.assert_array_equal(a, generate(np.random.default_rng(5), 48))
        assert not np.array_equal(a, generate(np.random.default_rng(6), 48)), name


def test_rerun_replaces_an_earlier_set_but_never_other_files(tmp_path: Path) -> None:
    root = tmp_path / "tex"
    datasets.make_textures(root, per_class=2, size=16, source="procedural")
    again = datasets.make_textures(root, per_class=3, size=16, source="procedural")
    assert len(datasets.open(again.train)) == 6 * 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(InputError, match=r"is not empty and holds no textures\.json"):
        datasets.make_textures(tmp_path / "mine", per_class=2, size=16)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is not a directory"):
        datasets.make_textures(tmp_path / "file", per_class=2, size=16)


BAD = [
    ({"per_class": 1}, "per_class=1"),
    ({"size": 8}, "size=8"),
    ({"size": 5000}, "size=5000"),
    ({"seed": -1}, "seed=-1"),
    ({"test_fraction": 1.0}, "test_fraction=1.0"),
    ({"source": "web"}, "source='web'"),
]


@pytest.mark.parametrize(("kwargs", "text"), BAD)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(OptionError) as caught:
        datasets.make_textures(tmp_path / "t", **kwargs)  # type: ignore[arg-type]
    assert text in str(caught.value)
    assert not (tmp_path / "t").exists()


def test_photos_without_scikit_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_textures, "_photo_files", lambda: None)
    with pytest.raises(OptionError, match=r"pip install rmidl\[data\]"):
        datasets.make_textures(tmp_path / "t", per_class=2, size=16, source="photos")
    made = datasets.make_textures(tmp_path / "t", per_class=2, size=16)  # auto falls back
    assert made.source == "procedural"
