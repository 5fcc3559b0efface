"""Runs any job kind (`rmidl.client.jobs.base.JobKind`) on the local pool and the remote workers at once.

One pull queue per job (`TaskQueue`): local pool threads and per-worker threads take tasks from it.
Faults are handled here, once for every kind: a task that fails goes back to the queue (and fails the
job after `max_task_attempts` workers); a worker that stops answering leaves the job and is judged by
`Discovery` (unregistered only on evidence of death); one that misses a task's deadline (the cost
model's, `rmidl.client.cost.deadline`) is quarantined; a busy worker's refusal (WorkerBusy) puts the task
back uncounted while that worker backs off; a task over a worker's limits (`JobKind.misfit`, or the
worker's BudgetExceeded) waits for someone who can hold it; bad input fails the job at once; and workers
found mid-job (by discovery in the background) join it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection, Sequence

from rmidl.config import Config
from rmidl.errors import (
    AuthenticationError,
    BudgetExceeded,
    DataPlaneError,
    InputError,
    WorkerBusy,
    WorkerLost,
)

from .cost import Capacity, deadline, local_gflops
from .discovery import Discovery
from .jobboard import JobBoard, result_path
from .jobs.base import JobKind, T, TaskBlobs
from .queue import TaskQueue
from .stub import WorkerStub

__all__ = ["BUSY_BACKOFF_S", "LOCAL", "Scheduler"]

log = logging.getLogger(__name__)

LOCAL = "local"
"""Runner name of the coordinator's own thread pool (one worker, for retry bookkeeping)."""
BUSY_BACKOFF_S = (0.02, 1.0)
"""How long a runner waits after its worker said busy: first, longest (doubling while it stays busy)."""


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
        unregister: Callable[[str, str], object] | None = None,
        poll_interval: float = 0.5,
        only: Collection[str] | None = None,
    ) -> None:
        self.config = config
        self.local_threads = local_threads
        self.discovery = Discovery(config, registry=registry, unregister=unregister, only=only)
        self._poll_interval = poll_interval
        self.board = JobBoard()
        """The jobs run here: progress, task logs, metrics (the dashboard and the job feed read it)."""

    # -- discovery -----------------------------------------------------------------------------------
    @property
    def only(self) -> frozenset[str] | None:
        return self.discovery.only

    @only.setter
    def only(self, names: frozenset[str] | None) -> None:
        self.discovery.only = names

    @property
    def workers(self) -> dict[str, WorkerStub]:
        """name -> stub of every remote worker met so far (a snapshot)."""
        return self.discovery.workers

    def discover(self) -> list[WorkerStub]:
        """Look at the registry now (blocking); return the workers that became usable."""
        return self.discovery.discover()

    def refresh(self) -> None:
        """Look at the registry in the background (what a job does; it never waits for the name server)."""
        self.discovery.refresh()

    def usable_workers(self) -> list[WorkerStub]:
        return self.discovery.usable()

    def capacities(self, local_threads: int) -> list[Capacity]:
        """The consumers a job would have: `local_threads` pool threads and every usable worker."""
        # Calibrating costs ~0.1 s of engine work: only for a job with a local pool.
        local = [Capacity(LOCAL, local_gflops())] * local_threads if local_threads else []
        return local + [w.capacity() for w in self.usable_workers()]

    def queue(self, job: JobKind[T], progress: Callable[[int, int], None] | None = None) -> TaskQueue[T]:
        """A fresh pull queue of `job`'s tasks (the caller keeps it for the job's figures)."""
        tasks = job.tasks()
        return TaskQueue(tasks, describe=job.describe, max_attempts=self.config.max_task_attempts,
                         progress=progress, observer=self.board.trace(job.kind, len(tasks)))

    def close(self) -> None:
        self.discovery.close()

    # -- running a job ---------------------------------------------------------------------------------
    def run(self, job: JobKind[T], queue: TaskQueue[T], *, local_threads: int | None = None) -> None:
        """Run every task of `job` from `queue` (raises the job's error).

        Local pool threads run one task at a time on one engine thread each; the engine pins BLAS to one
        thread around each call itself, so pool threads never multiply with BLAS threads.
        """
        threads: list[threading.Thread] = []
        local = self.local_threads if local_threads is None else local_threads
        started: set[str] = set()

        def runners(workers: Sequence[WorkerStub]) -> list[tuple[str, threading.Thread]]:
            # The thread started first takes a one-task job: start the least busy worker's first, ties in
            # random order, or every small job of every coordinator lands on the same worker.
            order = sorted(workers, key=lambda w: (w.in_flight, random.random()))
            made = []
            for worker in order:
                if worker.name in started or not worker.usable:
                    continue
                started.add(worker.name)
                if not job.accepts(worker):
                    # E.g. it joined after the plan and would refuse these tasks' messages.
                    log.debug("worker %s sits out this %s job", worker.name, job.kind)
                    continue
                for slot in range(max(1, self.config.tasks_in_flight)):
                    thread = threading.Thread(target=self._remote_loop, args=(job, queue, worker),
                                              name=f"rmidl-{worker.name}-{slot}", daemon=True)
                    made.append((worker.name, thread))
            return made

        def launch(made: list[tuple[str, threading.Thread]]) -> None:
            # Every runner is counted before any starts: a task failing at once on the first one must not
            # look as if nobody else could take it.
            for runner, _ in made:
                queue.enter(runner)
            for _, thread in made:
                thread.start()
                threads.append(thread)

        local_made = [
            (LOCAL, threading.Thread(target=self._local_loop, args=(job, queue), name=f"rmidl-local-{i}",
                                     daemon=True))
            for i in range(local)
        ]
        first = local_made + runners(self.usable_workers())
        if not first and started:
            raise BudgetExceeded(f"no worker can take this {job.kind} job within its limits (each of "
                                 f"{', '.join(sorted(started))} sits it out) and local_threads=0")
        if not first:
            nobody = WorkerLost("no worker to run the job: no remote worker registered and local_threads=0")
            queue.fail(nobody)
            raise nobody
        try:
            launch(first)
            while not queue.wait(self._poll_interval):
                self.refresh()
                launch(runners(self.usable_workers()))
        except BaseException as error:
            # Ctrl-C (or any error) while waiting: stop the runners taking tasks, or they would run the
            # rest of the job in the background; calls in progress end on their own.
            queue.fail(error)
            raise
        self._join(threads, queue)
        if queue.error is not None:
            raise queue.error

    def _join(self, threads: list[threading.Thread], queue: TaskQueue[T]) -> None:
        # After a failure some remote calls may still be running; they end at their deadline at the latest.
        limit = time.monotonic() + (0 if queue.error is None else self.config.task_deadline_floor) + 5.0
        for thread in threads:
            thread.join(max(0.0, limit - time.monotonic()))
            if thread.is_alive():
                log.debug("thread %s still busy after the job; leaving it to end on its own", thread.name)

    def _local_loop(self, job: JobKind[T], queue: TaskQueue[T]) -> None:
        try:
            while (task := queue.take(LOCAL)) is not None:
                try:
                    job.run_local(task, 1)
                except InputError as error:
                    queue.fail(error)
                    return
                except Exception as error:
                    log.debug("%s failed locally: %r", job.describe(task), error)
                    queue.retry(LOCAL, task, error)
                else:
                    queue.complete(LOCAL, task)
        finally:
            queue.leave(LOCAL)

    def _remote_loop(self, job: JobKind[T], queue: TaskQueue[T], worker: WorkerStub) -> None:
        from Pyro5.errors import CommunicationError
        from Pyro5.errors import TimeoutError as PyroTimeout

        def usable() -> bool:
            return worker.usable

        def misfit(task: T) -> str | None:
            return job.misfit(task, worker)

        prefer = None
        if isinstance(job, TaskBlobs):
            task_blobs = job.task_blobs

            def prefer(task: T) -> bool:
                return worker.blobs.issuperset(task_blobs(task))

        first, longest = BUSY_BACKOFF_S
        backoff = first
        try:
            while (task := queue.take(worker.name, usable, misfit, prefer)) is not None:
                try:
                    self._run_remote(job, queue, worker, task)
                except PyroTimeout as error:
                    queue.retry(worker.name, task, error, runner_gone=True)
                    self.discovery.quarantine(worker, f"did not finish {job.describe(task)} in time")
                    queue.wake()
                    return
                except (CommunicationError, OSError) as error:
                    if self.discovery.lost(worker, error):
                        log.debug("%s failed on %s: %r", job.describe(task), worker.name, error)
                        queue.retry(worker.name, task, error)
                        continue
                    queue.retry(worker.name, task, error, runner_gone=True)
                    queue.wake()
                    return
                except WorkerBusy as error:
                    # Its slots or memory are taken by other tasks: no fault of the task, which anyone may
                    # take now; this runner waits a little before asking again.
                    log.debug("%s: %s", job.describe(task), error)
                    queue.retry(worker.name, task, error, counted=False)
                    queue.pause(backoff)
                    backoff = min(longest, 2 * backoff)
                    continue
                except BudgetExceeded as error:
                    # Over this worker's own limits (it advertised more room than it has): others may hold it.
                    queue.cannot(worker.name, task, str(error))
                    continue
                except AuthenticationError as error:
                    queue.retry(worker.name, task, error, runner_gone=True, counted=False)
                    self.discovery.distrust(worker, error)
                    queue.wake()
                    return
                except InputError as error:
                    queue.fail(error)
                    return
                except Exception as error:
                    log.debug("%s failed on %s: %r", job.describe(task), worker.name, error)
                    queue.retry(worker.name, task, error)
                else:
                    queue.complete(worker.name, task)
                    backoff = first
        finally:
            queue.leave(worker.name)

    def _run_remote(self, job: JobKind[T], queue: TaskQueue[T], worker: WorkerStub, task: T) -> None:
        try:
            self._run_remote_once(job, queue, worker, task)
        except DataPlaneError as error:
            # The worker is fine but a data path to it is not: run the task again, once, on another path.
            worker.fall_back(error)
            self._run_remote_once(job, queue, worker, task)

    def _run_remote_once(self, job: JobKind[T], queue: TaskQueue[T], worker: WorkerStub, task: T) -> None:
        cost = job.cost(task)
        limit = deadline(cost, worker.capacity(), floor=self.config.task_deadline_floor)
        record = job.request(task, worker)
        started = time.perf_counter()
        blobs = job.blobs()
        if isinstance(job, TaskBlobs):
            blobs = {**blobs, **job.task_blobs(task)}
        reply = worker.call(record, timeout=limit, blobs=blobs)
        log.debug("%s on %s: %.3f s round trip, %.3f s in the worker", job.describe(task), worker.name,
                  time.perf_counter() - started, reply.seconds)
        moving = time.perf_counter()
        moved = job.accept(task, reply, worker)
        if moved:
            queue.moved(moved, time.perf_counter() - moving)
        queue.observer.received(worker.name, result_path(reply.result), moved or cost.result_bytes)
