"""Where a dataset's images come from: image files (ImageFolder tree, glob, one file) or an .npz array.

A source lists its images cheaply and decodes one image per `read(image_id)` call, as stored (uint8,
uint16, float32, ...); nothing is decoded while listing.
"""

from __future__ import annotations

import glob
import logging
import os
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np

from rmidl._files import open_failure
from rmidl.errors import ImageReadError, InputError
from rmidl.imaging import SUFFIXES, load_image

__all__ = ["FileSource", "Listing", "NpzSource", "list_path"]

log = logging.getLogger(__name__)

_GLOB_CHARS = frozenset("*?[")
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip member's local file header (30 bytes)


class FileSource:
    """Image files by id: `paths` is a list (id = position) or a mapping {id: path} (a dataset's part)."""

    kind = "files"

    def __init__(self, paths: Sequence[str] | Mapping[int, str], gray: bool | None) -> None:
        self.paths = paths
        self.gray = gray

    def name(self, image_id: int) -> str:
        return f"image {self.paths[image_id]!r}"

    def read(self, image_id: int) -> np.ndarray:
        path = self.paths[image_id]
        try:
            mode = os.stat(path).st_mode
        except OSError as error:
            raise ImageReadError(f"image {path!r} {open_failure(error) or error.strerror}") from None
        if not stat.S_ISREG(mode):  # opening a FIFO or a device would block or never end
            raise ImageReadError(f"image {path!r} is not a regular file")
        return load_image(path, gray=self.gray)

    def describe(self, ids: np.ndarray) -> dict[str, Any]:
        return {"kind": self.kind, "paths": [self.paths[int(i)] for i in ids], "gray": self.gray}

    def close(self) -> None:
        """Nothing is held open between reads."""


class NpzSource:
    """Images (n, H, W[, C]) of an .npz's `images` array, read one at a time from the file.

    An uncompressed archive (np.savez) is read per image straight from its offset; a compressed one
    (np.savez_compressed) through one decompressing handle kept open (reads in id order are cheap,
    going back restarts the decompression), closed by close().
    """

    kind = "npz"

    def __init__(self, path: str, gray: bool | None) -> None:
        self.path = path
        self.gray = gray
        self._lock = threading.Lock()
        self._zip: zipfile.ZipFile | None = None
        self._member: IO[bytes] | None = None
        where = f"dataset {path!r}"
        try:
            with zipfile.ZipFile(path) as archive:
                if "images.npy" not in archive.namelist():
                    names = ", ".join(n.removesuffix(".npy") for n in archive.namelist()) or "none"
                    raise InputError(f"{where} holds no array 'images' (arrays: {names})")
                info = archive.getinfo("images.npy")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = reader(member)
                    self._offset = member.tell()
            self.extras = _npz_extras(path, where)
        except InputError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            reason = open_failure(error) or f"is not a readable .npz file: {error}"
            raise InputError(f"{where} {reason}") from None
        if dtype.kind not in "iuf":
            raise InputError(f"{where}: 'images' has dtype {dtype}; rmidl reads integer or float pixels")
        if len(shape) not in (3, 4) or 0 in shape[1:]:
            raise InputError(f"{where}: 'images' has shape {shape}; expected (n, H, W) or (n, H, W, C)")
        if fortran:
            raise InputError(f"{where}: 'images' is stored in Fortran order; save a C-ordered array")
        self.count = int(shape[0])
        self.item_shape = tuple(int(v) for v in shape[1:])
        self.dtype = dtype
        self._item_bytes = int(np.prod(self.item_shape)) * dtype.itemsize
        self._stored_at = self._direct_offset(info) if info.compress_type == zipfile.ZIP_STORED else None

    def _direct_offset(self, info: zipfile.ZipInfo) -> int | None:
        """The file offset of the array's first byte in an uncompressed member (None if unusual)."""
        with open(self.path, "rb") as handle:
            handle.seek(info.header_offset)
            header = handle.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size:
            return None
        fields = _LOCAL_HEADER.unpack(header)
        if fields[0] != b"PK\x03\x04":
            return None
        return info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10] + self._offset

    def name(self, image_id: int) -> str:
        return f"image {image_id} of {self.path!r}"

    def read(self, image_id: int) -> np.ndarray:
        start = image_id * self._item_bytes
        try:
            if self._stored_at is not None:
                with open(self.path, "rb") as handle:
                    handle.seek(self._stored_at + start)
                    data = handle.read(self._item_bytes)
            else:
                data = self._read_compressed(self._offset + start)
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise ImageReadError(f"{self.name(image_id)} cannot be read: {error}") from None
        if len(data) != self._item_bytes:
            raise ImageReadError(
                f"{self.name(image_id)} is truncated ({len(data)} of {self._item_bytes} bytes)")
        pixels = np.frombuffer(data, self.dtype).reshape(self.item_shape).copy()
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        if self.gray is True and pixels.ndim == 3:
            pixels = _luminance(pixels)
        elif self.gray is False and pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        return pixels

    def _read_compressed(self, offset: int) -> bytes:
        with self._lock:
            if self._member is None:
                self._zip = zipfile.ZipFile(self.path)
                self._member = self._zip.open("images.npy")
            member = self._member
            member.seek(offset)
            return member.read(self._item_bytes)

    def describe(self, ids: np.ndarray) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "gray": self.gray}

    def close(self) -> None:
        with self._lock:
            if self._member is not None:
                self._member.close()
            if self._zip is not None:
                self._zip.close()
            self._member = self._zip = None


