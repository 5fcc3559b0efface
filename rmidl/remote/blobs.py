"""Blobs: what a worker must hold once before a job's tasks (a kernel bank, a network, a training
shard, weights).

A blob is a kind, named float arrays and a few scalar settings, addressed by a content id so that a
worker already holding one is not sent it again, whoever asks. Each kind has one check, run by the
worker on `from_wire` before the blob is cached; adding a kind is adding its entry to KINDS.

Wire form: {"kind": str, "arrays": {name: <wire dict>}, "settings": {name: str | int | float | bool | None}}.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np

from rmidl.errors import NonFiniteInput, OptionError, ShapeError
from rmidl.remote.wire import pack, unpack, wire_nbytes

if TYPE_CHECKING:
    from rmidl.network import Network

__all__ = ["KINDS", "Blob", "Scalar"]

Scalar = str | int | float | bool | None
"""A blob setting's value."""


@dataclass(frozen=True, eq=False)
class Blob:
    """A kind, named arrays and scalar settings; immutable, addressed by `content_id`."""

    kind: str
    arrays: Mapping[str, np.ndarray]
    settings: Mapping[str, Scalar] = field(default_factory=dict)

    @classmethod
    def bank(cls, kernels: np.ndarray) -> Blob:
        """A kernel bank (K, kh, kw, C): the blob a correlation job's tasks name."""
        return cls("bank", {"bank": kernels})

    @classmethod
    def network(cls, net: Network) -> Blob:
        """A CNN feature network: its banks and its settings as JSON text (no spec text, so the content id
        follows what computes, as `Network.fingerprint` does); `as_network()` rebuilds it."""
        from rmidl.network import network_parts

        text, banks = network_parts(net, spec=False)
        return cls("network", banks, {"network": text})

    def as_network(self, where: str = "network") -> Network:
        """The Network a "network" blob holds (its settings checked as a network file's are)."""
        from rmidl.network import network_from_parts

        text = self.settings.get("network")
        if self.kind != "network" or not isinstance(text, str):
            raise ShapeError(f"{where} is a {self.kind} blob, not a network")
        return network_from_parts(text, self.arrays, where)

    @classmethod
    def shard(cls, shard: int, x: np.ndarray, y: np.ndarray) -> Blob:
        """Logical shard `shard` of a training set: standardised float64 features (n, F) and class indices
        (n,), which travel as float64 (only floats cross the wire; indices are exact in float64)."""
        return cls("shard", {"x": x, "y": np.asarray(y, dtype=np.float64)}, {"shard": int(shard)})

    @classmethod
    def weights(cls, vector: np.ndarray, version: str) -> Blob:
        """A training step's flat float64 parameter vector, named by its version ("<step>:<hash>")."""
        return cls("weights", {"weights": vector}, {"version": version})

    @property
    def nbytes(self) -> int:
        return sum(int(array.nbytes) for array in self.arrays.values())

    @cached_property
    def content_id(self) -> str:
        """`<kind>-<hash of kind, settings and every array's name, shape, dtype and bytes>`."""
        digest = hashlib.blake2b(digest_size=16)
        names = sorted(self.arrays)
        header = (self.kind, sorted(self.settings.items()),
                  [(name, self.arrays[name].shape, self.arrays[name].dtype.str) for name in names])
        digest.update(repr(header).encode())
        for name in names:
            digest.update(np.ascontiguousarray(self.arrays[name]).data)
        return f"{self.kind}-{digest.hexdigest()}"

    def to_wire(self) -> dict[str, Any]:
        return {"kind": self.kind, "arrays": {name: pack(a) for name, a in self.arrays.items()},
                "settings": dict(self.settings)}

    @staticmethod
    def claimed_nbytes(data: object) -> int:
        """Bytes the arrays of a blob's wire form claim to hold, checked before anything is unpacked."""
        arrays = data.get("arrays") if isinstance(data, dict) else None
        if not isinstance(arrays, dict):
            raise ShapeError("a blob must be a dict with 'kind', 'arrays' and 'settings'")
        return sum(wire_nbytes(wire) for wire in arrays.values())

    @classmethod
    def from_wire(cls, data: object, *, blob_id: str, max_bytes: int) -> Blob:
        """The blob a wire dict holds, after its kind's check; the errors name `blob_id`."""
        if not isinstance(data, dict) or set(data) != {"kind", "arrays", "settings"}:
            raise ShapeError(f"blob {blob_id!r} must be a dict of exactly 'kind', 'arrays' and 'settings'")
        kind, arrays, settings = data["kind"], data["arrays"], data["settings"]
        if kind not in KINDS:
            raise OptionError(f"blob {blob_id!r} is of kind {kind!r}; this worker knows {', '.join(KINDS)}")
        if not isinstance(arrays, dict) or not all(isinstance(name, str) for name in arrays):
            raise ShapeError(f"blob {blob_id!r}: arrays must map names to wire arrays")
        if not isinstance(settings, dict) or not all(
            isinstance(name, str) and (value is None or isinstance(value, (str, int, float, bool)))
            for name, value in settings.items()
        ):
            raise ShapeError(f"blob {blob_id!r}: settings must map names to str, int, float, bool or None")
        blob = cls(kind, {name: unpack(wire, max_bytes=max_bytes) for name, wire in arrays.items()}, settings)
        KINDS[kind](blob, blob_id)
        return blob


