"""The remote ConvolutionWorker (the RMI skeleton): parses a typed task, runs the engine, delivers."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import cache

import numpy as np
from Pyro5.api import behavior, expose

import rmidl
from rmidl import metrics
from rmidl._memory import empty
from rmidl.config import Config
from rmidl.errors import (
    BankError,
    BudgetExceeded,
    ShapeError,
    WorkerBusy,
    WorkerLost,
)
from rmidl.geometry import output_shape
from rmidl.kernels import (
    KernelSpectra,
    available_cores,
    choose_engine,
    correlate_valid_batch,
    measure_gflops,
)
from rmidl.remote.bulk import BulkServer
from rmidl.remote.contract import (
    TASK_METHODS,
    Blob,
    BulkTicket,
    CorrelateReply,
    CorrelateTask,
    Result,
    ShmRef,
    WireRecord,
    WorkerInfo,
    check_blob_id,
)
from rmidl.remote.features import FeaturesTask
from rmidl.remote.gradient import GradientTask
from rmidl.remote.shm import host_id

from .attachments import ATTACHMENT_CACHE, AttachedBlocks
from .cache import LruCache
from .features import FeaturesHandler
from .gradient import run_gradient
from .slots import input_bands, output_slot
from .spectra import BankSpectra

__all__ = ["ATTACHMENT_CACHE", "REPLY_FRAMING", "ConvolutionWorker"]

logger = logging.getLogger(__name__)

RATE_MIN_SECONDS = 0.02
"""Only engine calls at least this long refine the reported rate: shorter ones are mostly call overhead."""
REPLY_FRAMING = 512
"""Bytes an inline reply adds to its result (Pyro5 header and annotations, msgpack keys); the coordinator
leaves at least this much room when it sizes tasks."""
STOP_POLL_S = 0.1
"""How often a task waiting for the engine looks whether the worker is shutting down."""


@behavior(instance_mode="single")
class ConvolutionWorker:
    """Serves `rmidl.remote.contract.ConvolutionWorkerAPI` (its methods only are exposed); one per daemon,
    safe for concurrent calls. Subclasses may wrap the exposed methods (re-decorated with `@expose`)."""

    def __init__(
        self,
        *,
        name: str,
        config: Config,
        threads: int | None = None,
        host: str = "127.0.0.1",
        bulk: BulkServer | None = None,
    ) -> None:
        self._name = name
        self._config = config
        self._threads = max(1, int(threads or available_cores()))
        self._host = host
        self._bulk = bulk
        self._lock = threading.Lock()
        # One task computes at a time with all threads; others meanwhile receive or send their bytes.
        self._compute = threading.Lock()
        self._stopping = threading.Event()
        self._blobs: LruCache[str, Blob] = LruCache(
            config.bank_cache_size, max(1, config.memory_budget // 4), lambda blob: blob.nbytes
        )
        self._spectra = BankSpectra(self._blobs)
        """Each cached bank's kernel spectra for the fft engine, counted in the blobs' bytes."""
        self._attached = AttachedBlocks(config.memory_budget, name=name)
        self._reserved = 0
        self._tasks_done = 0
        self._engines: Counter[str] = Counter()
        self._busy = 0
        self._gflops = _calibrate(self._threads)
        self._features = FeaturesHandler(
            threads=self._threads, computing=self._computing, reserve=self._reservation,
            count=self._count_kept, room=self._room_beside, bulk=bulk, name=name,
            max_message_size=config.max_message_size,
            reply_framing=REPLY_FRAMING)

    # --- the remote interface -------------------------------------------------------------------

    @expose
    def ping(self) -> str:
        return "pong"

    @expose
    def info(self) -> WireRecord:
        self._attached.prune()
        with self._lock:
            blobs = self._blobs.items()
            return WorkerInfo(
                name=self._name,
                host=self._host,
                hostname=socket.gethostname(),
                host_id=host_id(),
                pid=os.getpid(),
                cores=available_cores(),
                threads=self._threads,
                version=rmidl.__version__,
                gflops=round(self._gflops, 3),
                tasks_done=self._tasks_done,
                busy=self._busy,
                engines=dict(self._engines),
                blobs=tuple(blob_id for blob_id, _ in blobs),
                banks=tuple(blob_id for blob_id, blob in blobs if blob.kind == "bank"),
                bulk_port=self._bulk.port if self._bulk else None,
                shm_blocks=len(self._attached),
                max_message_size=self._config.max_message_size,
                memory_budget=self._config.memory_budget,
                blob_budget=self._blobs.max_bytes,
                blob_slots=self._blobs.max_count,
                max_tasks=self._config.worker_max_tasks,
                methods=TASK_METHODS,
            ).to_wire()

    @expose
    def put_blob(self, blob_id: str, record: WireRecord) -> None:
        blob_id = check_blob_id(blob_id)
        nbytes = Blob.claimed_nbytes(record)
        if nbytes > self._blobs.max_bytes:
            kind = record.get("kind") if isinstance(record.get("kind"), str) else "blob"
            raise BudgetExceeded(
                f"{kind} {blob_id!r} of {nbytes} bytes exceeds this worker's blob budget "
                f"of {self._blobs.max_bytes} bytes"
            )
        blob = Blob.from_wire(record, blob_id=blob_id, max_bytes=self._config.max_message_size)
        with self._lock:
            evicted = self._blobs.put(blob_id, blob)
        if evicted:
            logger.debug("evicted %d blob(s) for %s", len(evicted), blob_id)

    @expose
    def drop_blob(self, blob_id: str) -> bool:
        with self._lock:
            return self._blobs.pop(str(blob_id)) is not None

    @expose
    def gradient(self, task: WireRecord) -> WireRecord:
        with self._task("gradient"):
            record = GradientTask.from_wire(task)
            reply = run_gradient(record, blob_of=self._cached, attach=self._attached.attach,
                                 computing=self._computing, threads=self._threads, bulk=self._bulk,
                                 max_message_size=self._config.max_message_size, worker=self._name)
        return reply.to_wire()

    @expose
    def release_shm(self, names: list[str]) -> int:
        """Unmap the shared-memory blocks named (their owner is done with them); return how many were."""
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ShapeError(f"release_shm takes a list of block names, not {names!r}")
        return self._attached.release(set(names))

    @expose
    def correlate(self, task: WireRecord) -> WireRecord:
        started = time.perf_counter()
        with self._task("correlate"):
            record = CorrelateTask.from_wire(task, max_bytes=self._config.max_message_size)
            engine, result = self._correlate(record)
        return CorrelateReply(record.task_id, time.perf_counter() - started, engine, result).to_wire()

    @expose
    def features(self, task: WireRecord) -> WireRecord:
        started = time.perf_counter()
        with self._task("features"):
            record = FeaturesTask.from_wire(task, max_bytes=self._config.max_message_size)
            reply = self._features.run(record, self._blob(record.network_id, "network"))
        return replace(reply, seconds=time.perf_counter() - started).to_wire()

    # --- local use ------------------------------------------------------------------------------

    def close(self) -> None:
        """Refuse tasks from now on (WorkerLost, so callers run them elsewhere), forget the blobs and unmap
        every shared-memory block (the daemon calls this first on shutdown)."""
        self._stopping.set()
        with self._lock:
            self._blobs.clear()
        self._attached.close()

    # --- internals ------------------------------------------------------------------------------

    @contextmanager
    def _task(self, method: str = "task") -> Iterator[None]:
        """Count a task as busy while it runs and as done if it succeeds (also in the metrics, under
        `method`); none once shutting down, and none beyond `worker_max_tasks` held at once (WorkerBusy:
        the caller runs it elsewhere or later), so no caller can make a worker hold unbounded work,
        threads and memory."""
        with self._lock:
            if self._busy >= self._config.worker_max_tasks:
                raise WorkerBusy(f"worker {self._name} is busy: {self._busy} tasks held "
                                 f"(worker_max_tasks={self._config.worker_max_tasks})")
            self._busy += 1
        try:
            with metrics.recorder().worker_task(self._name, method):
                self._refuse_if_stopping()
                yield
        finally:
            with self._lock:
                self._busy -= 1
        with self._lock:
            self._tasks_done += 1

    def _blob(self, blob_id: str, kind: str) -> Blob:
        """The cached blob a task names; BankError (the caller puts it again) if it is not held."""
        with self._lock:
            blob = self._blobs.get(blob_id)
        if blob is None or blob.kind != kind:
            raise BankError(f"{kind} {blob_id!r} is not cached on worker {self._name} (put it again)")
        return blob

    @contextmanager
    def _computing(self) -> Iterator[None]:
        """Hold the compute lock (one task computes at a time, with every thread); refuse once stopping."""
        while not self._compute.acquire(timeout=STOP_POLL_S):
            self._refuse_if_stopping()  # queued behind another task when the worker began to shut down
        try:
            self._refuse_if_stopping()
            yield
        finally:
            self._compute.release()

    def _refuse_if_stopping(self) -> None:
        if self._stopping.is_set():
            # A ClusterError: the caller runs the task again elsewhere (an InputError would fail its job).
            raise WorkerLost(f"worker {self._name} is shutting down")

    def _correlate(self, task: CorrelateTask) -> tuple[str, Result]:
        """Run a parsed task; return the engine that ran and the result (None: written to shared memory)."""
        blob = self._blob(task.bank_id, "bank")
        with self._lock:
            spectra = self._spectra.of(blob)
        try:
            return self._correlate_with(task, blob.arrays["bank"], spectra)
        finally:
            grown = spectra.nbytes  # its own lock: not under ours
            with self._lock:
                self._spectra.count(task.bank_id, blob, grown)

    def _correlate_with(self, task: CorrelateTask, bank: np.ndarray,
                        spectra: KernelSpectra) -> tuple[str, Result]:
        (k0, k1), (n0, n1) = task.kernels, task.images or (0, 1)
        if k1 > bank.shape[0]:
            raise ShapeError(f"task {task.task_id}: kernels [{k0}, {k1}) outside bank {task.bank_id!r} "
                             f"of {bank.shape[0]}")
        if task.output == "bulk" and self._bulk is None:
            raise ShapeError(f"task {task.task_id}: worker {self._name} has no bulk channel")
        kernels = bank[k0:k1]
        spectra = spectra.select(k0, k1)
        shared = self._attached.attach(task.source) if isinstance(task.source, ShmRef) else None
        images = input_bands(task, kernels, shared)
        out_shape = (n1 - n0, k1 - k0, *output_shape(images.shape[1:3], kernels.shape[1:3], "valid"))
        if isinstance(task.output, ShmRef):
            view = output_slot(task, kernels, self._attached.attach(task.output), out_shape[3])
            return self._compute_into(images, kernels, view, task.engine, spectra), None
        nbytes = int(np.prod(out_shape)) * kernels.itemsize
        if task.output == "inline" and nbytes + REPLY_FRAMING > self._config.max_message_size:
            # Pyro5 would refuse the reply after the work and drop the connection: say why, before it.
            raise BudgetExceeded(
                f"task {task.task_id}: inline result of {nbytes} bytes does not fit this worker's "
                f"max_message_size of {self._config.max_message_size} bytes (use 'bulk' or 'shm' output)"
            )
        with self._reservation(nbytes, task.task_id):
            result = empty(out_shape, kernels.dtype)  # recycled: no page faults once warm
            engine = self._compute_into(images, kernels, result, task.engine, spectra)
            if task.images is None:
                result = result[0]
            if task.output == "inline":
                return engine, result
            assert self._bulk is not None
            ticket = self._bulk.offer(result)
            return engine, BulkTicket(ticket, nbytes, result.shape, result.dtype.name)

    def _compute_into(self, images: np.ndarray, kernels: np.ndarray, out: np.ndarray, engine: str,
                      spectra: KernelSpectra | None = None) -> str:
        """Run `engine` ("auto" resolved here, so info() can say which ran) with every thread on images
        (n, H, W, C) into out (n, K, OH, OW); `spectra` are the bank's cached kernel spectra. Returns the
        engine that ran."""
        if engine == "auto":
            engine = choose_engine(images.shape[1:3], kernels.shape, self._threads, batch=images.shape[0])
        with self._computing():
            started = time.perf_counter()
            correlate_valid_batch(images, kernels, out, threads=self._threads, engine=engine, spectra=spectra)
            seconds = time.perf_counter() - started
        flops = 2.0 * out.size * kernels[0].size
        with self._lock:
            self._engines[engine] += 1
            if seconds >= RATE_MIN_SECONDS:  # a moving average: the rate the coordinator's cost model reads
                self._gflops = 0.8 * self._gflops + 0.2 * flops / seconds / 1e9
        return engine

    def _cached(self, blob_id: str) -> Blob | None:
        with self._lock:
            return self._blobs.get(blob_id)

    def _room_beside(self, blob: Blob) -> int:
        """Bytes the blob cache has room for beside `blob` (what its network's or bank's spectra may keep)."""
        return max(0, self._blobs.max_bytes - blob.nbytes)

    def _count_kept(self, blob_id: str, blob: Blob, kept_bytes: int) -> None:
        """Count what a network blob's built network keeps (its stages' spectra) in the blob cache's bytes
        while `blob_id` still holds `blob`, evicting the oldest blobs beyond the cache's bound."""
        with self._lock:
            evicted = self._blobs.resize(blob_id, blob, blob.nbytes + kept_bytes)
        if evicted:
            logger.debug("evicted %d blob(s) for the spectra of network %s", len(evicted), blob_id)

    @contextmanager
    def _reservation(self, nbytes: int, task_id: int) -> Iterator[None]:
        """Count a task's output against the memory budget while it is alive (refused before work)."""
        with self._lock:
            budget = self._config.memory_budget
            if self._reserved + nbytes > budget:
                # Over the budget on its own is the task's fault; beside other tasks' outputs it is a
                # busy worker (the caller runs the task again instead of failing its job).
                error = BudgetExceeded if nbytes > budget else WorkerBusy
                raise error(
                    f"task {task_id}: output of {nbytes} bytes exceeds the worker's memory budget "
                    f"({budget} bytes, {self._reserved} in use)"
                )
            self._reserved += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= nbytes


@cache
def _calibrate(threads: int) -> float:
    """A first engine rate (GFLOP/s) on `threads` threads, measured as the coordinator measures its own
    pool (~0.15 s, once per process); engine calls long enough to be representative refine it."""
    return float(measure_gflops(threads=threads))
