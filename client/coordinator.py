"""The Coordinator (the RMI stub side): rmidl.correlate over the local pool and the workers in a registry."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import numpy as np

from rmidl.config import Config
from rmidl.errors import BudgetExceeded, OptionError, WorkerNotFound
from rmidl.geometry import max_band_rows, pad_for_mode
from rmidl.kernels import available_cores
from rmidl.validate import check_engine, check_out, check_threads, prepare

from .planning import plan
from .scheduler import Job, Scheduler

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)


class Coordinator:
    """Runs correlations as tasks on its own thread pool and on the ConvolutionWorkers of a name server.

    `ns="HOST:PORT"` finds workers by their registration (and keeps looking during a job); `ns=None`
    uses the local pool alone. `workers` chooses among the registered workers: None takes all (and those
    registering later), a list of names only those, an int N the first N in name order (fixed at
    construction); a name or count the name server cannot supply is a WorkerNotFound before any work.
    `local_threads=None` means every core without a name server and none with one (workers on this
    machine already use its cores). With `shared_memory=True`, workers on this host read the image from
    and write their results into shared memory; the others get their input inline and send results
    over the bulk side channel (or inline).
    """

    def __init__(
        self,
        ns: str | None = None,
        local_threads: int | None = None,
        shared_memory: bool = True,
        config: Config | None = None,
        *,
        min_tasks: int = 1,
        workers: Sequence[str] | int | None = None,
    ) -> None:
        if local_threads is not None and (
            isinstance(local_threads, bool) or not isinstance(local_threads, int) or local_threads < 0
        ):
            raise OptionError(f"local_threads={local_threads!r} must be a non-negative integer")
        if local_threads is None:
            local_threads = 0 if ns is not None else available_cores()
        if ns is None and local_threads == 0:
            raise OptionError("local_threads=0 without a name server leaves nobody to do the work")
        selection = _check_selection(workers)
        if selection is not None and ns is None:
            raise OptionError(f"workers={workers!r} chooses among registered workers: it needs a name server")
        if selection == 0 and local_threads == 0:
            raise OptionError("workers=0 with local_threads=0 leaves nobody to do the work")
        self.config = config or Config()
        self.ns_address = ns
        self.local_threads = local_threads
        self.shared_memory = shared_memory
        self.min_tasks = max(1, int(min_tasks))
        self._ns: Any = None
        self._ns_lock = threading.Lock()
        self._last: dict[str, Any] = {}
        self._shared = _SharedPool(self._release_shm)
        remote = ns is not None
        self._scheduler = Scheduler(self.config, local_threads=local_threads,
                                    registry=self._list if remote else None,
                                    unregister=self._remove if remote else None)
        if ns is not None:
            try:
                self._connect(ns, selection)
            except BaseException:
                self.close()
                raise

    # -- life cycle ----------------------------------------------------------------------------------
    def _connect(self, ns: str, selection: list[str] | int | None) -> None:
        from rmidl.remote.transport import configure_pyro, connect_ns

        configure_pyro(self.config)
        self._ns = connect_ns(ns, self.config)
        if selection is not None:
            self._scheduler.only = frozenset(_choose(selection, sorted(self._list()), ns))
        self._scheduler.discover()

    def _list(self) -> dict[str, str]:
        from rmidl.remote.naming import list_workers

        with self._ns_lock:
            self._ns._pyroClaimOwnership()
            return list_workers(self._ns)

    def _remove(self, name: str) -> None:
        from rmidl.remote.naming import unregister_worker

        with self._ns_lock:
            self._ns._pyroClaimOwnership()
            unregister_worker(self._ns, name)

    def close(self) -> None:
        """Close every shared block (telling workers to unmap them) and every proxy (workers keep running)."""
        self._shared.close()
        self._scheduler.close()
        if self._ns is not None:
            with self._ns_lock:
                self._ns._pyroClaimOwnership()
                self._ns._pyroRelease()
            self._ns = None

    def _release_shm(self, names: list[str]) -> None:
        """Ask same-host workers to unmap blocks we closed: until every mapping goes, their memory stays."""
        for worker in self._scheduler.usable_workers():
            if not worker.same_host:
                continue
            try:
                with worker.proxy() as proxy:
                    proxy._pyroTimeout = self.config.connect_timeout
                    proxy.release_shm(names)
            except Exception as error:  # the worker unmaps them later anyway (count/bytes bound, pruning)
                log.debug("worker %s could not release %s: %r", worker.name, names, error)

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- what it knows -------------------------------------------------------------------------------
    def workers(self) -> list[dict[str, Any]]:
        """The remote workers found so far: name, uri, host, cores, threads, gflops, same_host, state."""
        if self._ns is not None:
            self._scheduler.discover()
        rows = []
        for worker in self._scheduler.workers.values():
            info = worker.info
            rows.append({
                "name": worker.name,
                "uri": worker.uri,
                "host": info.get("host", worker.host),
                "cores": info.get("cores"),
                "threads": info.get("threads"),
                "gflops": info.get("gflops"),
                "same_host": worker.same_host,
                "state": worker.state,
            })
        return rows

    def stats(self) -> dict[str, int]:
        """Tasks each worker ran in the last job ("local" is this process's pool)."""
        return dict(self._last.get("tasks_by", {}))

    def last_job(self) -> dict[str, Any]:
        """The last job's figures: tasks, tasks_by, requeued, band, group, flops, shared_memory, and the
        result bytes fetched over TCP (moved_bytes) and the seconds spent receiving them (moving_seconds)."""
        return dict(self._last)

    # -- the API of rmidl.correlate --------------------------------------------------------------------
    def correlate(
        self,
        image: object,
        kernels: object,
        *,
        mode: str = "valid",
        threads: int | None = None,
        engine: str = "auto",
        out: np.ndarray | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Same arguments and result as `rmidl.correlate`; `threads` overrides local_threads for this call,
        `progress(done, total)` is called as tasks finish."""
        return self._run(image, kernels, mode=mode, threads=threads, engine=engine, out=out,
                         progress=progress, flip=False)

    def convolve(
        self,
        image: object,
        kernels: object,
        *,
        mode: str = "valid",
        threads: int | None = None,
        engine: str = "auto",
        out: np.ndarray | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> np.ndarray:
        """Same as `rmidl.convolve`: correlation with every kernel flipped in both spatial axes."""
        return self._run(image, kernels, mode=mode, threads=threads, engine=engine, out=out,
                         progress=progress, flip=True)

    def _run(
        self,
        image: object,
        kernels: object,
        *,
        mode: str,
        threads: int | None,
        engine: str,
        out: np.ndarray | None,
        progress: Callable[[int, int], None] | None,
        flip: bool,
    ) -> np.ndarray:
        # Every option first: nothing below (padding, discovery, calibration, shared memory) is wasted on
        # a job that cannot run, and workers get only names they know.
        engine = check_engine(engine)
        local = self.local_threads if threads is None else int(check_threads(threads) or 0)
        if progress is not None and not callable(progress):
            raise OptionError(f"progress={progress!r} must be a callable (done, total) or None")
        p = prepare(image, kernels, mode)
        if flip:
            p = p.flipped()
        shape = p.out_shape
        nbytes = int(np.prod(shape)) * p.dtype.itemsize
        if nbytes > self.config.memory_budget:
            raise BudgetExceeded(
                f"output {shape[0]}x{shape[1]}x{shape[2]} {p.dtype.name} needs {nbytes / 2**20:.0f} MiB, "
                f"over the memory budget of {self.config.memory_budget / 2**20:.0f} MiB"
            )
        if out is not None:
            out = check_out(out, shape, p.dtype)
        padded = pad_for_mode(p.image, p.kernels.shape[1:3], p.mode)
        scheduler = self._scheduler
        if self._ns is not None:
            scheduler.discover()
        remote_shm = self.shared_memory and any(
            w.same_host for w in scheduler.usable_workers()
        )
        capacities = scheduler.capacities(local)
        itemsize = p.dtype.itemsize
        max_task, max_rows, limit = self._message_limits(padded, p.kernels.shape, remote_shm)
        job_plan = plan(shape, p.kernels.shape, capacities, itemsize=itemsize, max_task_bytes=max_task,
                        max_band_rows=max_rows, min_tasks=self.min_tasks)
        def reusable() -> bool:
            return all(w.state != "quarantined" for w in scheduler.workers.values())

        with _job_buffers(
            self._shared, padded, shape, p.dtype, out=out, shm=remote_shm, reusable=reusable
        ) as (result, shm_in, shm_out):
            job = Job(padded, p.kernels, result, job_plan.tasks,
                      max_attempts=self.config.max_task_attempts, engine=engine, progress=progress)
            job.message_limit = limit
            if shm_in is not None and shm_out is not None:
                job.shm_input, job.shm_output = shm_in.descriptor(), shm_out.descriptor()
                job.shm_out_array = shm_out.array
            try:
                scheduler.run(job, local_threads=local, shm=shm_out is not None)
            finally:
                self._last = {
                    "tasks": job.total,
                    "tasks_by": dict(job.tasks_by),
                    "requeued": job.requeued,
                    "band": job_plan.band,
                    "group": job_plan.group,
                    "flops": job_plan.flops,
                    "shared_memory": shm_out is not None,
                    "moved_bytes": job.moved_bytes,
                    "moving_seconds": job.moving_seconds,
                }
        return result

    def _message_limits(self, padded: np.ndarray, kernel_shape: tuple[int, ...],
                        remote_shm: bool) -> tuple[int, int | None, int]:
        """Largest result (bytes) and band (output rows) per task, so that every request and inline reply
        fits under the smallest max_message_size of this process and of the workers taking arrays over TCP
        (a bigger message is refused and the task could never succeed); and that smallest size."""
        tcp = [w for w in self._scheduler.usable_workers() if not (remote_shm and w.same_host)]
        smallest = min([self.config.max_message_size]
                       + [int(w.info.get("max_message_size") or self.config.max_message_size) for w in tcp])
        # Room for the rest of the message: Pyro5's header, the task's other fields, msgpack framing.
        limit = smallest - min(64 << 10, smallest // 8)
        max_task = min(64 << 20, self.config.max_message_size // 2, limit)
        if not tcp:
            return max_task, None, smallest
        row_bytes = padded.shape[1] * (padded.shape[2] if padded.ndim == 3 else 1) * padded.itemsize
        rows = max_band_rows(limit, row_bytes, int(kernel_shape[1]))
        if rows < 1:
            raise BudgetExceeded(
                f"one output row needs an input band of {int(kernel_shape[1])} rows x {row_bytes} bytes, "
                f"over the smallest worker message limit of {limit} bytes (raise max_message_size)"
            )
        return max_task, rows, smallest


def _check_selection(workers: object) -> list[str] | int | None:
    """The `workers` argument as None, a count or a list of names; OptionError for anything else."""
    if workers is None:
        return None
    if isinstance(workers, int) and not isinstance(workers, bool):
        if workers < 0:
            raise OptionError(f"workers={workers!r} must be a non-negative count or a list of names")
        return workers
    # A bare string is a Sequence too: refuse it, or "w1" would mean the workers "w" and "1".
    if isinstance(workers, (str, bytes)) or not isinstance(workers, Sequence):
        raise OptionError(f"workers={workers!r} must be a list of worker names, a count or None")
    names = list(workers)
    if not names:
        raise OptionError("workers=[] names no worker (None means all of them)")
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise OptionError(f"workers={workers!r}: {bad[0]!r} is not a worker name")
    return names


def _choose(selection: list[str] | int, registered: list[str], ns: str) -> list[str]:
    """The names `selection` picks out of the sorted `registered` ones; WorkerNotFound if it cannot."""
    known = ", ".join(registered) or "none"
    if isinstance(selection, int):
        if selection > len(registered):
            raise WorkerNotFound(f"workers={selection} but {len(registered)} registered at {ns}: {known}")
        return registered[:selection]
    missing = [name for name in selection if name not in registered]
    if missing:
        which = ", ".join(map(repr, missing))
        raise WorkerNotFound(f"no worker{'s' if len(missing) > 1 else ''} {which} registered at {ns} "
                             f"(registered: {known})")
    return selection


class _SharedPool:
    """Shared-memory blocks kept from one job to the next (one per role: input, output).

    Fresh tmpfs pages cost ~3x anonymous ones to fault in (0.6 s for the reference job's 462 MB on the
    dev VM), and workers keep a reused block mapped; so same-host workers write into a warm block and
    the coordinator copies each finished task's part into the caller's (anonymous) result.
    """

    def __init__(self, released: Callable[[list[str]], None]) -> None:
        self._free: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._released = released
        """Told the names of blocks once closed, so that workers unmap them too."""

    def take(self, role: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        from rmidl.remote.shm import SharedArray

        with self._lock:
            block = self._free.pop(role, None)
        if block is not None and block.shape == tuple(shape) and block.dtype == np.dtype(dtype).name:
            return block
        if block is not None:
            self._close([block])
        return SharedArray.create(shape, dtype)

    def give(self, role: str, block: Any, *, reusable: bool) -> None:
        """Keep `block` for the next job, or close it (after a failure or a hung worker, calls may still
        be writing into it)."""
        if reusable:
            with self._lock:
                block, self._free[role] = self._free.get(role), block
        if block is not None:
            self._close([block])

    def close(self) -> None:
        with self._lock:
            blocks, self._free = list(self._free.values()), {}
        self._close(blocks)

    def _close(self, blocks: list[Any]) -> None:
        for block in blocks:
            block.close()
        if blocks:
            self._released([block.name for block in blocks])


@contextmanager
def _job_buffers(
    pool: _SharedPool, padded: np.ndarray, shape: tuple[int, int, int], dtype: np.dtype, *,
    out: np.ndarray | None, shm: bool, reusable: Callable[[], bool],
) -> Iterator[tuple[np.ndarray, Any, Any]]:
    """Yield (result, shared input, shared output); shared blocks only when same-host workers take part."""
    result = np.empty(shape, dtype) if out is None else out
    if not shm:
        yield result, None, None
        return
    shared_in = pool.take("input", padded.shape, padded.dtype)
    shared_out = None
    ok = False
    try:
        shared_out = pool.take("output", shape, dtype)
        shared_in.array[...] = padded
        yield result, shared_in, shared_out
        ok = True
    finally:
        keep = ok and reusable()
        pool.give("input", shared_in, reusable=keep)
        if shared_out is not None:
            pool.give("output", shared_out, reusable=keep)