def _finite(array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise NonFiniteInput(f"{what} contains NaN or Inf")


def _check_bank(blob: Blob, blob_id: str) -> None:
    if set(blob.arrays) != {"bank"} or blob.settings:
        raise ShapeError(f"bank {blob_id!r} must hold one array named 'bank' and no settings")
    bank = blob.arrays["bank"]
    if bank.ndim != 4 or 0 in bank.shape:
        raise ShapeError(f"bank {blob_id!r} must be a non-empty (K, kh, kw, C) array, not {bank.shape}")
    _finite(bank, f"bank {blob_id!r}")


def _check_network(blob: Blob, blob_id: str) -> None:
    if set(blob.settings) != {"network"}:
        raise ShapeError(f"network {blob_id!r} must have exactly one setting, 'network'")
    for name, bank in blob.arrays.items():
        _finite(bank, f"network {blob_id!r} {name}")
    blob.as_network(f"network {blob_id!r}")


def _check_shard(blob: Blob, blob_id: str) -> None:
    shard = blob.settings.get("shard")
    if set(blob.arrays) != {"x", "y"} or set(blob.settings) != {"shard"} \
            or isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise ShapeError(f"shard {blob_id!r} must hold arrays 'x' and 'y' and a setting 'shard' >= 0")
    x, y = blob.arrays["x"], blob.arrays["y"]
    if x.dtype != np.float64 or x.ndim != 2 or 0 in x.shape or y.dtype != np.float64 \
            or y.shape != x.shape[:1]:
        raise ShapeError(f"shard {blob_id!r} must be x (n, F) float64 and y (n,) float64, not x {x.shape} "
                         f"{x.dtype} and y {y.shape} {y.dtype}")
    _finite(x, f"shard {blob_id!r}")
    if not (np.isfinite(y).all() and (y >= 0).all() and (y == np.floor(y)).all() and y.max() < 2**31):
        raise ShapeError(f"shard {blob_id!r}: y must hold class indices (whole numbers >= 0)")


def _check_weights(blob: Blob, blob_id: str) -> None:
    if set(blob.arrays) != {"weights"} or set(blob.settings) != {"version"} \
            or not isinstance(blob.settings["version"], str):
        raise ShapeError(f"weights {blob_id!r} must hold one array 'weights' and a setting 'version'")
    vector = blob.arrays["weights"]
    if vector.dtype != np.float64 or vector.ndim != 1 or vector.size == 0:
        raise ShapeError(f"weights {blob_id!r} must be a non-empty flat float64 vector, not {vector.shape} "
                         f"{vector.dtype}")
    _finite(vector, f"weights {blob_id!r}")


KINDS: dict[str, Callable[[Blob, str], None]] = {"bank": _check_bank, "network": _check_network,
                                                  "shard": _check_shard, "weights": _check_weights}
"""Blob kind -> its check (raises an InputError naming the blob id); the kinds a worker accepts."""
