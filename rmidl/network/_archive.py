"""A Network in one .npz: its banks as arrays and its settings as JSON text; never pickled."""

from __future__ import annotations

import json
import os
import threading
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rmidl._files import open_failure, open_regular
from rmidl.config import Config
from rmidl.errors import BudgetExceeded, InputError, RmidlError
from rmidl.network._network import Network
from rmidl.network._spec import PRESETS
from rmidl.network._stage import Stage

__all__ = ["FORMAT", "VERSION", "load_network", "network_from_parts", "network_parts", "resolve_network",
           "save_network"]

FORMAT = "rmidl.network"
VERSION = 1
_STAGE_KEYS = {"activation", "pool", "pool_size", "pool_stride", "mode", "depthwise"}


def save_network(net: Network, path: str | os.PathLike[str]) -> Path:
    """Write `net` to `path` through a temporary sibling and a rename (readers never see half a file)."""
    target = Path(path)
    text, banks = network_parts(net)
    arrays: dict[str, Any] = {"settings": np.array(text), **banks}
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with temporary.open("wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temporary, target)
    except OSError as error:
        raise InputError(f"cannot write network file {str(target)!r}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return target


def _member(archive: Any, name: str, where: str, budget: int) -> np.ndarray:
    if name not in archive.files:
        raise InputError(f"{where} lacks array {name!r}: not a complete rmidl network file")
    if archive.zip.getinfo(f"{name}.npy").file_size > budget:
        raise BudgetExceeded(f"{where}: array {name!r} is larger than memory_budget={budget} bytes")
    return np.asarray(archive[name])


def _settings(archive: Any, where: str, budget: int) -> dict[str, Any]:
    raw = _member(archive, "settings", where, budget)
    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise InputError(f"{where} is not an rmidl network file (its 'settings' is not JSON text)")
    return _parse_settings(str(raw), where)


def _parse_settings(text: str, where: str) -> dict[str, Any]:
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{where} has unreadable settings: {error}") from None
    if not isinstance(settings, dict) or settings.get("format") != FORMAT:
        raise InputError(f"{where} is not an rmidl network file (format is not {FORMAT!r})")
    version = settings.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise InputError(f"{where} has format version {version!r}; this rmidl reads versions 1 to {VERSION}")
    if not isinstance(settings.get("stages"), list) or not settings["stages"]:
        raise InputError(f"{where} lists no stages")
    return settings


def _network(archive: Any, where: str, budget: int) -> Network:
    settings = _settings(archive, where, budget)
    return _build(settings, lambda name: _member(archive, name, where, budget), where)


def _build(settings: dict[str, Any], bank: Callable[[str], np.ndarray], where: str) -> Network:
    stages = []
    for i, options in enumerate(settings["stages"]):
        if not isinstance(options, dict) or not set(options) <= _STAGE_KEYS:
            extra = sorted(set(options) - _STAGE_KEYS) if isinstance(options, dict) else options
            raise InputError(f"{where}: stage {i + 1} has unknown settings {extra!r}")
        arguments: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        stages.append(Stage(bank(f"bank_{i}"), **arguments))
    spec = settings.get("spec")
    return Network(stages, channels=settings.get("channels"), spec=spec if isinstance(spec, str) else None)


def network_parts(net: Network, *, spec: bool = True) -> tuple[str, dict[str, np.ndarray]]:
    """What a network file (and a worker's "network" blob) holds: the settings as JSON text and the banks
    as bank_0..bank_<n-1>; `spec=False` leaves the spec text out (it does not change what computes)."""
    settings = {"format": FORMAT, "version": VERSION, **net.settings()}
    if not spec:
        settings["spec"] = None
    return json.dumps(settings), {f"bank_{i}": bank for i, bank in enumerate(net.banks)}


def network_from_parts(text: str, banks: Mapping[str, np.ndarray], where: str = "network") -> Network:
    """The network network_parts() described, every setting checked as a file's are."""
    settings = _parse_settings(text, where)
    expected = {f"bank_{i}" for i in range(len(settings["stages"]))}
    if set(banks) != expected:
        raise InputError(f"{where} holds arrays {sorted(banks)}; its {len(expected)} stages need "
                         f"{sorted(expected)}")
    return _build(settings, lambda name: banks[name], where)


def load_network(path: str | os.PathLike[str]) -> Network:
    """Read a network file; every problem is one InputError line naming the file (bad stage settings
    keep their own class: OptionError, BankError, ShapeError)."""
    source = Path(path)
    where = f"network file {str(source)!r}"
    budget = Config().memory_budget
    try:
        with open_regular(source, where) as handle:  # a FIFO or a device is refused, never waited on
            archive = np.load(handle, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise InputError(f"{where} holds a single array, not an rmidl network (.npz) file")
            with archive:
                return _network(archive, where, budget)
    except RmidlError as error:
        if where in str(error):
            raise
        raise type(error)(f"{where}: {error}") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError, zlib.error) as error:
        detail = str(error) or type(error).__name__
        if "pickle" in detail:  # numpy's words for object arrays and pickled data
            detail = "pickled data, which rmidl never loads"
        reason = open_failure(error) or f"is not an rmidl network file (truncated or foreign): {detail}"
        raise InputError(f"{where} {reason}") from None


def resolve_network(net: Network | str | os.PathLike[str], *, seed: int = 0, channels: int = 1) -> Network:
    """What `--net SPEC|FILE` names: a Network as is, a saved file (a path with a directory part, ending in
    .npz, or an existing file not named as a preset), else a spec or preset built with `seed` and
    `channels` (a preset's name wins over a directory or file of that name in the working directory)."""
    if isinstance(net, Network):
        return net
    text = net.strip().lower() if isinstance(net, str) else ""
    if isinstance(net, os.PathLike) or (isinstance(net, str) and (
            text.endswith(".npz") or os.path.sep in net
            or (text not in PRESETS and Path(net).is_file()))):
        return load_network(Path(net).expanduser() if isinstance(net, str) else Path(net))
    return Network.from_spec(net, seed=seed, channels=channels)
