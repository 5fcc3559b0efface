"""The remote ConvolutionWorker (what the RMI skeleton serves): checks a task, runs the engine, delivers."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from Pyro5.api import behavior, expose

import rmidl
from rmidl.config import Config
from rmidl.errors import (
    BankError,
    BudgetExceeded,
    ClusterError,
    DTypeError,
    KernelTooLarge,
    NonFiniteInput,
    ShapeError,
    WorkerLost,
)
from rmidl.geometry import band_rows, halo
from rmidl.kernels import available_cores, choose_engine, correlate_valid, measure_gflops
from rmidl.remote.bulk import BulkServer
from rmidl.remote.contract import TaskDict, WireArray
from rmidl.remote.shm import SharedArray, host_id
from rmidl.remote.wire import pack, unpack, wire_nbytes
from rmidl.validate import check_engine

__all__ = ["ATTACHMENT_CACHE", "ConvolutionWorker", "HANG_ENV"]

logger = logging.getLogger(__name__)

ATTACHMENT_CACHE = 8
"""Shared-memory blocks a worker keeps mapped (a job uses two: padded input and output); their bytes are
bounded too, by the worker's memory budget."""
RATE_MIN_SECONDS = 0.02
"""Only engine calls at least this long refine the reported rate: shorter ones are mostly call overhead."""
REPLY_FRAMING = 512
"""Bytes an inline reply adds to its result (Pyro5 header and annotations, msgpack keys); the coordinator
leaves at least this much room when it sizes tasks."""
HANG_ENV = "RMIDL_TEST_HANG_TASKS"
"""Test-only hook: the first N correlate calls of a worker started with this set block until shutdown."""


def run_engine(band: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int, engine: str) -> None:
    """Valid correlation of band (H, W, C) with kernels (K, kh, kw, C) into out (K, OH, OW)."""
    correlate_valid(band, kernels, out, threads=threads, engine=engine)


@dataclass(frozen=True)
class _Plan:
    """A checked task: which bank slice, which input rows, where the result goes."""

    task_id: int
    kernels: np.ndarray  # (k1 - k0, kh, kw, C)
    k0: int
    rows: tuple[int, int]
    source: Any  # wire dict or shm descriptor
    source_kind: str  # "array" | "shm"
    output: Any  # "inline" | "bulk" | shm descriptor
    engine: str


