"""FEATURES.npz as `rmidl train` and `rmidl predict` read it: what `rmidl features` writes, or an .npz with X.

Arrays: `X` (samples, features), real; labels as `y` or `labels` (class indices, or the labels themselves:
integers or text); optional `classes` (the class names, when the labels are indices into them, or the
full label set; empty: none) and `paths` (one per sample, e.g. the images the features came from). In a
file `rmidl features` wrote, `network` and `stats` give the features' provenance (rmidl.provenance).
Other arrays are ignored. Never unpickled; sizes checked before reading (rmidl._files.read_npz).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmidl._files import read_npz, shown
from rmidl.config import Config
from rmidl.errors import InputError, ShapeError
from rmidl.featureset import FORMAT
from rmidl.provenance import Provenance

__all__ = ["LABEL_KEYS", "FeatureFile", "read_features"]

LABEL_KEYS = ("y", "labels")
"""Where a features file may hold its labels (`rmidl features` writes `labels`; users often `y`)."""


@dataclass(frozen=True)
class FeatureFile:
    """A features file's contents: X as stored, labels (names when the file maps indices to `classes`),
    and where the features came from (None when the file does not say)."""

    path: Path
    x: np.ndarray
    labels: np.ndarray | None
    classes: np.ndarray | None
    paths: np.ndarray | None
    provenance: Provenance | None = None

    @property
    def where(self) -> str:
        return f"features file {shown(self.path)}"


def read_features(path: str | Path, *, labels_required: bool) -> FeatureFile:
    """Read a features file; one-line InputErrors name the file and what is wrong with it."""
    source = Path(path)
    where = f"features file {shown(source)}"
    arrays = read_npz(source, where, max_bytes=Config().memory_budget)
    if "X" not in arrays:
        held = ", ".join(arrays) or "no arrays"
        raise InputError(f"{where} has no array X (it holds {held}); a features file holds X (samples, "
                         "features) and y or labels")
    x = arrays["X"]
    if x.ndim != 2:
        raise ShapeError(f"{where}: X must be (samples, features), got shape {x.shape}")
    labels = _labels(arrays, where)
    if labels is None and labels_required:
        raise InputError(f"{where} has no labels (an array y or labels, one per sample of X)")
    if labels is not None and labels.shape[:1] != x.shape[:1]:
        raise ShapeError(f"{where} holds {labels.shape[0] if labels.ndim else 1} labels for {x.shape[0]} "
                         "samples of X")
    classes = arrays.get("classes")
    if classes is not None and classes.shape == (0,):
        classes = None  # what rmidl features wrote for an unlabelled set before it left `classes` out
    if classes is not None:
        if classes.ndim != 1 or classes.size == 0 or classes.dtype.kind not in "iuU":
            raise ShapeError(f"{where}: classes must be a non-empty list of integers or text, got "
                             f"{classes.shape} {classes.dtype}")
        if labels is not None and labels.dtype.kind in "iu" and classes.dtype.kind == "U":
            if labels.size and (labels.min() < 0 or labels.max() >= classes.size):
                raise InputError(f"{where}: labels are class indices 0..{classes.size - 1} into classes, "
                                 f"but hold {labels.min()}..{labels.max()}")
            labels = classes[labels]
    paths = arrays.get("paths")
    if paths is not None and (paths.dtype.kind != "U" or paths.shape != x.shape[:1]):
        raise ShapeError(f"{where}: paths must be one text entry per sample of X, got {paths.shape} "
                         f"{paths.dtype}")
    return FeatureFile(source, x, labels, classes, paths, _provenance(arrays, where))


def _provenance(arrays: dict[str, np.ndarray], where: str) -> Provenance | None:
    """The features' provenance from the `network` and `stats` of a file `rmidl features` wrote."""
    if not str(arrays.get("format", "")).startswith(f"{FORMAT} ") or "network" not in arrays:
        return None
    try:
        network = json.loads(str(arrays["network"]))
        stats = json.loads(str(arrays["stats"])) if "stats" in arrays else {}
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: its network or stats are not JSON ({error})") from None
    if not isinstance(network, dict) or not isinstance(stats, dict):
        raise InputError(f"{where}: its network and stats must be JSON objects")
    return Provenance.of_features(network, stats, where)


def _labels(arrays: dict[str, np.ndarray], where: str) -> np.ndarray | None:
    found = [arrays[key] for key in LABEL_KEYS if key in arrays]
    if len(found) == 2 and not (found[0].shape == found[1].shape and np.array_equal(found[0], found[1])):
        raise InputError(f"{where} holds both y and labels, and they differ: keep one")
    if not found:
        return None
    labels = found[0]
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ShapeError(f"{where}: labels must be one per sample, got shape {labels.shape}")
    if labels.dtype.kind == "f" and np.isfinite(labels).all() and np.array_equal(labels, np.round(labels)):
        labels = labels.astype(np.int64)  # integral floats (a common way to store indices)
    return labels
