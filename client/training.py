"""rmidl.train on a Coordinator: rmidl.dataparallel's training_session seam filled by the Scheduler.

Per step: the weights go to every worker as a blob under their version, all at once (the send phase;
a worker that holds that version gets nothing); the step then runs as one `GradientStep` job on the
scheduler (local pool threads and workers pulling shard bundles from one queue, with its retries,
deadlines, quarantine and discovery), and the step's parts come back in shard order: written by
same-host workers straight into a shared block, sent by the others inline or over the bulk channel.
The previous version is dropped from the workers while the coordinator reduces and updates. Shards are
put on a worker once, by content id, when it first runs a bundle of them, and dropped at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from rmidl.dataparallel import ComputeShards, Step, StepResult, TrainingJob, Weights
from rmidl.errors import WorkerLost
from rmidl.kernels import blas_pinned

from .cost import Capacity, balanced_tasks
from .jobs.gradient import FLOPS_PER_ROW_PARAMETER, GradientStep, ShardSet
from .scheduler import Scheduler
from .shared import SharedPool
from .stub import WorkerStub

if TYPE_CHECKING:
    from .shared import Lease

__all__ = ["TrainingSession", "bundle_size", "training_session"]

log = logging.getLogger(__name__)

BLOB_THREADS = 8
"""Threads putting weights on (and dropping old versions from) workers in parallel."""


def bundle_size(shards: int, *, step_flops: float, consumers: Sequence[Capacity], runners: int) -> int:
    """Shards per bundle (task) of a session. Two needs, the larger wins:

    - balance: the cost model's count of tasks for one step (TASKS_PER_CORE per core, each task
      MIN_ROUND_TRIPS round trips long) but at least one per runner (a local pool thread, each of a
      worker's tasks_in_flight threads), since a step is a barrier as long as its slowest consumer;
    - threads: a worker computes one task at a time, a bundle's shards on up to all its threads, so a
      bundle holds as many shards as the widest worker has threads (while every consumer gets one).
    """
    if not consumers:
        return shards
    rate = sum(c.gflops for c in consumers) * 1e9
    cores = sum(c.cores for c in consumers)
    balanced = balanced_tasks(step_flops / rate, cores, max(c.overhead_s for c in consumers))
    by_balance = math.ceil(shards / max(1, min(shards, max(runners, balanced))))
    by_threads = min(max(c.cores for c in consumers), math.ceil(shards / len(consumers)))
    return max(1, by_balance, by_threads)


def bundle_count(scheduler: Scheduler, job: TrainingJob, local_threads: int) -> int:
    """How many bundles the shards of `job` make on the consumers `scheduler` has now (see bundle_size)."""
    rows = job.plan.samples / job.plan.steps
    runners = local_threads + len(scheduler.usable_workers()) * max(1, scheduler.config.tasks_in_flight)
    size = bundle_size(job.plan.shards, step_flops=FLOPS_PER_ROW_PARAMETER * rows * job.spec.parameter_count,
                       consumers=scheduler.capacities(local_threads), runners=runners)
    return math.ceil(job.plan.shards / size)


class TrainingSession:
    """`compute_shards(step, weights, shard_ids) -> StepResult` on a Scheduler's workers and local pool."""

    def __init__(self, scheduler: Scheduler, job: TrainingJob, *, local_threads: int,
                 shared: SharedPool | None = None, poll_interval: float = 0.5) -> None:
        self.scheduler = scheduler
        self.local_threads = local_threads
        self.poll_interval = poll_interval
        self.data = ShardSet(job, bundle_count(scheduler, job, local_threads),
                             max_message_size=scheduler.config.max_message_size)
        self._shared = shared
        self._block: Lease | None = None
        self._clean = True
        if shared is not None and any(w.same_host for w in scheduler.usable_workers()):
            self._take_block()
        self.tasks_by: Counter[str] = Counter()
        self.tasks = 0
        self.requeued = 0
        self._pool = ThreadPoolExecutor(BLOB_THREADS, thread_name_prefix="rmidl-blobs")
        self._dropping: list[Future[None]] = []
        self._previous: str | None = None
        self._looked = time.monotonic()
        self._check_participants()

    def _check_participants(self) -> None:
        """Fail before any data moves when nobody can run gradient tasks (e.g. only workers too old)."""
        workers = self.scheduler.usable_workers()
        if self.local_threads or not workers:
            return  # no workers at all: the scheduler says so in its own words
        refusals = [self.data.refusal(w) for w in workers]
        if all(refusals):
            why = "; ".join(map(str, refusals))
            raise WorkerLost(f"no worker can run gradient tasks and local_threads=0: {why}")

    def __call__(self, step: Step, weights: Weights, shard_ids: Sequence[int]) -> StepResult:
        scheduler = self.scheduler
        if time.monotonic() - self._looked >= self.poll_interval:  # steps shorter than the poll, too
            scheduler.refresh()  # in the background: a hung name server must not hold up the step
            self._looked = time.monotonic()
        job = GradientStep(self.data, step, weights, shard_ids)
        workers = [w for w in scheduler.usable_workers() if self.data.accepts(w)]
        sent_before = _sent(scheduler)
        started = time.perf_counter()
        self._send(workers, job)
        sent = time.perf_counter()
        queue = scheduler.queue(job)
        try:
            scheduler.run(job, queue, local_threads=self.local_threads)
        except BaseException:
            self._clean = False
            raise
        finally:
            self.tasks += queue.total
            self.tasks_by.update(queue.tasks_by)
            self.requeued += queue.requeued
        finished = time.perf_counter()
        parts = self.data.parts(shard_ids)
        if queue.requeued and self._block is not None:
            # An abandoned attempt may still write its rows of this step (the same bits) later, but must
            # never write into the next step's: that one gets a block of its own (parts keep this one).
            self._give_block(reusable=False)
            self._take_block()
        self._drop_previous(job.weights_id)
        compute = max(job.compute_seconds.values(), default=0.0)
        return StepResult(parts, send_seconds=sent - started, compute_seconds=compute,
                          gather_seconds=max(0.0, finished - sent - compute),
                          bytes_sent=_sent(scheduler) - sent_before, bytes_received=job.received)

    def _send(self, workers: Sequence[WorkerStub], job: GradientStep) -> None:
        """Put this step's weights on every worker at once; one that fails is left to the scheduler (it
        gets them with its first task, or its failure is handled there)."""
        wait(self._dropping)
        self._dropping = []
        blobs = job.blobs()
        futures = {self._pool.submit(worker.put_blobs, blobs): worker for worker in workers}
        for future, worker in futures.items():
            error = future.exception()
            if error is not None:
                log.debug("weights %s did not reach %s: %r", job.weights.version, worker.name, error)

    def _drop_previous(self, current: str) -> None:
        previous, self._previous = self._previous, current
        if previous is not None:
            self._dropping = [self._pool.submit(w.drop_blobs, [previous])
                              for w in self.scheduler.usable_workers()]

    def _take_block(self) -> None:
        assert self._shared is not None
        self._block = self._shared.lease(self.data.block_shape, "float64")
        self.data.share(self._block)

    def _give_block(self, *, reusable: bool) -> None:
        """Let go of the block (back to the pool once the last step's parts are gone, unless not
        `reusable`: then it is closed then, never given to another job)."""
        if self._shared is not None and self._block is not None:
            self.data.share(None)
            if not reusable:
                self._shared.discard(self._block)
            self._block = None

    def close(self) -> None:
        """Drop the session's blobs (shards, last weights) from every worker; stop the blob threads; give
        the shared block back (kept for the next session only if no call may still write into it)."""
        wait(self._dropping)
        ids = [*self.data.ids, *([self._previous] if self._previous else [])]
        wait([self._pool.submit(w.drop_blobs, ids) for w in self.scheduler.usable_workers()])
        self._pool.shutdown()
        self._give_block(reusable=self._clean)

    def figures(self) -> dict[str, Any]:
        """What Coordinator.last_job() tells of a training run: tasks, per participant, re-queued, bundles."""
        return {"kind": "gradient", "tasks": self.tasks, "tasks_by": dict(self.tasks_by),
                "requeued": self.requeued, "bundles": len(self.data.bundles)}


def _sent(scheduler: Scheduler) -> int:
    return sum(w.blob_bytes_sent for w in scheduler.workers.values())


@contextlib.contextmanager
def training_session(scheduler: Scheduler, job: TrainingJob, *, local_threads: int,
                     shared: SharedPool | None = None,
                     figures: dict[str, Any] | None = None) -> Iterator[ComputeShards]:
    """A `TrainingSession` for the `with` block; BLAS pinned to one thread per local pool thread (each
    part pins it anyway: one pin for the run makes theirs a counter increment). Same-host workers write
    their gradients into a block of `shared` (None: over TCP). `figures` is filled when it ends."""
    session = TrainingSession(scheduler, job, local_threads=local_threads, shared=shared)
    try:
        with blas_pinned() if local_threads else contextlib.nullcontext():
            yield session
    finally:
        session.close()
        if figures is not None:
            figures.clear()
            figures.update(session.figures())

