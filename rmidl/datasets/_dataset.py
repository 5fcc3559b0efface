"""A lazy image dataset: ids -> decoded float32 images, batches with a bounded prefetch, JSON descriptions."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
from PIL import Image

from rmidl.datasets._prefetch import prefetched
from rmidl.datasets._sources import FileSource, NpzSource, list_path
from rmidl.errors import ImageReadError, InputError, OptionError, ShapeError
from rmidl.pooling import window_pair

__all__ = ["Batch", "Dataset", "from_dict", "open_dataset"]

log = logging.getLogger(__name__)

FORMAT = "rmidl.dataset"
VERSION = 1


@dataclass(frozen=True)
class Batch:
    """Decoded images with their dataset ids (skipped bad images left out) and labels (None if unlabelled)."""

    ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return len(self.ids)


class _Shared:
    """What every view of one opened dataset shares: the source, the images' shape, the bad images seen."""

    def __init__(self, source: FileSource | NpzSource, first_ids: np.ndarray,
                 shape: tuple[int, ...] | None) -> None:
        self.source = source
        self.first_ids = first_ids  # where the reference shape is looked for
        self.shape = shape
        self.shape_from = "" if shape is None else "the dataset's description"
        self.bad: dict[int, str] = {}
        self.lock = threading.Lock()


def _size(value: object, name: str, *, side: bool) -> int | tuple[int, int] | None:
    """None, or (rows, cols); with side=True a bare int is kept (the shorter side's length)."""
    if value is None:
        return None
    if side and isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return window_pair(value, name)[0]
    return window_pair(value, name)


def _intensities(pixels: np.ndarray, name: str) -> np.ndarray:
    """float32 intensities: 8- and 16-bit pixels / 255 or / 65535, other values as they are."""
    if pixels.dtype in (np.uint8, np.uint16):
        out = pixels.astype(np.float32)
        out /= np.float32(np.iinfo(pixels.dtype).max)
        return out
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise ImageReadError(f"{name} contains NaN or Inf")
    with np.errstate(over="ignore"):
        out = pixels.astype(np.float32)
    if not np.isfinite(out).all():
        raise ImageReadError(f"{name} has values beyond the float32 range")
    return out