@expose
@behavior(instance_mode="single")
class ConvolutionWorker:
    """Serves `rmidl.remote.contract.ConvolutionWorkerAPI`; one per daemon, safe for concurrent calls."""

    def __init__(
        self,
        *,
        name: str,
        config: Config,
        threads: int | None = None,
        host: str = "127.0.0.1",
        bulk: BulkServer | None = None,
        hang_tasks: int = 0,
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
        self._banks: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bank_bytes_limit = max(1, config.memory_budget // 4)
        self._attached: OrderedDict[str, SharedArray] = OrderedDict()
        self._reserved = 0
        self._tasks_done = 0
        self._engines: Counter[str] = Counter()
        self._busy = 0
        self._hangs_left = max(0, int(hang_tasks))
        self._gflops = _calibrate(self._threads)

    # --- the remote interface -------------------------------------------------------------------

    def ping(self) -> str:
        return "pong"

    def info(self) -> dict[str, Any]:
        self._prune_attachments()
        with self._lock:
            return {
                "name": self._name,
                "host": self._host,
                "hostname": socket.gethostname(),
                "host_id": host_id(),
                "pid": os.getpid(),
                "cores": available_cores(),
                "threads": self._threads,
                "version": rmidl.__version__,
                "gflops": round(self._gflops, 3),
                "tasks_done": self._tasks_done,
                "busy": self._busy,
                "engines": dict(self._engines),
                "banks": list(self._banks),
                "bulk_port": self._bulk.port if self._bulk else None,
                "shm_blocks": len(self._attached),
                "max_message_size": self._config.max_message_size,
                "memory_budget": self._config.memory_budget,
            }

    def put_bank(self, bank_id: str, bank: WireArray) -> None:
        bank_id = _check_bank_id(bank_id)
        nbytes = wire_nbytes(bank)
        if nbytes > self._bank_bytes_limit:
            raise BudgetExceeded(
                f"bank {bank_id!r} of {nbytes} bytes exceeds this worker's bank budget "
                f"of {self._bank_bytes_limit} bytes"
            )
        array = unpack(bank, max_bytes=self._config.max_message_size)
        if array.ndim != 4 or 0 in array.shape:
            raise ShapeError(f"bank {bank_id!r} must be a non-empty (K, kh, kw, C) array, not {array.shape}")
        if not np.isfinite(array).all():
            raise NonFiniteInput(f"bank {bank_id!r} contains NaN or Inf")
        with self._lock:
            self._banks.pop(bank_id, None)
            self._banks[bank_id] = array
            # LRU: the oldest banks go first, by count and by bytes (the new one always stays).
            while len(self._banks) > 1 and (
                len(self._banks) > self._config.bank_cache_size
                or sum(b.nbytes for b in self._banks.values()) > self._bank_bytes_limit
            ):
                evicted, _ = self._banks.popitem(last=False)
                logger.debug("evicted bank %s", evicted)

    def drop_bank(self, bank_id: str) -> bool:
        with self._lock:
            return self._banks.pop(str(bank_id), None) is not None

    def release_shm(self, names: list[str]) -> int:
        """Unmap the shared-memory blocks named (their owner is done with them); return how many were."""
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise ShapeError(f"release_shm takes a list of block names, not {names!r}")
        wanted = set(names)
        with self._lock:
            keys = [key for key, block in self._attached.items() if block.name in wanted]
            blocks = [self._attached.pop(key) for key in keys]
        for block in blocks:
            block.close()
        return len(blocks)

    def correlate(self, task: TaskDict) -> dict[str, Any]:
        started = time.perf_counter()
        with self._lock:
            self._busy += 1
            hang = self._hangs_left > 0
            self._hangs_left -= hang
        try:
            if hang:
                logger.warning("test hook %s: task %r hangs until shutdown", HANG_ENV, task.get("task_id"))
                self._stopping.wait()
                # A ClusterError, so a coordinator still waiting re-queues the task (an InputError would
                # fail its job); a real hang never answers at all.
                raise WorkerLost(f"worker {self._name} is shutting down (task {task.get('task_id')!r} hung)")
            plan = self._plan(task)
            reply = self._execute(plan)
        finally:
            with self._lock:
                self._busy -= 1
        seconds = time.perf_counter() - started
        with self._lock:
            self._tasks_done += 1
        reply.update(task_id=plan.task_id, seconds=seconds)
        return reply

    # --- local use ------------------------------------------------------------------------------

    def close(self) -> None:
        """Release hung calls and unmap every shared-memory block (the daemon calls this on shutdown)."""
        self._stopping.set()
        with self._lock:
            attached, self._attached = list(self._attached.values()), OrderedDict()
            self._banks.clear()
        for block in attached:
            block.close()

    # --- internals ------------------------------------------------------------------------------

    def _plan(self, task: TaskDict) -> _Plan:
        if not isinstance(task, dict):
            raise ShapeError(f"task must be a dict, got {type(task).__name__}")
        missing = {"task_id", "bank_id", "kernels", "rows", "input", "output"} - set(task)
        if missing:
            raise ShapeError(f"task is missing {', '.join(sorted(missing))}")
        task_id = _int(task["task_id"], "task_id")
        bank_id = _check_bank_id(task["bank_id"])
        with self._lock:
            bank = self._banks.get(bank_id)
            if bank is not None:
                self._banks.move_to_end(bank_id)
        if bank is None:
            raise BankError(f"bank {bank_id!r} is not cached on worker {self._name} (put it again)")
        k0, k1 = _pair(task["kernels"], "kernels")
        if not 0 <= k0 < k1 <= bank.shape[0]:
            n_bank = bank.shape[0]
            raise ShapeError(f"task {task_id}: kernels [{k0}, {k1}) outside bank {bank_id!r} of {n_bank}")
        r0, r1 = _pair(task["rows"], "rows")
        if not 0 <= r0 < r1:
            raise ShapeError(f"task {task_id}: rows [{r0}, {r1}) are empty or negative")
        source = task["input"]
        if not isinstance(source, dict) or len(source) != 1 or next(iter(source)) not in ("array", "shm"):
            raise ShapeError(f"task {task_id}: input must be {{'array': ...}} or {{'shm': ...}}")
        kind, value = next(iter(source.items()))
        output = task["output"]
        if output not in ("inline", "bulk") and not (isinstance(output, dict) and set(output) == {"shm"}):
            raise ShapeError(f"task {task_id}: output {output!r} is not 'inline', 'bulk' or {{'shm': ...}}")
        if output == "bulk" and self._bulk is None:
            raise ShapeError(f"task {task_id}: worker {self._name} has no bulk channel")
        engine = check_engine(task.get("engine", "auto"))
        return _Plan(task_id, bank[k0:k1], k0, (r0, r1), value, kind, output, engine)

    def _execute(self, plan: _Plan) -> dict[str, Any]:
        kernels = plan.kernels
        n_k, kh, kw, channels = kernels.shape
        r0, r1 = plan.rows
        first, last = band_rows(plan.rows, kh)
        if plan.source_kind == "array":
            band = unpack(plan.source, max_bytes=self._config.max_message_size)
            if band.ndim != 3 or band.shape[0] != last - first:
                raise ShapeError(
                    f"task {plan.task_id}: input band shape {band.shape} does not hold rows "
                    f"[{r0}, {r1}) plus a halo of {halo(kh)} (expected {last - first} rows)"
                )
        else:
            image = self._attach(plan.source)
            if image.ndim != 3 or last > image.shape[0]:
                raise ShapeError(
                    f"task {plan.task_id}: rows [{r0}, {r1}) with kernel height {kh} exceed the shared image "
                    f"of shape {image.shape}"
                )
            band = image[first:last]
        if band.shape[2] != channels:
            raise ShapeError(f"task {plan.task_id}: input has {band.shape[2]} channel(s), kernels {channels}")
        if band.dtype != kernels.dtype:
            raise DTypeError(f"task {plan.task_id}: input is {band.dtype} but bank is {kernels.dtype}")
        if kw > band.shape[1]:
            raise KernelTooLarge(f"kernel {kh}x{kw} does not fit input band {band.shape[0]}x{band.shape[1]}")
        out_shape = (n_k, r1 - r0, band.shape[1] - kw + 1)
        if isinstance(plan.output, dict):
            target = self._attach(plan.output["shm"])
            k1 = plan.k0 + n_k
            fits = target.ndim == 3 and target.shape[2] == out_shape[2]
            if not fits or k1 > target.shape[0] or r1 > target.shape[1]:
                raise ShapeError(
                    f"task {plan.task_id}: output block of shape {target.shape} cannot hold kernels "
                    f"[{plan.k0}, {k1}) x rows [{r0}, {r1}) x {out_shape[2]} columns"
                )
            if target.dtype != kernels.dtype:
                raise DTypeError(f"task {plan.task_id}: output is {target.dtype} but bank is {kernels.dtype}")
            self._compute_into(band, kernels, target[plan.k0 : k1, r0:r1, :], plan.engine)
            return {}
        nbytes = int(np.prod(out_shape)) * kernels.itemsize
        if plan.output == "inline" and nbytes + REPLY_FRAMING > self._config.max_message_size:
            # Pyro5 would refuse the reply after the work and drop the connection: say why, before it.
            raise BudgetExceeded(
                f"task {plan.task_id}: inline result of {nbytes} bytes does not fit this worker's "
                f"max_message_size of {self._config.max_message_size} bytes (use 'bulk' or 'shm' output)"
            )
        with self._reservation(nbytes, plan.task_id):
            result = np.empty(out_shape, kernels.dtype)
            self._compute_into(band, kernels, result, plan.engine)
            if plan.output == "inline":
                return {"result": pack(result)}
            assert self._bulk is not None
            ticket = self._bulk.offer(result)
            return {"ticket": ticket, "nbytes": nbytes, "shape": list(out_shape), "dtype": result.dtype.name}

    def _compute_into(self, band: np.ndarray, kernels: np.ndarray, out: np.ndarray, engine: str) -> None:
        if engine == "auto":  # resolved here, so that info() can say which engine ran
            engine = choose_engine(band.shape[:2], kernels.shape, self._threads)
        with self._compute:
            started = time.perf_counter()
            run_engine(band, kernels, out, self._threads, engine)
            seconds = time.perf_counter() - started
        with self._lock:
            self._engines[engine] += 1
        flops = 2.0 * out.size * kernels[0].size
        if seconds >= RATE_MIN_SECONDS:
            with self._lock:  # a moving average: the rate the coordinator's cost model reads in info()
                self._gflops = 0.8 * self._gflops + 0.2 * flops / seconds / 1e9

    @contextmanager
    def _reservation(self, nbytes: int, task_id: int) -> Iterator[None]:
        """Count a task's output against the memory budget while it is alive (refused before work)."""
        with self._lock:
            budget = self._config.memory_budget
            if self._reserved + nbytes > budget:
                # Over the budget on its own is the task's fault; beside other tasks' outputs it is a
                # busy worker (ClusterError: the caller runs the task again instead of failing its job).
                error = BudgetExceeded if nbytes > budget else ClusterError
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

    def _attach(self, descriptor: dict[str, Any]) -> np.ndarray:
        """The array of a shared block, mapped once and cached; taken under the lock, so a later eviction
        cannot close it under the caller (the view keeps the mapping alive)."""
        if not isinstance(descriptor, dict):
            raise ShapeError(f"shared memory descriptor must be a dict, got {type(descriptor).__name__}")
        key = f"{descriptor.get('name')}|{descriptor.get('shape')}|{descriptor.get('dtype')}"
        with self._lock:
            block = self._attached.get(key)
            if block is not None:
                self._attached.move_to_end(key)
                return block.array
        self._prune_attachments()
        block = SharedArray.attach(descriptor)
        with self._lock:
            self._attached[key] = block
            array = block.array
            # Old blocks belong to finished jobs (and pin their memory while mapped, even once unlinked),
            # so the cache is bounded by count and by bytes; a task still using an evicted block keeps
            # its views (close() defers). The newest two (a job's input and output) always stay.
            evicted = []
            while len(self._attached) > 2 and (
                len(self._attached) > ATTACHMENT_CACHE
                or sum(b.array.nbytes for b in self._attached.values()) > self._config.memory_budget
            ):
                evicted.append(self._attached.popitem(last=False)[1])
        for old in evicted:
            old.close()
        return array

    def _prune_attachments(self) -> None:
        """Unmap blocks their owner has unlinked: a finished job's memory is freed only when we let go."""
        with self._lock:
            gone = [key for key, block in self._attached.items() if not block.exists()]
            blocks = [self._attached.pop(key) for key in gone]
        for block in blocks:
            block.close()


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ShapeError(f"{what} must be an int, got {value!r}")
    return value


def _pair(value: Any, what: str) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ShapeError(f"{what} must be [start, stop], got {value!r}")
    return _int(value[0], what), _int(value[1], what)


def _check_bank_id(bank_id: Any) -> str:
    if not isinstance(bank_id, str) or not 0 < len(bank_id) <= 200:
        raise BankError(f"bank id {bank_id!r} must be a non-empty string of at most 200 characters")
    return bank_id


@cache
def _calibrate(threads: int) -> float:
    """A first engine rate (GFLOP/s) on `threads` threads, measured as the coordinator measures its own
    pool (~0.15 s, once per process); engine calls long enough to be representative refine it."""
    return float(measure_gflops(threads=threads))
