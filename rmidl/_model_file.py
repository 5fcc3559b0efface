"""The MLP's file: a .npz of plain arrays (no pickle) with its settings as JSON text and a format version.

Version 2 adds `features` to the settings: where the training features came from (rmidl.provenance;
null when not known). Version 1 files (without it) still load, with no provenance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rmidl._files import atomic_write, read_npz, shown
from rmidl.config import Config
from rmidl.errors import InputError, RmidlError
from rmidl.provenance import Provenance

if TYPE_CHECKING:
    from rmidl.mlp import MLP

__all__ = ["FORMAT", "FORMAT_VERSION", "load_model", "save_model"]

FORMAT = "rmidl.mlp"
FORMAT_VERSION = 2
_REQUIRED = ("format", "format_version", "settings", "parameters", "classes")
_SETTINGS = {1: {"sizes", "activation", "output", "seed", "weight_decay"}}
_SETTINGS[2] = _SETTINGS[1] | {"features"}


def save_model(model: MLP, path: str | os.PathLike[str]) -> Path:
    """Write `model` to `path` (.npz) through a temporary sibling, so readers never see half a file."""
    target = Path(path)
    if target.suffix.lower() != ".npz":
        raise InputError(f"cannot save model {str(target)!r}: the file name must end in .npz")
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "settings": np.array(json.dumps(model.settings(), sort_keys=True)),
        "parameters": model.parameters,
        "classes": model.classes,
    }
    if model.mean is not None and model.scale is not None:
        arrays["mean"], arrays["scale"] = model.mean, model.scale
    with atomic_write(target, f"model {shown(target)}") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return target


def _read_arrays(path: Path, where: str) -> dict[str, np.ndarray]:
    arrays = read_npz(path, where, max_bytes=Config().memory_budget)
    if "format" not in arrays:
        held = f"arrays {', '.join(arrays)}" if arrays else "no arrays"
        raise InputError(f"{where} is not an rmidl model: it holds {held}")
    missing = [name for name in _REQUIRED if name not in arrays]
    if missing:
        raise InputError(f"{where} is not a complete rmidl model: {', '.join(missing)} missing")
    return arrays


def _shown(array: np.ndarray) -> str:
    """A scalar member as its value, anything else as its shape and dtype (for messages)."""
    return repr(array.item()) if array.shape == () else f"an array of shape {array.shape} ({array.dtype})"


def _settings(arrays: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    kind, version = arrays["format"], arrays["format_version"]
    if kind.shape != () or kind.dtype.kind != "U" or str(kind) != FORMAT:
        raise InputError(f"{where} is not an rmidl model (format {_shown(kind)}, expected {FORMAT!r})")
    if version.shape != () or version.dtype.kind not in "iu" or not 1 <= int(version) <= FORMAT_VERSION:
        raise InputError(f"{where} has model format version {_shown(version)}; this rmidl reads "
                         f"1 to {FORMAT_VERSION} (a newer rmidl wrote it?)")
    text, keys = arrays["settings"], _SETTINGS[int(version)]
    try:
        settings = json.loads(str(text)) if text.shape == () and text.dtype.kind == "U" else None
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict) or set(settings) != keys:
        expected = ", ".join(sorted(keys))
        raise InputError(f"{where} has malformed settings (expected JSON with {expected})")
    return settings


def load_model(path: str | os.PathLike[str]) -> MLP:
    """Read a model file save_model wrote, checking kind, version, shapes and values (one-line errors)."""
    from rmidl.mlp import MLP

    source = Path(path)
    where = f"model file {str(source)!r}"
    arrays = _read_arrays(source, where)
    settings = _settings(arrays, where)
    classes = arrays["classes"]
    features = settings.get("features")
    provenance = None if features is None else Provenance.from_dict(features, f"{where} settings")
    try:
        model = MLP(settings["sizes"], activation=settings["activation"], output=settings["output"],
                    seed=settings["seed"], weight_decay=settings["weight_decay"], classes=list(classes),
                    provenance=provenance)
    except RmidlError as error:
        raise InputError(f"{where} has bad settings: {error}") from None
    parameters = arrays["parameters"]
    if parameters.dtype != np.float64 or parameters.shape != (model.spec.parameter_count,):
        raise InputError(f"{where} holds parameters of shape {parameters.shape} ({parameters.dtype}); sizes "
                         f"{model.sizes} need ({model.spec.parameter_count},) float64")
    if not np.isfinite(parameters).all():
        raise InputError(f"{where} holds non-finite parameters")
    model.set_parameters(parameters)
    if ("mean" in arrays) != ("scale" in arrays):
        raise InputError(f"{where} holds only one of mean and scale")
    if "mean" in arrays:
        mean, scale = arrays["mean"], arrays["scale"]
        for name, array in (("mean", mean), ("scale", scale)):
            if array.dtype != np.float64 or array.shape != (model.spec.features,):
                raise InputError(f"{where} holds {name} of shape {array.shape} ({array.dtype}); the model "
                                 f"takes {model.spec.features} features, float64")
        if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
            raise InputError(f"{where} holds a non-finite mean or a scale that is not positive")
        model.mean, model.scale = mean, scale
    return model
