"""One pull queue per job: local pool threads and per-worker remote threads take tasks from it; retries."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rmidl.config import Config
from rmidl.errors import BankError, InputError, RmidlError, TaskFailed, WorkerLost
from rmidl.geometry import Task, band_rows

from .cost import (
    BULK_BYTES_PER_S,
    INLINE_BYTES_PER_S,
    ROUND_TRIP_S,
    Capacity,
    TaskCost,
    deadline,
    local_gflops,
)

__all__ = ["LOCAL", "Job", "RemoteWorker", "Scheduler"]

log = logging.getLogger(__name__)

LOCAL = "local"
"""Runner name of the coordinator's own thread pool (one worker, for retry bookkeeping)."""


def _describe(task: Task) -> str:
    (r0, r1), (k0, k1) = task.rows, task.kernels
    return f"task {task.task_id} (rows {r0}:{r1}, kernels {k0}:{k1})"


def _correlate_valid(image: np.ndarray, kernels: np.ndarray, out: np.ndarray, engine: str) -> None:
    """The engine's no-checks valid correlation on one thread (local pool threads are the parallelism)."""
    from rmidl.kernels import correlate_valid

    correlate_valid(image, kernels, out, threads=1, engine=engine)


class Job:
    """The pull queue of one job and its bookkeeping: who holds which task, who failed which task."""

    def __init__(
        self,
        image: np.ndarray,
        kernels: np.ndarray,
        out: np.ndarray,
        tasks: Sequence[Task],
        *,
        max_attempts: int,
        engine: str = "auto",
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.image, self.kernels, self.out = image, kernels, out
        from rmidl.remote.contract import Blob

        self.bank = Blob.bank(kernels)
        self.bank_id = self.bank.content_id
        self.engine = engine
        self.max_attempts = max(1, max_attempts)
        self.shm_input: dict[str, Any] | None = None
        self.shm_output: dict[str, Any] | None = None
        self.shm_out_array: np.ndarray | None = None
        """The shared output block same-host workers write into; each task's part is copied to `out`."""
        self.message_limit: int | None = None
        """The max_message_size the tasks were sized for: a worker taking arrays over TCP needs as much."""
        self.total = len(tasks)
        self.done = 0
        self.requeued = 0
        self.tasks_by: Counter[str] = Counter()
        self.moved_bytes = 0
        self.moving_seconds = 0.0
        self.error: BaseException | None = None
        self._pending: deque[Task] = deque(tasks)
        self._holding: dict[int, str] = {}
        self._failed_on: dict[int, dict[str, str]] = {}
        self._runners: Counter[str] = Counter()
        self._gone: set[str] = set()
        self._progress = progress
        self._cond = threading.Condition()

    @property
    def finished(self) -> bool:
        return self.error is not None or self.done == self.total

    def band(self, task: Task) -> np.ndarray:
        """Input rows the task needs (its output rows plus the kernel's halo): a contiguous view."""
        return self.image[slice(*band_rows(task.rows, self.kernels.shape[1]))]

    def cost(self, task: Task) -> TaskCost:
        """The task's flops and the bytes of its input band and of its result (for its deadline)."""
        _, kh, kw, channels = self.kernels.shape
        out_elements = task.out_elements(self.out.shape[2])
        return TaskCost(flops=2.0 * kh * kw * channels * out_elements,
                        input_bytes=self.band(task).nbytes, result_bytes=out_elements * self.out.itemsize)

    def out_view(self, task: Task) -> np.ndarray:
        return self.out[task.kernels[0] : task.kernels[1], task.rows[0] : task.rows[1], :]

    # -- runners come and go -------------------------------------------------------------------------
    def enter(self, runner: str) -> None:
        """Count one more thread of `runner` (call before starting it, so the job never looks orphaned)."""
        with self._cond:
            self._runners[runner] += 1

    def leave(self, runner: str) -> None:
        with self._cond:
            self._runners[runner] -= 1
            if self._runners[runner] <= 0:
                del self._runners[runner]
            self._check_starved()
            self._cond.notify_all()

    def runners(self) -> set[str]:
        with self._cond:
            return set(self._runners)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- the queue ------------------------------------------------------------------------------------
    def take(self, runner: str, usable: Callable[[], bool] = lambda: True) -> Task | None:
        """Block until a task `runner` has not failed on is pending; None once the job is over for it."""
        with self._cond:
            while True:
                if self.finished or not usable():
                    return None
                for i, task in enumerate(self._pending):
                    if runner not in self._failed_on.get(task.task_id, {}):
                        del self._pending[i]
                        self._holding[task.task_id] = runner
                        return task
                self._cond.wait()

    def complete(self, runner: str, task: Task) -> None:
        with self._cond:
            self._holding.pop(task.task_id, None)
            self.done += 1
            self.tasks_by[runner] += 1
            done = self.done
            self._cond.notify_all()
        if self._progress is not None:
            try:
                self._progress(done, self.total)
            except Exception as error:  # a broken progress display must not lose the job
                log.warning("progress callback failed (%r); not calling it again", error)
                self._progress = None

    def retry(self, runner: str, task: Task, error: BaseException, *, runner_gone: bool = False) -> None:
        """Put a failed task back; fail the job once it has failed on max_attempts different workers.
        `runner_gone`: the runner died or hangs, so it no longer counts as someone who may run work."""
        with self._cond:
            if runner_gone:
                self._gone.add(runner)
            self._holding.pop(task.task_id, None)
            failures = self._failed_on.setdefault(task.task_id, {})
            failures[runner] = f"{type(error).__name__}: {error}"
            if len(failures) >= self.max_attempts:
                self._fail(TaskFailed(self._failure_message(task, failures)))
            else:
                self._pending.appendleft(task)
                self.requeued += 1
                self._check_starved()
            self._cond.notify_all()

    def moved(self, nbytes: int, seconds: float) -> None:
        """Account result bytes that crossed the data plane (bulk or inline), for MB/s figures."""
        with self._cond:
            self.moved_bytes += nbytes
            self.moving_seconds += seconds

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._fail(error)
            self._cond.notify_all()

    def wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` s for the job to finish (all tasks done, or failed); True if it has."""
        with self._cond:
            self._cond.wait_for(lambda: self.finished, timeout)
            return self.finished

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error

    def _failure_message(self, task: Task, failures: dict[str, str]) -> str:
        where = "; ".join(f"{name}: {why}" for name, why in failures.items())
        return f"{_describe(task)} failed on {len(failures)} worker(s): {where}"

    def _check_starved(self) -> None:
        """Fail now rather than wait forever when nobody is left who may run the pending work."""
        if self.finished:
            return
        active = set(self._runners) - self._gone
        if not active:
            self._fail(WorkerLost(
                f"every worker is gone with {self.total - self.done} of {self.total} tasks unfinished "
                "and there is no local pool (local_threads=0) to finish them"
            ))
            return
        for task in self._pending:
            failures = self._failed_on.get(task.task_id, {})
            if failures and active <= set(failures):
                self._fail(TaskFailed(self._failure_message(task, failures) + "; no other worker is left"))
                return


@dataclass
class RemoteWorker:
    """What the coordinator knows about one remote worker, kept across jobs: proxies, banks, health."""

    name: str
    uri: str
    config: Config
    info: dict[str, Any] = field(default_factory=dict)
    round_trip_s: float = ROUND_TRIP_S
    same_host: bool = False
    state: str = "ok"  # ok | dead | quarantined
    banks: set[str] = field(default_factory=set)
    in_flight: int = 0
    """Tasks of this process's jobs running on it now (jobs of one coordinator may run concurrently)."""
    _idle: list[Any] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ssl: Any = None

    @property
    def host(self) -> str:
        from Pyro5.core import URI

        return str(URI(self.uri).host)

    @property
    def usable(self) -> bool:
        return self.state == "ok"

    def capacity(self) -> Capacity:
        threads = int(self.info.get("threads") or self.info.get("cores") or 1)
        # Workers report the engine's measured rate on their threads; an old one without it counts as
        # this machine's single-thread rate per thread.
        gflops = float(self.info.get("gflops") or 0.0) or local_gflops() * threads
        if self.same_host:
            rate = None
        elif self.info.get("bulk_port"):
            rate = BULK_BYTES_PER_S
        else:
            rate = INLINE_BYTES_PER_S
        return Capacity(self.name, gflops, threads, self.round_trip_s, rate)

    def connect(self) -> Any:
        from rmidl.remote.transport import worker_proxy

        proxy = worker_proxy(self.uri, self.config)
        proxy._pyroTimeout = self.config.connect_timeout
        return proxy

    @contextmanager
    def proxy(self) -> Iterator[Any]:
        """A proxy owned by the calling thread; returned to the pool unless the call broke it."""
        with self._lock:
            proxy = self._idle.pop() if self._idle else None
        if proxy is None:
            proxy = self.connect()
        proxy._pyroClaimOwnership()
        try:
            yield proxy
        except BaseException:
            # After a timeout or a dropped connection the stream is in an unknown state: never reuse it.
            proxy._pyroRelease()
            raise
        with self._lock:
            self._idle.append(proxy)

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count a task in flight on this worker while the block runs."""
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def probe(self) -> None:
        """Fetch info() and time a ping on a fresh connection (raises Pyro5 errors if unreachable)."""
        with self.proxy() as proxy:
            self.info = dict(proxy.info())
            trips = []
            for _ in range(3):  # the least of a few: one round trip on a busy machine is mostly noise
                start = time.perf_counter()
                proxy.ping()
                trips.append(time.perf_counter() - start)
            self.round_trip_s = max(1e-4, min(trips))

    def alive(self) -> bool:
        """True if the worker answers a ping on a new connection within connect_timeout."""
        try:
            proxy = self.connect()
        except Exception:
            return False
        try:
            with proxy:
                return proxy.ping() == "pong"
        except Exception:
            return False

    def mark(self, state: str) -> bool:
        """Move out of "ok"; True only for the first caller (so the warning is logged once)."""
        with self._lock:
            if self.state != "ok":
                return False
            self.state = state
            return True

    def ensure_bank(self, proxy: Any, job: Job, *, force: bool = False) -> None:
        if force:
            self.banks.discard(job.bank_id)
        if job.bank_id in self.banks:
            return
        proxy._pyroTimeout = max(self.config.connect_timeout, self.config.task_deadline_floor)
        proxy.put_blob(job.bank_id, job.bank.to_wire())
        self.banks.add(job.bank_id)

    def bulk_ssl_context(self) -> Any:
        """The client TLS context the worker's bulk channel expects (2-way TLS), or None; made once."""
        from rmidl.remote.transport import client_ssl_context, tls_enabled

        if self._ssl is None and tls_enabled(self.config):
            self._ssl = client_ssl_context(self.config)
        return self._ssl

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for proxy in idle:
            proxy._pyroClaimOwnership()
            proxy._pyroRelease()


class Scheduler:
    """Runs jobs on the local pool and the remote workers it knows, discovering new ones as they appear.

    Each remote worker gets `config.tasks_in_flight` threads, each with its own proxy: Pyro5 calls are
    synchronous (no async proxies in Pyro5), so one thread per task in flight is how a worker computes
    one task while the next one's bytes travel.
    """

    def __init__(
        self,
        config: Config,
        *,
        local_threads: int,
        registry: Callable[[], dict[str, str]] | None = None,
        unregister: Callable[[str], None] | None = None,
        poll_interval: float = 0.5,
        only: Collection[str] | None = None,
    ) -> None:
        self.config = config
        self.local_threads = local_threads
        self.workers: dict[str, RemoteWorker] = {}
        self.only: frozenset[str] | None = None if only is None else frozenset(only)
        """The only worker names discovery takes (None: every registered one, also those joining later)."""
        self._registry = registry
        self._unregister = unregister
        self._poll_interval = poll_interval
        self._host_id: str | None = None
        self._discover_lock = threading.Lock()

    # -- discovery -----------------------------------------------------------------------------------
    def discover(self) -> list[RemoteWorker]:
        """Add workers registered since the last look (probing each); return the new usable ones."""
        if self._registry is None:
            return []
        with self._discover_lock:  # jobs of one coordinator may run in several threads
            return self._discover()

    def _discover(self) -> list[RemoteWorker]:
        assert self._registry is not None
        try:
            found = self._registry()
        except Exception as error:  # a name server blip mid-job must not fail the job
            log.debug("name server poll failed: %s", error)
            return []
        fresh = []
        for short, uri in found.items():
            if self.only is not None and short not in self.only:
                continue  # not chosen for this coordinator: never probed, never given a task
            known = self.workers.get(short)
            if known is not None and known.uri == uri:
                continue
            worker = RemoteWorker(short, uri, self.config)
            try:
                worker.probe()
            except Exception as error:
                log.warning("worker %s at %s does not answer (%s); dropping it", short, uri, error)
                self._drop_registration(short)
                continue
            worker.same_host = worker.info.get("host_id") == self.host_id()
            if known is not None:
                known.close()
            self.workers[short] = worker
            fresh.append(worker)
            log.debug("found worker %s (%s)", short, worker.info)
        return fresh

    def host_id(self) -> str:
        if self._host_id is None:
            from rmidl.remote.shm import host_id

            self._host_id = host_id()
        return self._host_id

    def usable_workers(self) -> list[RemoteWorker]:
        return [w for w in self.workers.values() if w.usable]

    def capacities(self, local_threads: int) -> list[Capacity]:
        # Calibrating costs ~0.1 s of engine work: only for a job with a local pool.
        local = [Capacity(LOCAL, local_gflops())] * local_threads if local_threads else []
        return local + [w.capacity() for w in self.usable_workers()]

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()

    def _drop_registration(self, name: str) -> None:
        if self._unregister is None:
            return
        try:
            self._unregister(name)
        except Exception as error:
            log.debug("could not unregister %s: %s", name, error)

    # -- running a job ---------------------------------------------------------------------------------
    def run(self, job: Job, *, local_threads: int | None = None, shm: bool = True) -> None:
        """Run every task of `job` (raises the job's error); the caller set up job.shm_* when useful.

        The engine pins BLAS to one thread around each local task itself (cheap since it holds in any
        thread), so local pool threads never multiply with BLAS threads.
        """
        threads: list[threading.Thread] = []
        local = self.local_threads if local_threads is None else local_threads
        started: set[str] = set()

        def runners(workers: Sequence[RemoteWorker]) -> list[tuple[str, threading.Thread]]:
            # The thread started first takes a one-task job: start the least busy worker's first, ties in
            # random order, or every small job of every coordinator lands on the same worker.
            order = sorted(workers, key=lambda w: (w.in_flight, random.random()))
            made = []
            for worker in order:
                if worker.name in started or not worker.usable:
                    continue
                started.add(worker.name)
                use_shm = shm and worker.same_host and job.shm_out_array is not None
                limit = int(worker.info.get("max_message_size") or 0)
                if not use_shm and job.message_limit and 0 < limit < job.message_limit:
                    # It joined after the plan and would refuse these tasks' messages; next job it counts.
                    log.debug("worker %s (max_message_size %d) sits out a job sized for %d",
                              worker.name, limit, job.message_limit)
                    continue
                for slot in range(max(1, self.config.tasks_in_flight)):
                    thread = threading.Thread(target=self._remote_loop, args=(job, worker, use_shm),
                                              name=f"rmidl-{worker.name}-{slot}", daemon=True)
                    made.append((worker.name, thread))
            return made

        def launch(made: list[tuple[str, threading.Thread]]) -> None:
            # Every runner is counted before any starts: a task failing at once on the first one must not
            # look as if nobody else could take it.
            for runner, _ in made:
                job.enter(runner)
            for _, thread in made:
                thread.start()
                threads.append(thread)

        local_made = [
            (LOCAL, threading.Thread(target=self._local_loop, args=(job,), name=f"rmidl-local-{i}",
                                     daemon=True))
            for i in range(local)
        ]
        first = local_made + runners(self.usable_workers())
        if not first:
            raise WorkerLost("no worker to run the job: no remote worker registered and local_threads=0")
        try:
            launch(first)
            while not job.wait(self._poll_interval):
                launch(runners(self.discover()))
        except BaseException as error:
            # Ctrl-C (or any error) while waiting: stop the runners taking tasks, or they would run the
            # rest of the job in the background; calls in progress end on their own.
            job.fail(error)
            raise
        self._join(threads, job)
        if job.error is not None:
            raise job.error

    def _join(self, threads: list[threading.Thread], job: Job) -> None:
        # After a failure some remote calls may still be running; they end at their deadline at the latest.
        limit = time.monotonic() + (0 if job.error is None else self.config.task_deadline_floor) + 5.0
        for thread in threads:
            thread.join(max(0.0, limit - time.monotonic()))
            if thread.is_alive():
                log.debug("thread %s still busy after the job; leaving it to end on its own", thread.name)

    def _local_loop(self, job: Job) -> None:
        try:
            while (task := job.take(LOCAL)) is not None:
                try:
                    _correlate_valid(job.band(task), job.kernels[task.kernels[0] : task.kernels[1]],
                                     job.out_view(task), job.engine)
                except InputError as error:
                    job.fail(error)
                    return
                except Exception as error:
                    log.debug("%s failed locally: %r", _describe(task), error)
                    job.retry(LOCAL, task, error)
                else:
                    job.complete(LOCAL, task)
        finally:
            job.leave(LOCAL)

    def _remote_loop(self, job: Job, worker: RemoteWorker, use_shm: bool) -> None:
        from Pyro5.errors import CommunicationError
        from Pyro5.errors import TimeoutError as PyroTimeout

        def usable() -> bool:
            return worker.usable

        try:
            while (task := job.take(worker.name, usable)) is not None:
                try:
                    self._run_remote(job, worker, task, use_shm)
                except PyroTimeout as error:
                    job.retry(worker.name, task, error, runner_gone=True)
                    if worker.mark("quarantined"):
                        log.warning("worker %s did not finish %s in time; quarantined (not used again)",
                                    worker.name, _describe(task))
                    job.wake()
                    return
                except (CommunicationError, OSError) as error:
                    if worker.alive():
                        log.debug("%s failed on %s: %r", _describe(task), worker.name, error)
                        job.retry(worker.name, task, error)
                        continue
                    job.retry(worker.name, task, error, runner_gone=True)
                    if worker.mark("dead"):
                        log.warning("worker %s lost (%s); its tasks go back to the queue", worker.name, error)
                        self._drop_registration(worker.name)
                    job.wake()
                    return
                except InputError as error:
                    job.fail(error)
                    return
                except Exception as error:
                    log.debug("%s failed on %s: %r", _describe(task), worker.name, error)
                    job.retry(worker.name, task, error)
                else:
                    job.complete(worker.name, task)
        finally:
            job.leave(worker.name)

    def _run_remote(self, job: Job, worker: RemoteWorker, task: Task, use_shm: bool) -> None:
        from rmidl.remote.contract import BulkTicket, CorrelateTask, ShmRef

        limit = deadline(job.cost(task), worker.capacity(), floor=self.config.task_deadline_floor)
        if use_shm:
            assert job.shm_input is not None and job.shm_output is not None
            source: np.ndarray | ShmRef = ShmRef.from_wire(job.shm_input)
            output: str | ShmRef = ShmRef.from_wire(job.shm_output)
        else:
            source = job.band(task)
            output = "bulk" if worker.info.get("bulk_port") else "inline"
        record = CorrelateTask(task.task_id, job.bank_id, task.kernels, task.rows, source, output, job.engine)
        started = time.perf_counter()
        with worker.proxy() as proxy, worker.running():
            worker.ensure_bank(proxy, job)
            proxy._pyroTimeout = limit
            try:
                raw = proxy.correlate(record.to_wire())
            except BankError:
                # The worker evicted or never had the bank (e.g. it restarted): put it again, once.
                worker.ensure_bank(proxy, job, force=True)
                proxy._pyroTimeout = limit
                raw = proxy.correlate(record.to_wire())
        view = job.out_view(task)
        reply = record.parse_reply(raw, max_bytes=view.nbytes)
        log.debug("%s on %s: %.3f s round trip, %.3f s in the worker", _describe(task), worker.name,
                  time.perf_counter() - started, reply.seconds)
        if use_shm:
            assert job.shm_out_array is not None
            view[...] = job.shm_out_array[task.kernels[0] : task.kernels[1], task.rows[0] : task.rows[1], :]
            return
        moving = time.perf_counter()
        if isinstance(reply.result, BulkTicket):
            from rmidl.remote.bulk import fetch

            fetch(worker.host, int(worker.info["bulk_port"]), reply.result.ticket, view, timeout=limit,
                  ssl_context=worker.bulk_ssl_context())
        else:
            result = reply.result
            if result is None or result.shape != view.shape:
                got = None if result is None else result.shape
                raise RmidlError(f"worker {worker.name} returned shape {got} for {_describe(task)}, "
                                 f"expected {view.shape}")
            view[...] = result
        job.moved(view.nbytes, time.perf_counter() - moving)
