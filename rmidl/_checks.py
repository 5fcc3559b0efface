"""The classifier's input checks, one line per problem: features (finite float64 (n, F)), labels (integers
or text) and option values (whole numbers, numbers in a range)."""

from __future__ import annotations

import math

import numpy as np

from rmidl.errors import InputError, NonFiniteInput, OptionError, ShapeError
from rmidl.validate import check_real, first_non_finite

__all__ = ["as_features", "as_labels", "describe_classes", "label_indices", "number", "whole"]


def whole(name: str, value: object, *, lowest: int = 1) -> int:
    """An integer >= lowest (bool refused), for option `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
        raise OptionError(f"{name}={value!r} must be an integer >= {lowest}")
    return int(value)


def number(name: str, value: object, lo: float, hi: float, *, open_lo: bool = False,
           open_hi: bool = False) -> float:
    """A finite real number in [lo, hi] (or open at either end), for option `name`."""
    text = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise OptionError(f"{name}={value!r} must be a number in {text}")
    result = float(value)
    inside = (lo < result if open_lo else lo <= result) and (result < hi if open_hi else result <= hi)
    if not math.isfinite(result) or not inside:
        raise OptionError(f"{name}={value!r} must be a number in {text}")
    return result


def as_features(x: object, what: str = "X") -> np.ndarray:
    """A real, finite (samples, features) array as C-contiguous float64; one-line errors otherwise."""
    array = np.asarray(x)
    check_real(array, what)
    if array.ndim != 2:
        raise ShapeError(f"{what} must be (samples, features), got shape {array.shape}")
    if 0 in array.shape:
        raise ShapeError(f"{what} is empty: shape {array.shape}")
    problem = first_non_finite(array)
    if problem is not None:
        raise NonFiniteInput(f"{what} contains {problem}")
    return np.ascontiguousarray(array, dtype=np.float64)


def as_labels(y: object, count: int, what: str = "y") -> np.ndarray:
    """Labels as a 1-D integer or text array of `count` entries (integral floats become integers)."""
    if y is None:
        raise InputError(f"labels {what} are missing")
    labels = np.asarray(y)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ShapeError(f"labels {what} must be one label per sample, got shape {labels.shape}")
    if labels.shape[0] != count:
        raise ShapeError(f"labels {what} has {labels.shape[0]} entries for {count} samples")
    if labels.dtype.kind == "b":
        labels = labels.astype(np.int64)
    if labels.dtype.kind == "f":
        problem = first_non_finite(labels)
        if problem is not None:
            raise NonFiniteInput(f"labels {what} contain {problem}")
        if not np.array_equal(labels, np.round(labels)):
            raise OptionError(f"labels {what} must be integers or text, got fractional values "
                              f"(e.g. {labels[labels != np.round(labels)][0]})")
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iuU":
        raise OptionError(f"labels {what} dtype {labels.dtype} is not supported (use integers or text)")
    return labels.astype(np.int64) if labels.dtype.kind in "iu" else labels


def label_indices(classes: np.ndarray, labels: np.ndarray, what: str = "y") -> np.ndarray:
    """Each label's index in `classes` (int64); a label outside them is an OptionError naming it."""
    if (labels.dtype.kind == "U") != (classes.dtype.kind == "U"):
        if labels.dtype.kind == "U":
            raise OptionError(f"labels {what} are text but the model's classes are numbers "
                              f"({describe_classes(classes)})")
        # indices cannot be mapped safely: into which list of names? (a test set may lack a class)
        raise OptionError(f"labels {what} are numbers but the model's classes are names "
                          f"({describe_classes(classes)}): give the names (a FeatureSet's y, or "
                          "classes[indices]) or the FeatureSet itself")
    order = np.argsort(classes, kind="stable")
    ordered = classes[order]
    position = np.minimum(np.searchsorted(ordered, labels), len(ordered) - 1)
    unknown = ordered[position] != labels
    if unknown.any():
        raise OptionError(f"label {labels[unknown][0].item()!r} in {what} is not one of the model's "
                          f"{len(classes)} classes ({describe_classes(classes)})")
    return order[position].astype(np.int64)


def describe_classes(classes: np.ndarray) -> str:
    """The first few class labels, for messages."""
    shown = ", ".join(str(c) for c in classes[:8])
    return shown + (", ..." if len(classes) > 8 else "")