def _luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) with load_image's weights (ITU-R BT.601), rounded for integer pixels."""
    if rgb.shape[2] != 3:
        return rgb
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    if rgb.dtype.kind in "iu":
        luma = np.clip(np.rint(luma), np.iinfo(rgb.dtype).min, np.iinfo(rgb.dtype).max)
    return luma.astype(rgb.dtype)


def _npz_extras(path: str, where: str) -> dict[str, np.ndarray]:
    """The small optional arrays `labels` and `classes` of an .npz (never pickled)."""
    extras: dict[str, np.ndarray] = {}
    with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
        for name in ("labels", "classes"):
            if name in archive.files:
                try:
                    extras[name] = np.asarray(archive[name])
                except ValueError as error:
                    raise InputError(f"{where}: array {name!r} cannot be read ({error})") from None
    return extras


class Listing:
    """What a path names: the source, and labels/classes when the layout gives them."""

    def __init__(self, source: FileSource | NpzSource, count: int, labels: np.ndarray | None,
                 classes: tuple[str, ...]) -> None:
        self.source = source
        self.count = count
        self.labels = labels
        self.classes = classes


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in SUFFIXES


def _image_files(folder: str) -> list[str]:
    """Image files below `folder`, depth first, each directory's entries sorted; hidden ones skipped."""
    found: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, name) for name in sorted(files) if _is_image(name))
    return found


SPLIT_NAMES = frozenset({"train", "test", "val", "valid", "validation", "dev", "training", "testing"})
"""Folder names of a dataset's splits: a tree whose "classes" are only these is opened one level too high."""


def _folder(root: str, gray: bool | None) -> Listing:
    entries = sorted(os.listdir(root))
    classes = [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]
    loose = [e for e in entries if _is_image(e) and not os.path.isdir(os.path.join(root, e))]
    if classes and loose:
        raise InputError(f"dataset {root!r} has both class folders ({classes[0]}, ...) and loose images "
                         f"({loose[0]}, ...): move the images into a class folder or open a glob")
    if not classes:
        return Listing(FileSource([os.path.join(root, e) for e in loose], gray), len(loose), None, ())
    if len(classes) > 1 and {c.lower() for c in classes} <= SPLIT_NAMES:
        log.warning("dataset %r: its class folders %s look like the splits of a dataset, not its classes; "
                    "open one split (e.g. %r)", root, ", ".join(classes), os.path.join(root, classes[-1]))
    paths: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        files = _image_files(os.path.join(root, name))
        paths.extend(files)
        labels.extend([index] * len(files))
    return Listing(FileSource(paths, gray), len(paths), np.array(labels, np.int64), tuple(classes))


def _npz(path: str, gray: bool | None) -> Listing:
    source = NpzSource(path, gray)
    where = f"dataset {path!r}"
    labels = source.extras.get("labels")
    classes_array = source.extras.get("classes")
    classes: tuple[str, ...] = ()
    if labels is not None:
        if labels.shape != (source.count,) or labels.dtype.kind not in "iu":
            raise InputError(f"{where}: 'labels' must be {source.count} integers, got {labels.dtype} "
                             f"{labels.shape}")
        labels = labels.astype(np.int64)
        if labels.min() < 0:
            raise InputError(f"{where}: 'labels' has a negative value {int(labels.min())}")
    if classes_array is not None:
        if classes_array.ndim != 1 or classes_array.dtype.kind not in "US":
            raise InputError(f"{where}: 'classes' must be a 1-D array of names")
        classes = tuple(str(c) for c in classes_array)
    elif labels is not None:
        classes = tuple(str(i) for i in range(int(labels.max()) + 1))
    if labels is not None and labels.max() >= len(classes):
        raise InputError(f"{where}: label {int(labels.max())} has no class ({len(classes)} classes)")
    return Listing(source, source.count, labels, classes)


def list_path(path: str | os.PathLike[str], gray: bool | None) -> Listing:
    """The images `path` names: a directory (ImageFolder), a glob, an .npz, or one image file."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        raise InputError(f"dataset path {text!r} must be text")
    where = f"dataset {text!r}"
    expanded = os.path.expanduser(text)
    if not os.path.exists(expanded) and _GLOB_CHARS & set(text):
        matches = sorted(glob.glob(expanded, recursive=True))
        files = [os.path.abspath(m) for m in matches
                 if _is_image(os.path.basename(m)) and not os.path.isdir(m)]
        return Listing(FileSource(files, gray), len(files), None, ())
    absolute = os.path.abspath(expanded)
    if os.path.isdir(absolute):
        return _folder(absolute, gray)
    if not os.path.exists(absolute):
        raise InputError(f"{where} does not exist")
    if absolute.lower().endswith(".npz"):
        if not stat.S_ISREG(os.stat(absolute).st_mode):  # a FIFO would block the zip reader
            raise InputError(f"{where} is not a regular file")
        return _npz(absolute, gray)
    if _is_image(os.path.basename(absolute)):
        return Listing(FileSource([absolute], gray), 1, None, ())
    raise InputError(f"{where} is not a directory, a glob, an .npz file or an image "
                     f"({', '.join(SUFFIXES)})")
