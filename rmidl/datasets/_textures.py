"""make_textures: a deterministic, offline 6-class texture dataset (ImageFolder PNGs, train/test splits).

A stand-in for the paper's steel-surface-defect set (NEU: crazing, inclusion, patches, pitted surface,
rolled-in scale, scratches). With scikit-image installed (`pip install rmidl[data]`) three classes are
crops of real texture photographs its wheel ships (brick, grass, gravel); the rest are seeded procedural
defect textures (rmidl.datasets._procedural).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rmidl.datasets._procedural import PROCEDURAL, dihedral
from rmidl.errors import InputError, OptionError
from rmidl.imaging import load_image

__all__ = ["TEXTURE_CLASSES", "TextureSet", "make_textures"]

log = logging.getLogger(__name__)

PHOTOS = ("brick", "grass", "gravel")
TEXTURE_CLASSES: dict[str, tuple[str, ...]] = {
    "photos": (*PHOTOS, "crazing", "pitted", "scratches"),
    "procedural": tuple(PROCEDURAL),
}
_CODES = {name: code for code, name in enumerate(sorted({*PHOTOS, *PROCEDURAL}))}  # stable seed streams
_SPLITS = ("train", "test")
_TEST_FROM = 0.6  # photo rows [0, 60%) give training crops, rows below (after a gap) test crops
_GAP = 4
_CROP = (150, 200)  # photo crop sides in source pixels, before resizing to `size`
MANIFEST = "textures.json"
# Huffman-only zlib: noisy textures compress no worse than at level 6, several times faster (as save_maps)
_PNG = {"compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY}


@dataclass(frozen=True)
class TextureSet:
    """Where make_textures wrote: `train` and `test` ImageFolder trees under `root`."""

    root: Path
    train: Path
    test: Path
    classes: tuple[str, ...]
    source: str
    counts: dict[str, int]


def _photo_files() -> dict[str, Path] | None:
    """The texture photographs inside an installed scikit-image (read as files: no network, no import)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = {name: folder / f"{name}.png" for name in PHOTOS}
    return files if all(path.is_file() for path in files.values()) else None


def _jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast and brightness, so grey level alone tells no class; clipped to [0, 1]."""
    mean = float(image.mean())
    out = (image - mean) * rng.uniform(0.75, 1.25) + mean + rng.uniform(-0.1, 0.1)
    return np.clip(out, 0.0, 1.0)


def crop_box(photo_hw: tuple[int, int], split: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """(row, col, side) of a random square inside the split's own rows of a photograph."""
    h, w = photo_hw
    boundary = int(h * _TEST_FROM)
    top, bottom = (0, boundary - _GAP // 2) if split == "train" else (boundary + _GAP // 2, h)
    side = int(rng.integers(_CROP[0], min(_CROP[1], bottom - top, w) + 1))
    return int(rng.integers(top, bottom - side + 1)), int(rng.integers(0, w - side + 1)), side


def _photo_crop(photo: np.ndarray, split: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of the split's own rows of `photo` (float [0, 1]), resized and turned."""
    row, col, side = crop_box(photo.shape, split, rng)
    crop = Image.fromarray(np.ascontiguousarray(photo[row : row + side, col : col + side]))
    resized = np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))
    return dihedral(resized, rng)


def _image(name: str, split: str, index: int, *, size: int, seed: int,
           photos: dict[str, np.ndarray]) -> np.ndarray:
    rng = np.random.default_rng([seed, _CODES[name], _SPLITS.index(split), index])
    if name in photos:
        image = _photo_crop(photos[name], split, size, rng)
    else:
        image = dihedral(PROCEDURAL[name](rng, size), rng)
    return np.rint(_jitter(image, rng) * 255).astype(np.uint8)


def _check(per_class: object, size: object, seed: object, test_fraction: object, source: object) -> None:
    for value, name, low in ((per_class, "per_class", 2), (size, "size", 16), (seed, "seed", 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise OptionError(f"{name}={value!r} must be an integer >= {low}")
    if isinstance(size, int) and size > 2048:
        raise OptionError(f"size={size} must be at most 2048")
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise OptionError(f"test_fraction={test_fraction!r} must lie between 0 and 1")
    if source not in ("auto", "photos", "procedural"):
        raise OptionError(f"source={source!r} is not one of auto, photos, procedural")


def _prepare_root(root: Path) -> None:
    """Create `root`, or clear the splits of an earlier texture set there; refuse anything else."""
    if root.exists() and not root.is_dir():
        raise InputError(f"texture root {str(root)!r} is not a directory")
    if root.is_dir() and any(root.iterdir()):
        if not (root / MANIFEST).is_file():
            raise InputError(f"texture root {str(root)!r} is not empty and holds no {MANIFEST}: "
                             "choose a new or empty directory")
        (root / MANIFEST).unlink()
        for split in _SPLITS:
            shutil.rmtree(root / split, ignore_errors=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create texture root {str(root)!r}: {error.strerror or error}") from None


def make_textures(root: str | os.PathLike[str], per_class: int = 100, size: int = 200, seed: int = 0, *,
                  test_fraction: float = 0.2, source: str = "auto") -> TextureSet:
    """Write a 6-class texture dataset under `root`: train/<class>/*.png and test/<class>/*.png.

    `per_class` images per class in all, round(per_class * test_fraction) (at least 1) of them in test;
    8-bit grayscale PNGs of size x size. source="photos" uses scikit-image's brick, grass and gravel
    photographs plus the crazing, pitted and scratches procedural classes; "procedural" six procedural
    NEU-like classes; "auto" (default) photos when scikit-image is installed, else procedural.
    Training and test photo crops come from disjoint rows of each photograph (rows above 60 % and below),
    and every procedural image is its own seeded draw, so no test pixel is in the training set. Each crop
    gets a random rotation/reflection and contrast/brightness. The same arguments (and library versions)
    give byte-identical files. Writes `textures.json` describing the set last; a root that holds
    anything but an earlier texture set is refused.
    """
    _check(per_class, size, seed, test_fraction, source)
    files = None if source == "procedural" else _photo_files()
    if source == "photos" and files is None:
        raise OptionError("source='photos' needs scikit-image's sample photographs: pip install rmidl[data]")
    kind = "photos" if files is not None else "procedural"
    if source == "auto" and files is None:
        log.info("scikit-image not installed: making the procedural texture classes only")
    photos = {name: load_image(path, gray=True).astype(np.float32) / 255
              for name, path in (files or {}).items()}
    classes = tuple(sorted(TEXTURE_CLASSES[kind]))
    tests = max(1, round(per_class * test_fraction))
    counts = {"train": per_class - tests, "test": tests}
    target = Path(root)
    _prepare_root(target)
    for split in _SPLITS:
        for name in classes:
            folder = target / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(counts[split]):
                pixels = _image(name, split, index, size=size, seed=int(seed), photos=photos)
                Image.fromarray(pixels).save(folder / f"{name}_{index:04d}.png", format="PNG", **_PNG)
    manifest = {"generator": "rmidl.datasets.make_textures", "source": kind, "classes": list(classes),
                "per_class": per_class, "size": size, "seed": seed, "test_fraction": test_fraction,
                "counts": counts, "photo_rows": {"train": f"[0, {_TEST_FROM:.0%} - {_GAP // 2} px)",
                                                 "test": f"[{_TEST_FROM:.0%} + {_GAP // 2} px, 100%)"}}
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return TextureSet(target, target / "train", target / "test", classes, kind, counts)
