"""The correlation job: one image, or a batch of images, x one bank as tasks of images x output rows x
kernels (rmidl.correlate on a cluster, with or without `batch=True`).

Every task is a valid correlation of the mode-padded images (the padding is done once, here): images
[n0, n1) x output rows [r0, r1) x kernels [k0, k1), whose input is the band `band_rows((r0, r1), kh)` of
each of its images. A job of one image is a batch of one inside; only its records and its result keep
the image's own shapes (no image axis). Same-host workers read the padded images from and write their
results into shared memory; the others get their bands inline and send results back over the bulk
channel (or inline, without one).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from rmidl._memory import empty
from rmidl.config import Config
from rmidl.errors import BudgetExceeded, RmidlError
from rmidl.geometry import Task, band_rows, max_band_rows, pad_for_mode
from rmidl.kernels import correlate_valid_batch
from rmidl.remote.blobs import Blob
from rmidl.remote.contract import CorrelateReply, CorrelateTask, ReplyRecord, ShmRef
from rmidl.validate import Prepared, PreparedBatch, check_engine, check_out

from ..cost import MAX_TASK_BYTES, Capacity, TaskCost
from ..planning import Plan, plan, task_bytes_for

if TYPE_CHECKING:
    from ..shared import SharedPool
    from ..stub import WorkerStub

__all__ = ["CorrelationJob"]


BLOB_FRAMING = 4096
"""Bytes a put_blob message holds beside the bank's own (header, names, settings), with room to spare."""


