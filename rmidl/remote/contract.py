"""The remote contract of a ConvolutionWorker (the RMI interface): typed records and the Protocol served.

Every value crosses Pyro5 with msgpack, so only dicts, lists, str, int, float, bool, None and bytes
travel, arrays only as `rmidl.remote.wire` dicts. Each record has ONE `to_wire()` (what the sender puts on
the wire) and ONE `from_wire()` (what the receiver accepts, every field checked): the client's stub builds
tasks and blobs with the first and the worker parses them with the second, and the other way round for
replies and `info()`. Errors are the `rmidl.errors` classes named in the Protocol, arriving as themselves.

A correlation task asks for a *valid* correlation (the coordinator pads the image for the job's mode and
flips kernels for true convolution): output rows [r0, r1) and kernels [k0, k1) of the job, whose input is
the band of rows `rmidl.geometry.band_rows((r0, r1), kh)`, with the bank of a blob put earlier; in a batch
job (`images` given), of images [n0, n1) of the batch.

Wire form of a correlate task (`CorrelateTask`), every key required but `engine` and `images`; no other
key allowed:
    task_id: int (tasks are idempotent: running one twice writes the same values)
    bank_id: str, the id of a "bank" blob given earlier to `put_blob`
    kernels: [k0, k1]    rows: [r0, r1] (output rows)
    input:   {"array": <wire dict of the input band>} or {"shm": <ShmRef of the whole padded image>}
    output:  "inline" (the result in the reply) | "bulk" (kept for one fetch over the bulk channel)
             | {"shm": <ShmRef of the whole output (K, OH, OW)>} (out[k0:k1, r0:r1] written in place)
    a ShmRef: name, shape, dtype, pid, fd, token (the block's capability, see rmidl.remote.shm)
    engine:  "auto" (default) or one of rmidl.kernels.ENGINES
    images:  [n0, n1] (a batch job): every array above gains a leading image axis. The input band is
             (n1 - n0, rows, W', C) and the result (n1 - n0, k1 - k0, r1 - r0, OW); the shared input is the
             whole padded batch (N, H', W', C) and the shared output (N, K, OH, OW), of which
             out[n0:n1, k0:k1, r0:r1] is written.
Its reply (`CorrelateReply`): task_id, seconds, engine (the one that ran), and for "inline" "result" (a wire
dict), for "bulk" "ticket", "nbytes", "shape", "dtype"; nothing more for shared memory.

The gradient task of data-parallel training and its reply live in `rmidl.remote.gradient`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from rmidl.errors import ShapeError
from rmidl.remote.blobs import Blob
from rmidl.remote.records import (
    OUTPUTS,
    RESULT_KEYS,
    TASK_METHODS,
    BulkTicket,
    ReplyRecord,
    Result,
    ShmRef,
    TaskRecord,
    WireRecord,
    check_blob_id,
    check_fields,
    check_int,
    check_number,
    check_pair,
    result_from_wire,
    result_to_wire,
)
from rmidl.remote.wire import pack, unpack
from rmidl.validate import check_engine

__all__ = [
    "OUTPUTS",
    "Blob",
    "BulkTicket",
    "ConvolutionWorkerAPI",
    "CorrelateReply",
    "CorrelateTask",
    "ReplyRecord",
    "Result",
    "ShmRef",
    "TASK_METHODS",
    "TaskRecord",
    "WireRecord",
    "WorkerInfo",
    "check_blob_id",
]

@dataclass(frozen=True)
class CorrelateReply:
    """The reply of `correlate` (see the module docstring)."""

    task_id: int
    seconds: float
    engine: str
    result: Result = None

    def to_wire(self) -> WireRecord:
        return {"task_id": self.task_id, "seconds": self.seconds, "engine": self.engine,
                **result_to_wire(self.result)}

    @classmethod
    def from_wire(cls, data: object, *, max_bytes: int) -> CorrelateReply:
        record = check_fields(data, "correlate reply", {"task_id", "seconds", "engine"}, RESULT_KEYS)
        seconds = check_number(record["seconds"], "correlate reply: seconds")
        return cls(check_int(record["task_id"], "task_id"), seconds, check_engine(record["engine"]),
                   result_from_wire(record, "correlate reply", max_bytes))


@dataclass(frozen=True)
class CorrelateTask:
    """One correlation task (see the module docstring): output rows x kernels of a job."""

    METHOD: ClassVar[str] = "correlate"
    task_id: int
    bank_id: str
    kernels: tuple[int, int]
    rows: tuple[int, int]
    source: np.ndarray | ShmRef
    """The input band (rows `band_rows(rows, kh)` of the padded image), or the whole padded image."""
    output: str | ShmRef
    """"inline", "bulk", or the whole output in shared memory."""
    engine: str = "auto"
    images: tuple[int, int] | None = None
    """Images [n0, n1) of a batch job (its arrays have a leading image axis); None for one image."""

    def to_wire(self) -> WireRecord:
        source = {"shm": self.source.to_wire()} if isinstance(self.source, ShmRef) else {
            "array": pack(self.source)}
        output = {"shm": self.output.to_wire()} if isinstance(self.output, ShmRef) else self.output
        record = {"task_id": self.task_id, "bank_id": self.bank_id, "kernels": list(self.kernels),
                  "rows": list(self.rows), "input": source, "output": output, "engine": self.engine}
        if self.images is not None:
            record["images"] = list(self.images)
        return record

    @classmethod
    def from_wire(cls, data: object, *, max_bytes: int) -> CorrelateTask:
        """The task a wire dict describes; ShapeError, BankError, OptionError name the bad field."""
        record = check_fields(data, "task", {"task_id", "bank_id", "kernels", "rows", "input", "output"},
                         frozenset({"engine", "images"}))
        task_id = check_int(record["task_id"], "task_id")
        bank_id = check_blob_id(record["bank_id"])
        ranges = {name: check_pair(record[name], name) for name in ("kernels", "rows", "images")
                  if name in record}
        for name, (start, stop) in ranges.items():
            if not 0 <= start < stop:
                raise ShapeError(f"task {task_id}: {name} [{start}, {stop}) are empty or negative")
        source_record = record["input"]
        if not (isinstance(source_record, dict) and len(source_record) == 1
                and next(iter(source_record)) in ("array", "shm")):
            raise ShapeError(f"task {task_id}: input must be {{'array': ...}} or {{'shm': ...}}")
        source: np.ndarray | ShmRef
        if "shm" in source_record:
            source = ShmRef.from_wire(source_record["shm"], f"task {task_id}: input")
        else:
            source = unpack(source_record["array"], max_bytes=max_bytes)
        output_record = record["output"]
        output: str | ShmRef
        if isinstance(output_record, dict) and set(output_record) == {"shm"}:
            output = ShmRef.from_wire(output_record["shm"], f"task {task_id}: output")
        elif isinstance(output_record, str) and output_record in OUTPUTS:
            output = output_record
        else:
            raise ShapeError(
                f"task {task_id}: output {output_record!r} is not 'inline', 'bulk' or {{'shm': ...}}"
            )
        engine = check_engine(record.get("engine", "auto"))
        return cls(task_id, bank_id, ranges["kernels"], ranges["rows"], source, output, engine,
                   ranges.get("images"))

    def parse_reply(self, data: object, *, max_bytes: int) -> CorrelateReply:
        reply = CorrelateReply.from_wire(data, max_bytes=max_bytes)
        if reply.task_id != self.task_id:
            raise ShapeError(f"reply to task {self.task_id} names task {reply.task_id}")
        return reply


_INFO_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "host": (str,), "hostname": (str,), "host_id": (str,), "pid": (int,),
    "cores": (int,), "threads": (int,), "version": (str,), "gflops": (int, float), "tasks_done": (int,),
    "busy": (int,), "engines": (dict,), "blobs": (list,), "banks": (list,), "bulk_port": (int, type(None)),
    "shm_blocks": (int,), "max_message_size": (int,), "memory_budget": (int,), "blob_budget": (int,),
    "blob_slots": (int,), "max_tasks": (int,), "methods": (list,),
}


@dataclass(frozen=True)
class WorkerInfo:
    """What `info()` tells about a worker: identity, capabilities (limits, budgets, bulk port) and state.

    `host_id` equal to the caller's means shared memory works between them; `bulk_port` None means no
    bulk channel; `gflops` is the engine's measured rate on `threads` threads (0: not reported).
    """

    name: str = ""
    host: str = ""
    hostname: str = ""
    host_id: str = ""
    pid: int = 0
    cores: int = 0
    threads: int = 0
    version: str = ""
    gflops: float = 0.0
    tasks_done: int = 0
    busy: int = 0
    engines: Mapping[str, int] = field(default_factory=dict)
    """Tasks run per engine (what "auto" resolved to included)."""
    blobs: tuple[str, ...] = ()
    """Ids of the cached blobs, least recently used first."""
    banks: tuple[str, ...] = ()
    """Ids of the cached blobs of kind "bank"."""
    bulk_port: int | None = None
    shm_blocks: int = 0
    max_message_size: int = 0
    memory_budget: int = 0
    """Largest output (bytes) the worker holds for its tasks at once (0: not reported)."""
    blob_budget: int = 0
    """Bytes of blobs it caches: a larger blob is refused (0: not reported)."""
    blob_slots: int = 0
    """Blobs it caches at once."""
    max_tasks: int = 0
    """Tasks it holds at once (running and queued); more are refused as WorkerBusy."""
    methods: tuple[str, ...] = ()
    """The task methods it serves (TASK_METHODS of its version); () from a worker older than the field."""

    def serves(self, method: str) -> bool:
        """Whether the worker runs tasks of `method` (a worker that does not say serves only "correlate")."""
        return method in self.methods or (not self.methods and method == "correlate")

    def to_wire(self) -> WireRecord:
        record = {name: getattr(self, name) for name in _INFO_TYPES}
        record.update(engines=dict(self.engines), blobs=list(self.blobs), banks=list(self.banks),
                      methods=list(self.methods))
        return record

    @classmethod
    def from_wire(cls, data: object) -> WorkerInfo:
        """Known fields type-checked; missing ones take their defaults and unknown ones are ignored, so
        workers of neighbouring versions still describe themselves."""
        if not isinstance(data, dict):
            raise ShapeError(f"worker info must be a dict, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for name, types in _INFO_TYPES.items():
            if name not in data:
                continue
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, types):
                expected = " or ".join(t.__name__ for t in types)
                raise ShapeError(f"worker info {name}={value!r} has the wrong type (expected {expected})")
            values[name] = value
        values["blobs"] = tuple(map(str, values.get("blobs", ())))
        values["banks"] = tuple(map(str, values.get("banks", ())))
        values["methods"] = tuple(map(str, values.get("methods", ())))
        values["gflops"] = float(values.get("gflops", 0.0))
        return cls(**values)


@runtime_checkable
class ConvolutionWorkerAPI(Protocol):
    """What a worker daemon serves (Pyro5 instance_mode "single"; every method is thread-safe)."""

    def ping(self) -> str:
        """Return "pong"; the cheapest liveness check."""
        ...

    def info(self) -> WireRecord:
        """A `WorkerInfo` in its wire form."""
        ...

    def put_blob(self, blob_id: str, record: WireRecord) -> None:
        """Cache a `Blob` (its wire form) under `blob_id` (LRU, bounded by count and bytes); tasks then name
        it. Raises BankError (bad id), ShapeError, DTypeError, NonFiniteInput, OptionError (a kind this
        worker does not know), BudgetExceeded (over the worker's blob budget)."""
        ...

    def drop_blob(self, blob_id: str) -> bool:
        """Forget a blob; True if it was cached."""
        ...

    def correlate(self, task: WireRecord) -> WireRecord:
        """Run one `CorrelateTask`; returns a `CorrelateReply`. Raises BankError (bank not cached: put it
        again), ShapeError, DTypeError, KernelTooLarge, OptionError (engine), BudgetExceeded (the task
        alone is over a budget or, inline, over max_message_size); and, to be run again or elsewhere,
        WorkerBusy (max_tasks held, or memory held by other tasks' outputs) and WorkerLost (the worker
        is shutting down)."""
        ...

    def features(self, task: WireRecord) -> WireRecord:
        """Run one `rmidl.remote.features.FeaturesTask` (a batch through stages of a "network" blob);
        returns a `FeaturesReply`. Raises BankError (network not cached: put it again), ShapeError,
        DTypeError, NonFiniteInput, KernelTooLarge, ImageReadError (a file it was told to read, unless the
        description says skip_bad), BudgetExceeded; ClusterError and WorkerLost as `correlate` does."""
        ...

    def gradient(self, task: WireRecord) -> WireRecord:
        """Run one `rmidl.remote.gradient.GradientTask`; returns a `GradientReply`. Raises BankError (a shard
        or weights blob not cached: put it again), ShapeError, OptionError (spec, plan, step or shard outside
        the plan, data of another size), BudgetExceeded (an inline reply over max_message_size); and, to
        be run again or elsewhere, WorkerBusy (max_tasks held) and WorkerLost (shutting down)."""
        ...

    def release_shm(self, names: list[str]) -> int:
        """Unmap the shared-memory blocks with these names (the coordinator calls it when it closes its
        blocks: an unlinked block's memory is freed only once every process has unmapped it); returns
        how many were mapped. Unknown names are ignored. Raises ShapeError if `names` is not a list of
        str. Workers also bound their mapped blocks by count and by bytes (memory_budget)."""
        ...

