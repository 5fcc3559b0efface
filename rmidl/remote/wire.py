"""How arrays cross Pyro5: raw little-endian bytes + shape + dtype in a dict msgpack carries natively."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rmidl.errors import BudgetExceeded, DTypeError, ShapeError

__all__ = ["DTYPES", "pack", "unpack", "wire_nbytes"]

# The only dtypes that travel; little-endian on the wire whatever the host's order.
DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8")}
MAX_NDIM = 8


def pack(array: np.ndarray) -> dict[str, Any]:
    """`{"dtype", "shape", "data"}` for a float32/float64 array; `data` is a zero-copy view when it can be."""
    array = np.asarray(array)
    name = array.dtype.name if array.dtype.kind == "f" else ""
    if name not in DTYPES:
        raise DTypeError(f"cannot send dtype {array.dtype} (only {', '.join(DTYPES)} travel)")
    # astype, not ascontiguousarray: that one turns a 0-d array into shape (1,).
    array = array.astype(DTYPES[name], order="C", copy=False)
    # msgpack packs any buffer as bin: a memoryview saves one copy of a band or a result.
    data = array.data.cast("B") if array.size else b""
    return {"dtype": name, "shape": [int(n) for n in array.shape], "data": data}


def wire_nbytes(d: dict[str, Any]) -> int:
    """Bytes the array of wire dict `d` claims to hold (shape x itemsize), after checking dtype and shape."""
    if not isinstance(d, dict):
        raise ShapeError(f"expected a wire array dict, got {type(d).__name__}")
    name = d.get("dtype")
    if name not in DTYPES:
        raise DTypeError(f"wire array dtype {name!r} is not one of {', '.join(DTYPES)}")
    shape = d.get("shape")
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) > MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise ShapeError(f"wire array shape {shape!r} is not a list of at most {MAX_NDIM} non-negative ints")
    return math.prod(shape) * DTYPES[name].itemsize


def unpack(d: dict[str, Any], *, max_bytes: int | None = None) -> np.ndarray:
    """The array a wire dict holds, read-only and without a copy; refuses bad dtype, shape or size."""
    nbytes = wire_nbytes(d)
    if max_bytes is not None and nbytes > max_bytes:
        raise BudgetExceeded(f"wire array of {nbytes} bytes exceeds the limit of {max_bytes} bytes")
    data = d.get("data")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ShapeError(f"wire array data must be bytes, got {type(data).__name__}")
    if not memoryview(data).c_contiguous:
        raise ShapeError("wire array data must be contiguous, got a strided memoryview")
    size = memoryview(data).nbytes
    if size != nbytes:
        shape = tuple(d["shape"])
        raise ShapeError(f"wire array shape {shape} {d['dtype']} needs {nbytes} bytes, got {size}")
    array = np.frombuffer(data, dtype=DTYPES[d["dtype"]]).reshape(d["shape"])
    if array.flags.writeable:
        array.flags.writeable = False
    return array.astype(array.dtype.newbyteorder("="), copy=False)