def _resized(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize (antialiased when shrinking) to (rows, cols), or shorter side = size."""
    h, w = image.shape[:2]
    if isinstance(size, int):
        size = (size, max(1, round(w * size / h))) if h <= w else (max(1, round(h * size / w)), size)
    if (h, w) == size:
        return image
    planes = image[..., None] if image.ndim == 2 else image
    resized = [np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c])).resize(
        (size[1], size[0]), Image.Resampling.BILINEAR)) for c in range(planes.shape[2])]
    stacked = np.stack(resized, axis=2)
    return stacked[..., 0] if image.ndim == 2 else stacked


def _cropped(image: np.ndarray, size: tuple[int, int], name: str) -> np.ndarray:
    h, w = image.shape[:2]
    if size[0] > h or size[1] > w:
        raise ShapeError(f"{name} is {w}x{h}, smaller than the crop {size[1]}x{size[0]}")  # W x H
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return np.ascontiguousarray(image[top : top + size[0], left : left + size[1]])


def _size_text(shape: tuple[int, ...]) -> str:
    """An image's (H, W[, C]) as users give sizes: 'WxH', and its channels when it has them."""
    channels = f" with {shape[2]} channels" if len(shape) == 3 else ""
    return f"{shape[1]}x{shape[0]}{channels}"


class Dataset(Sequence[np.ndarray]):
    """Images by position, decoded only when read: `len`, `ds[i]` (one float32 image), `ds[a:b]` or
    `ds[[i, j]]` (a lazy view with the same ids), `read()` / `batches()` (Batch objects).

    Items are float32 (H, W) or (H, W, C): 8-/16-bit pixels as intensities in [0, 1] (v / 255,
    v / 65535, as torchvision's ToTensor), other pixel types as their values; after `resize` (int: the
    shorter side, aspect kept; (H, W): exactly) and then a centred `crop` (int or (H, W)). Every image
    must have the shape of the dataset's first readable one (a ShapeError otherwise: pass resize/crop
    or gray). Bad images (unreadable, truncated, not regular files, NaN, smaller than the crop) stop
    the read with an error naming them, or with skip_bad=True are left out of batches and recorded in
    `bad` (id -> reason). `ids` are positions in the opened dataset, kept by views and by to_dict().
    """

    def __init__(self, shared: _Shared, ids: np.ndarray, labels: np.ndarray | None, *,
                 classes: tuple[str, ...], settings: dict[str, Any], origin: str) -> None:
        self._shared = shared
        self.ids = ids
        self.labels = labels
        self.classes = classes
        self.settings = settings
        self.origin = origin

    # -- the Sequence protocol and views -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...

    @overload
    def __getitem__(self, index: slice | Sequence[int] | np.ndarray) -> Dataset: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            position = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"image {index} is out of range for a dataset of {len(self)}")
            return self._checked(int(self.ids[position]))
        return self.subset(index)

    def subset(self, index: slice | Sequence[int] | np.ndarray) -> Dataset:
        """A view of some positions (a slice, or positions in any order); nothing is decoded."""
        try:
            positions = np.arange(len(self))[index]
        except (IndexError, TypeError, ValueError) as error:
            raise OptionError(f"cannot take positions {index!r} of {len(self)} images: {error}") from None
        positions = np.atleast_1d(positions)
        labels = None if self.labels is None else self.labels[positions]
        return Dataset(self._shared, self.ids[positions], labels, classes=self.classes,
                       settings=self.settings, origin=self.origin)

    @property
    def paths(self) -> tuple[str, ...] | None:
        """The image files of this view's ids (None for an .npz dataset)."""
        source = self._shared.source
        if isinstance(source, FileSource):
            return tuple(source.paths[int(i)] for i in self.ids)
        return None

    def name(self, image_id: int) -> str:
        """How errors name image `image_id` (its path, or its index in the .npz)."""
        return self._shared.source.name(int(image_id))

    @property
    def bad(self) -> dict[int, str]:
        """Images skipped so far (skip_bad=True) by any view of this dataset: id -> one-line reason."""
        with self._shared.lock:
            return dict(self._shared.bad)

    # -- decoding ----------------------------------------------------------------------------------

    def _decoded(self, image_id: int) -> np.ndarray:
        """One image after dtype conversion, resize and crop; ImageReadError/ShapeError if it is bad."""
        source = self._shared.source
        name = source.name(image_id)
        image = _intensities(source.read(image_id), name)
        if self.settings["resize"] is not None:
            image = _resized(image, self.settings["resize"])
        if self.settings["crop"] is not None:
            image = _cropped(image, tuple(self.settings["crop"]), name)
        return image

    def _usable(self, image_id: int) -> np.ndarray | None:
        """The decoded image, or None for a bad image when skip_bad (recorded in `bad`)."""
        try:
            return self._decoded(image_id)
        except (ImageReadError, ShapeError) as error:
            if not self.settings["skip_bad"]:
                raise type(error)(f"{error} (skip_bad=True, or --skip-bad, leaves such images out)") from None
            with self._shared.lock:
                new = image_id not in self._shared.bad
                self._shared.bad[image_id] = str(error)
            if new:
                log.warning("left out (skip_bad): %s", error)
            return None

    @property
    def shape(self) -> tuple[int, ...]:
        """Every image's shape, (H, W) or (H, W, C): the first readable image's (decoded once)."""
        shared = self._shared
        if shared.shape is None:
            for image_id in shared.first_ids:
                image = self._usable(int(image_id))
                if image is not None:
                    with shared.lock:
                        if shared.shape is None:
                            shared.shape, shared.shape_from = image.shape, self.name(int(image_id))
                    break
            else:
                raise InputError(f"dataset {self.origin!r} has no readable image ({len(shared.bad)} bad)")
        assert shared.shape is not None
        return shared.shape

    def _checked(self, image_id: int, image: np.ndarray | None = None) -> np.ndarray:
        if image is None:
            image = self._decoded(image_id)
        if image.shape != self.shape:
            raise ShapeError(
                f"{self.name(image_id)} is {_size_text(image.shape)} but the dataset's images are "
                f"{_size_text(self.shape)} (as {self._shared.shape_from}): pass resize=/crop= for sizes, "
                "gray= for channels")
        return image

    def read(self, index: slice | Sequence[int] | np.ndarray | None = None, *,
             timings: MutableMapping[str, float] | None = None) -> Batch:
        """Decode the images at `index` (positions in this view; None: all) into one Batch.

        With skip_bad, bad images are left out (their ids are not in the batch). `timings` gets the
        seconds added under "LOAD".
        """
        start = time.perf_counter()
        view = self if index is None else self.subset(index)
        images, kept = [], []
        for position, image_id in enumerate(view.ids):
            image = view._usable(int(image_id))
            if image is not None:
                images.append(view._checked(int(image_id), image))
                kept.append(position)
        stack = np.stack(images) if images else np.empty((0, *self.shape), np.float32)
        labels = None if view.labels is None else view.labels[kept]
        batch = Batch(view.ids[kept], stack, labels)
        if timings is not None:
            timings["LOAD"] = timings.get("LOAD", 0.0) + time.perf_counter() - start
        return batch

    def batches(self, batch_size: int, *, prefetch: int = 2,
                timings: MutableMapping[str, float] | None = None) -> Iterator[Batch]:
        """Consecutive batches of `batch_size` positions (the last may be smaller), decoded by one
        background thread at most `prefetch` batches ahead (0: in the caller's thread)."""
        for value, name in ((batch_size, "batch_size"), (prefetch, "prefetch")):
            low = 1 if name == "batch_size" else 0
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise OptionError(f"{name}={value!r} must be an integer >= {low}")
        ranges = [slice(a, min(a + batch_size, len(self))) for a in range(0, len(self), batch_size)]
        if prefetch == 0:
            return (self.read(r, timings=timings) for r in ranges)
        return prefetched(lambda r: self.read(r, timings=timings), ranges, int(prefetch))

    # -- description and lifetime ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (source, ids, labels, settings, shape) from_dict() rebuilds anywhere
        the same files are; an .npz is named by path, image files by their paths (this view's only)."""
        return {"format": FORMAT, "version": VERSION, "origin": self.origin,
                "source": self._shared.source.describe(self.ids), "ids": self.ids.tolist(),
                "labels": None if self.labels is None else self.labels.tolist(),
                "classes": list(self.classes), "shape": list(self.shape), **self.settings}

    def close(self) -> None:
        """Release an open .npz handle (views share it); reading again reopens it."""
        self._shared.source.close()

    def __enter__(self) -> Dataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        classes = f", {len(self.classes)} classes" if self.classes else ""
        shape = f", {_size_text(self._shared.shape)}" if self._shared.shape is not None else ""
        return f"<Dataset {self.origin!r}: {len(self)} images{classes}{shape}>"


def _settings(resize: object, crop: object, skip_bad: object, gray: object) -> dict[str, Any]:
    if gray not in (None, True, False):
        raise OptionError(f"gray={gray!r} must be True, False or None")
    if not isinstance(skip_bad, (bool, np.bool_)):
        raise OptionError(f"skip_bad={skip_bad!r} must be True or False")
    resize_value = _size(resize, "resize", side=True)
    crop_value = _size(crop, "crop", side=False)
    return {"resize": list(resize_value) if isinstance(resize_value, tuple) else resize_value,
            "crop": list(crop_value) if isinstance(crop_value, tuple) else None, "skip_bad": bool(skip_bad),
            "gray": gray}


def open_dataset(path: str | os.PathLike[str], *, resize: int | tuple[int, int] | None = None,
                 crop: int | tuple[int, int] | None = None, skip_bad: bool = False,
                 gray: bool | None = None) -> Dataset:
    """The images `path` names, listed now and decoded only when read (see Dataset).

    - a directory with class subfolders (the ImageFolder convention): class = folder name, classes
      sorted, each class's files (.png .jpg .jpeg .tif .tiff .bmp .pgm .ppm, in subfolders too) sorted
      by path; hidden files skipped; a directory of images alone is one unlabelled set;
    - a glob ("photos/**/*.jpg"): the matching image files, sorted, unlabelled;
    - an .npz with `images` (n, H, W) or (n, H, W, C), optional integer `labels` (n,) and `classes`;
    - one image file.
    `gray`: None keeps each file's channels, True converts to (H, W) luminance, False to (H, W, 3).
    An empty dataset is an InputError.
    """
    settings = _settings(resize, crop, skip_bad, gray)
    origin = os.fspath(path)
    listing = list_path(path, gray)
    if listing.count == 0:
        raise InputError(f"dataset {origin!r} holds no images")
    ids = np.arange(listing.count, dtype=np.int64)
    return Dataset(_Shared(listing.source, ids, None), ids, listing.labels, classes=listing.classes,
                   settings=settings, origin=str(origin))


def from_dict(description: dict[str, Any]) -> Dataset:
    """The dataset (or view) Dataset.to_dict() described, reading the same files; checked."""
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise InputError(f"not a dataset description (format is not {FORMAT!r})")
    if description.get("version") != VERSION:
        raise InputError(f"dataset description version {description.get('version')!r}; this rmidl reads "
                         f"{VERSION}")
    try:
        settings = _settings(description["resize"], description["crop"], description["skip_bad"],
                             description["gray"])
        ids = np.asarray(description["ids"], np.int64).reshape(-1)
        source_info = description["source"]
        source: FileSource | NpzSource
        if source_info["kind"] == "files":
            paths = [str(p) for p in source_info["paths"]]
            if len(paths) != len(ids):
                raise InputError(f"dataset description has {len(paths)} paths for {len(ids)} ids")
            source = FileSource(dict(zip(ids.tolist(), paths, strict=True)), settings["gray"])
        elif source_info["kind"] == "npz":
            source = NpzSource(str(source_info["path"]), settings["gray"])
            if len(ids) and (ids.min() < 0 or ids.max() >= source.count):
                raise InputError(f"dataset description ids exceed the {source.count} images of "
                                 f"{source_info['path']!r}")
        else:
            raise InputError(f"dataset description has an unknown source kind {source_info['kind']!r}")
        labels = None if description["labels"] is None else np.asarray(description["labels"], np.int64)
        shape = tuple(int(v) for v in description["shape"])
        classes = tuple(str(c) for c in description["classes"])
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"dataset description is malformed: {type(error).__name__} {error}") from None
    if labels is not None and labels.shape != ids.shape:
        raise InputError(f"dataset description has {labels.size} labels for {ids.size} ids")
    return Dataset(_Shared(source, ids, shape), ids, labels, classes=classes, settings=settings,
                   origin=str(description.get("origin")))