class CorrelationJob:
    """A `JobKind` of `rmidl.geometry.Task`s. Built (every option checked), then `plan_for()` the
    consumers at hand, then run inside `buffers()`, after which `out` is the result: (K, OH, OW) for a
    `Prepared` image, (N, K, OH, OW) for a `PreparedBatch`."""

    kind = "correlate"

    def __init__(self, prepared: Prepared | PreparedBatch, *, config: Config, engine: str = "auto",
                 out: np.ndarray | None = None) -> None:
        self.engine = check_engine(engine)
        self.batch = isinstance(prepared, PreparedBatch)
        shape: tuple[int, ...] = prepared.out_shape
        nbytes = int(np.prod(shape)) * prepared.dtype.itemsize
        if nbytes > config.memory_budget:
            raise BudgetExceeded(
                f"output {'x'.join(map(str, shape))} {prepared.dtype.name} needs {nbytes / 2**20:.0f} "
                f"MiB, over the memory budget of {config.memory_budget / 2**20:.0f} MiB"
            )
        self.out_shape = shape
        self.caller_out = None if out is None else check_out(out, shape, prepared.dtype)
        self.prepared = prepared
        self.config = config
        images, self.kernels = prepared.images, prepared.kernels
        given = self.caller_out
        if given is not None and any(np.may_share_memory(given, a) for a in (images, self.kernels)):
            # Tasks read inputs after others wrote results: inputs under the caller's out= are copied first.
            images, self.kernels = images.copy(), self.kernels.copy()
        self.bank = Blob.bank(self.kernels)
        self.images = images
        self.padded = images  # (N, H, W, C), padded for its mode by plan_for()
        self.plan: Plan | None = None
        self.message_limit: int | None = None
        """The max_message_size the tasks were sized for: a worker taking arrays over TCP needs as much."""
        self.uses_shm = False
        self.out = np.empty(0, prepared.dtype)
        self.engines: Counter[str] = Counter()
        """Tasks each engine ran on the workers (from their replies)."""
        self._shm: tuple[ShmRef, ShmRef, np.ndarray] | None = None
        self._shm_calls = [0, 0]
        """Shared-memory calls requested and accepted: any difference is a call that may still write."""
        self._lock = threading.Lock()

    # -- before the run ------------------------------------------------------------------------------
    def plan_for(self, consumers: Sequence[Capacity], workers: Sequence[WorkerStub], *,
                 shared_memory: bool, min_tasks: int) -> Plan:
        """Pad the images and cut the job for these consumers (and the message limits of these workers)."""
        self.padded = pad_for_mode(self.images, self.kernels.shape[1:3], self.prepared.mode, batch=True)
        workers = [w for w in workers if self._holds_bank(w)]  # the others sit the job out
        self.uses_shm = shared_memory and any(w.shares_memory for w in workers)
        tcp = [w for w in workers if not (self.uses_shm and w.shares_memory)]
        max_task, max_rows, self.message_limit = self._message_limits(tcp)
        # Results over TCP are held in the worker's memory budget until sent: plan within each one's.
        itemsize = self.prepared.dtype.itemsize
        in_flight = max(1, self.config.tasks_in_flight)
        rooms = [w.info.memory_budget // in_flight for w in tcp if w.info.memory_budget]
        bounded = {w.name for w in tcp if w.info.memory_budget}
        max_task = task_bytes_for(max_task, rooms, self.out_shape[-1] * itemsize,
                                  unbounded=any(c.name not in bounded for c in consumers))
        self.plan = plan(self.out_shape[-3:], self.kernels.shape, consumers, itemsize=itemsize,
                         max_task_bytes=max_task, max_band_rows=max_rows, min_tasks=min_tasks,
                         images=self.padded.shape[0])
        return self.plan

    def _message_limits(self, tcp: Sequence[WorkerStub]) -> tuple[int, int | None, int]:
        """Largest result (bytes) and band (output rows) per task, so that every request and inline reply
        fits under the smallest max_message_size of this process and of the workers taking arrays over TCP
        (a bigger message is refused and the task could never succeed); and that smallest size."""
        own = self.config.max_message_size
        smallest = min([own] + [w.info.max_message_size or own for w in tcp])
        # Room for the rest of the message: Pyro5's header, the task's other fields, msgpack framing.
        limit = smallest - min(64 << 10, smallest // 8)
        max_task = min(MAX_TASK_BYTES, own // 2, limit)
        if not tcp:
            return max_task, None, smallest
        row_bytes = self.padded.shape[2] * self.padded.shape[3] * self.padded.itemsize
        kh = int(self.kernels.shape[1])
        rows = max_band_rows(limit, row_bytes, kh)
        if rows < 1:
            raise BudgetExceeded(
                f"one output row needs an input band of {kh} rows x {row_bytes} bytes, over the "
                f"smallest worker message limit of {limit} bytes (raise max_message_size)"
            )
        return max_task, rows, smallest

    @contextmanager
    def buffers(self, pool: SharedPool | None = None) -> Iterator[None]:
        """Allocate the job's output for the run (`self.out`: the caller's `out`, or a new array) and the
        shared blocks same-host workers use, leased from `pool`. Afterwards `self.out` is the result.

        With shared memory and no `out`, the result IS the output block (workers write each byte once,
        where the caller reads it; `rmidl.client.shared` says how long it lives). If a call may still be
        writing into the blocks after the job (it timed out or lost its connection mid-task), the caller
        gets a copy and the blocks are never reused."""
        given = self.caller_out
        if not self.uses_shm:
            self.out = empty(self.out_shape, self.prepared.dtype) if given is None else given
            yield
            return
        assert pool is not None, "a job planned for shared memory needs a SharedPool"
        shared_in = pool.lease(self._own(self.padded).shape, self.padded.dtype)
        shared_out = pool.lease(self.out_shape, self.prepared.dtype)
        shared_in.array[...] = self._own(self.padded)
        self.out = shared_out.array if given is None else given
        self._shm = (shared_in.ref, shared_out.ref, shared_out.array)
        self._shm_calls = [0, 0]
        try:
            yield
        finally:
            self._shm = None
            requested, accepted = self._shm_calls
            if requested != accepted:
                pool.discard(shared_in)
                pool.discard(shared_out)
        if requested != accepted and given is None:
            self.out = self.out.copy(order="C")

    # -- JobKind -------------------------------------------------------------------------------------
    def tasks(self) -> Sequence[Task]:
        assert self.plan is not None, "plan_for() first"
        return self.plan.tasks

    def describe(self, task: Task) -> str:
        (n0, n1), (r0, r1), (k0, k1) = task.images, task.rows, task.kernels
        images = f"images {n0}:{n1}, " if self.batch else ""
        return f"task {task.task_id} ({images}rows {r0}:{r1}, kernels {k0}:{k1})"

    def cost(self, task: Task) -> TaskCost:
        _, kh, kw, channels = self.kernels.shape
        out_elements = task.out_elements(self.out_shape[-1])
        return TaskCost(flops=2.0 * kh * kw * channels * out_elements, input_bytes=self._band(task).nbytes,
                        result_bytes=out_elements * self.prepared.dtype.itemsize)

    def blobs(self) -> Mapping[str, Blob]:
        return {self.bank.content_id: self.bank}

    def accepts(self, stub: WorkerStub) -> bool:
        limit = stub.info.max_message_size
        fits_messages = self._shm_for(stub) or not (self.message_limit and 0 < limit < self.message_limit)
        return fits_messages and self._holds_bank(stub)

    def misfit(self, task: Task, stub: WorkerStub) -> str | None:
        if self._shm_for(stub):
            return None  # written in place: nothing held in the worker's budget
        nbytes = task.out_elements(self.out_shape[-1]) * self.prepared.dtype.itemsize
        budget = stub.info.memory_budget
        if budget and nbytes > budget:
            return f"its output of {nbytes} bytes is over the memory budget of {budget} bytes"
        return None

    def run_local(self, task: Task, threads: int) -> None:
        (k0, k1) = task.kernels
        correlate_valid_batch(self._band(task), self.kernels[k0:k1], self._out_view(task), threads=threads,
                              engine=self.engine)

    def request(self, task: Task, stub: WorkerStub) -> CorrelateTask:
        source: np.ndarray | ShmRef
        output: str | ShmRef
        if self._shm_for(stub):
            assert self._shm is not None
            source, output = self._shm[0], self._shm[1]
            with self._lock:
                self._shm_calls[0] += 1
        else:
            source, output = self._own(self._band(task)), "bulk" if stub.bulk_usable else "inline"
        return CorrelateTask(task.task_id, self.bank.content_id, task.kernels, task.rows, source, output,
                             self.engine, task.images if self.batch else None)

    def accept(self, task: Task, reply: ReplyRecord, stub: WorkerStub) -> int:
        view = self._out_view(task)
        if isinstance(reply, CorrelateReply):
            with self._lock:
                self.engines[reply.engine] += 1
        if self._shm_for(stub):
            assert self._shm is not None
            with self._lock:
                self._shm_calls[1] += 1
            if self.out is not self._shm[2]:  # the caller's own out=: copy the task's part into it
                view[...] = self._slot(self._shm[2], task)
            return 0
        if reply.result is None:
            raise RmidlError(f"worker {stub.name} sent no result for {self.describe(task)}")
        return stub.receive(reply.result, self._own(view), what=self.describe(task))

    # -- internals -----------------------------------------------------------------------------------
    def _holds_bank(self, stub: WorkerStub) -> bool:
        """Whether the bank fits the worker's blob budget and, as one put_blob message, both ends'
        max_message_size (a bigger one is refused by the worker, which drops the connection)."""
        if stub.info.blob_budget and self.bank.nbytes > stub.info.blob_budget:
            return False
        limits = [limit for limit in (stub.info.max_message_size, self.config.max_message_size) if limit > 0]
        return not limits or self.bank.nbytes + BLOB_FRAMING <= min(limits)

    def _shm_for(self, stub: WorkerStub) -> bool:
        return self._shm is not None and stub.shares_memory

    def _own(self, array: np.ndarray) -> np.ndarray:
        """A batch-shaped array (leading image axis) in the job's own shapes: without it for one image."""
        return array if self.batch else array[0]

    def _band(self, task: Task) -> np.ndarray:
        """Input rows the task needs (its output rows plus the kernel's halo) of its images:
        (n1 - n0, rows, W', C), a view."""
        return self.padded[slice(*task.images), slice(*band_rows(task.rows, self.kernels.shape[1]))]

    def _slot(self, out: np.ndarray, task: Task) -> np.ndarray:
        """The task's part (n1 - n0, k1 - k0, r1 - r0, OW) of an output in the job's own shape."""
        batch = out if self.batch else out[None]
        return batch[slice(*task.images), slice(*task.kernels), slice(*task.rows)]

    def _out_view(self, task: Task) -> np.ndarray:
        return self._slot(self.out, task)

