"""The records every task kind of the remote contract shares: a shared-memory block, a bulk ticket, where
a result is and its wire form, the Protocols of tasks and replies, and the field checks their `from_wire`
methods are built of (each names the field it refuses, in one line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from rmidl.errors import BankError, DTypeError, ShapeError
from rmidl.remote.wire import pack, unpack, wire_nbytes

__all__ = [
    "OUTPUTS",
    "RESULT_KEYS",
    "TASK_METHODS",
    "BulkTicket",
    "ReplyRecord",
    "Result",
    "ShmRef",
    "TaskRecord",
    "WireRecord",
    "check_blob_id",
    "check_fields",
    "check_int",
    "check_number",
    "check_pair",
    "check_shape",
    "result_from_wire",
    "result_to_wire",
]

WireRecord = dict[str, Any]
"""A record as it crosses the wire: a msgpack-able dict."""
TASK_METHODS = ("correlate", "gradient")
"""The task methods of this version's contract (a worker tells which it serves in `info()`)."""
OUTPUTS = ("inline", "bulk")
"""Where a task's result goes besides shared memory: in the reply, or held for the bulk channel."""


def check_blob_id(blob_id: object) -> str:
    """A blob id: a non-empty string of at most 200 characters (callers use `Blob.content_id`)."""
    if not isinstance(blob_id, str) or not 0 < len(blob_id) <= 200:
        raise BankError(f"blob id {blob_id!r} must be a non-empty string of at most 200 characters")
    return blob_id


def check_fields(data: object, what: str, required: set[str], optional: frozenset[str] = frozenset()) -> dict:
    """`data` as a dict holding every `required` key and nothing beyond `required | optional`."""
    if not isinstance(data, dict):
        raise ShapeError(f"{what} must be a dict, got {type(data).__name__}")
    missing = required - set(data)
    if missing:
        raise ShapeError(f"{what} is missing {', '.join(sorted(missing))}")
    unknown = set(data) - required - optional
    if unknown:
        names = ", ".join(sorted(map(str, unknown)))
        raise ShapeError(f"{what} has unknown field(s) {names} (caller and worker of different versions?)")
    return data


def check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(f"{what} must be an int, got {value!r}")
    return value


def check_number(value: object, what: str, *, non_negative: bool = False) -> float:
    """A JSON-like number (not a bool) as float; with non_negative, also >= 0 (NaN refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (non_negative and not value >= 0):
        raise ShapeError(f"{what} must be a {'non-negative ' if non_negative else ''}number, got {value!r}")
    return float(value)


def check_pair(value: object, what: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ShapeError(f"{what} must be [start, stop], got {value!r}")
    return check_int(value[0], what), check_int(value[1], what)


def check_shape(value: object, dtype: object, what: str) -> tuple[tuple[int, ...], str]:
    """A (shape, dtype) pair of an array that may travel, checked as `wire_nbytes` checks wire dicts."""
    try:
        wire_nbytes({"dtype": dtype, "shape": value})
    except (ShapeError, DTypeError) as error:
        raise type(error)(f"{what}: {error}") from None
    assert isinstance(value, (list, tuple)) and isinstance(dtype, str)
    return tuple(value), dtype


@dataclass(frozen=True)
class ShmRef:
    """A shared-memory block on the worker's host (`rmidl.remote.shm`): the array of `shape` and `dtype` at
    its start, the owner's pid and fd through which it is opened, and the token that opens it (the
    per-block capability: a worker maps a block only for a request that shows it)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    pid: int
    fd: int
    token: str = field(repr=False)

    def to_wire(self) -> WireRecord:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "pid": self.pid,
                "fd": self.fd, "token": self.token}

    @classmethod
    def from_wire(cls, data: object, what: str = "shared memory descriptor") -> ShmRef:
        record = check_fields(data, what, {"name", "shape", "dtype", "pid", "fd", "token"})
        if not isinstance(record["name"], str) or not isinstance(record["token"], str):
            raise ShapeError(f"{what}: name and token must be strings")
        shape, dtype = check_shape(record["shape"], record["dtype"], what)
        return cls(record["name"], shape, dtype, check_int(record["pid"], f"{what} pid"),
                   check_int(record["fd"], f"{what} fd"), record["token"])


@dataclass(frozen=True)
class BulkTicket:
    """A result a worker holds for one fetch over its bulk side channel (`rmidl.remote.bulk.fetch`)."""

    ticket: str
    nbytes: int
    shape: tuple[int, ...]
    dtype: str


Result = np.ndarray | BulkTicket | None
"""Where a task's result is: in the reply (array), on the bulk channel (ticket), in shared memory (None)."""


def result_to_wire(result: Result) -> WireRecord:
    if result is None:
        return {}
    if isinstance(result, BulkTicket):
        return {"ticket": result.ticket, "nbytes": result.nbytes, "shape": list(result.shape),
                "dtype": result.dtype}
    return {"result": pack(result)}


RESULT_KEYS = frozenset({"result", "ticket", "nbytes", "shape", "dtype"})


def result_from_wire(record: dict, what: str, max_bytes: int) -> Result:
    if "result" in record:
        return unpack(record["result"], max_bytes=max_bytes)
    if "ticket" not in record:
        return None
    if not isinstance(record["ticket"], str) or not record.keys() >= {"nbytes", "shape", "dtype"}:
        raise ShapeError(f"{what}: a bulk result needs ticket, nbytes, shape and dtype")
    shape, dtype = check_shape(record["shape"], record["dtype"], what)
    nbytes = check_int(record["nbytes"], f"{what} nbytes")
    if nbytes != wire_nbytes({"dtype": dtype, "shape": list(shape)}):
        raise ShapeError(f"{what}: {nbytes} bytes do not match shape {shape} {dtype}")
    return BulkTicket(record["ticket"], nbytes, shape, dtype)


class ReplyRecord(Protocol):
    """What every task method answers: the task, the seconds it took in the worker, where its result is."""

    @property
    def task_id(self) -> int: ...

    @property
    def seconds(self) -> float: ...

    @property
    def result(self) -> Result: ...


class TaskRecord(Protocol):
    """A typed task: the worker method it goes to, its wire form, and how its reply is read."""

    METHOD: ClassVar[str]

    @property
    def task_id(self) -> int: ...

    def to_wire(self) -> WireRecord: ...

    def parse_reply(self, data: object, *, max_bytes: int) -> ReplyRecord: ...
