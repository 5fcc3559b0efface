"""The stage-mapped features pipeline: LOAD, each CNP stage and FLAT on processors of their own.

As in the paper's mapping of pipeline stages to processors: batch b is decoded while batch b-1 is in CNP1,
b-2 in CNP2, and so on. LOAD and FLAT run in this process; each CNP stage runs on its own thread here,
or on a worker (stage i on worker i mod W, the worker holding the network blob and running stages
[i, i+1) of it), the maps travelling between stages through this process. `replicas[i]` processors
serve CNP stage i (a replicated stage), and `pipelines` P replicates every stage: P pipelines sharing
their queues (the paper's combination of pipeline and task parallelism). A worker that fails mid-run is
dropped and its stage carries on here. Results go into the same FeaturesJob rows as task placement's.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rmidl.errors import InputError, OptionError, RmidlError
from rmidl.network._stage import add_time
from rmidl.remote.features import FeaturesReply, FeaturesTask

from ..cost import TaskCost, deadline
from ..jobs.features import BULK_MIN_BYTES, FeatureBatch, FeaturesJob
from ..stub import WorkerStub
from .executor import Processor, Span, StageProcessors, run_pipeline

__all__ = ["IN_FLIGHT", "check_replicas", "run_stages"]

log = logging.getLogger(__name__)

IN_FLIGHT = 2
"""Batches waiting before each stage (the bounded buffer between two processors)."""


@dataclass
class _Item:
    """One batch between stages: its task, its dataset ids, its images or maps, its stage seconds."""

    task: FeatureBatch
    ids: np.ndarray
    data: np.ndarray
    started: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def check_replicas(replicas: object, stages: int) -> tuple[int, ...]:
    """None (one processor per CNP stage) or one positive count per CNP stage."""
    if replicas is None:
        return (1,) * stages
    listed = isinstance(replicas, Sequence) and not isinstance(replicas, (str, bytes))
    counts = list(replicas) if listed else []  # type: ignore[call-overload]
    if len(counts) != stages or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                                        for r in counts):
        raise OptionError(f"replicas={replicas!r} must give a positive processor count for each of the "
                          f"{stages} CNP stages")
    return tuple(int(r) for r in counts)


class _LocalStage:
    """CNP stage `index` computed in this process on one engine thread."""

    def __init__(self, job: FeaturesJob, index: int) -> None:
        self.job, self.index = job, index

    def __call__(self, item: _Item) -> _Item:
        if not len(item.ids):
            return item
        net = self.job.net
        maps = net.to_maps(item.data) if self.index == 0 else item.data
        item.data = net.forward_stages(maps, self.index, self.index + 1, threads=1, timings=item.timings)
        return item


class _RemoteStage:
    """CNP stage `index` on a worker (the last stage flattens there too); on a worker fault, here."""

    _ids = itertools.count()

    def __init__(self, job: FeaturesJob, index: int, worker: WorkerStub) -> None:
        self.job, self.index, self.worker = job, index, worker
        self.fallback = _LocalStage(job, index)
        shapes = job.net.stage_shapes(job.shape)[index]
        self.out = shapes.out
        self.flops = job.net.describe(job.shape).stages[index].flops

    def __call__(self, item: _Item) -> _Item:
        if not len(item.ids):
            return item
        if self.worker.usable:
            try:
                return self._remote(item)
            except InputError:
                raise
            except Exception as error:  # a worker fault: this batch here, and the rest too if it is gone
                if self.worker.health() != "ok" and self.worker.mark("dead"):
                    log.warning("worker %s failed CNP%d (%s); the stage carries on in this process",
                                self.worker.name, self.index + 1, error)
                else:
                    log.debug("worker %s failed CNP%d of %s (%r); this batch runs here", self.worker.name,
                              self.index + 1, self.job.describe(item.task), error)
        return self.fallback(item)

    def _remote(self, item: _Item) -> _Item:
        job, n = self.job, len(item.ids)
        last = self.index == len(job.net.stages) - 1
        shape = (n, job.width) if last else (n, *self.out)
        big = 4 * int(np.prod(shape)) >= BULK_MIN_BYTES
        output = "bulk" if self.worker.bulk_usable and big else "inline"
        record = FeaturesTask(next(self._ids), job.blob.content_id, (self.index, self.index + 1),
                              tuple(int(i) for i in item.ids), np.ascontiguousarray(item.data), output)
        cost = TaskCost(float(n * self.flops), int(item.data.nbytes), 4 * int(np.prod(shape)))
        limit = deadline(cost, self.worker.capacity(), floor=job.config.task_deadline_floor)
        reply = self.worker.call(record, timeout=limit, blobs=job.blobs())
        if not isinstance(reply, FeaturesReply) or reply.ids != record.ids:
            raise RmidlError(f"worker {self.worker.name} answered CNP{self.index + 1} for other images")
        into = np.empty(shape, np.float32)
        self.worker.receive(reply.result, into, what=f"CNP{self.index + 1} of {job.describe(item.task)}")
        for stage, seconds in reply.timings.items():
            add_time(item.timings, stage, seconds)
        item.data = into
        return item


def _load(job: FeaturesJob) -> Callable[[FeatureBatch], _Item]:
    def load(task: FeatureBatch) -> _Item:
        started = time.perf_counter()
        batch = job.read_batch(task.task_id)
        return _Item(task, np.asarray(batch.ids), batch.images, started,
                     {"LOAD": time.perf_counter() - started})

    return load


def _flat(job: FeaturesJob) -> Callable[[_Item], None]:
    def flat(item: _Item) -> None:
        start = time.perf_counter()
        if len(item.ids):
            features = item.data if item.data.ndim == 2 else job.net.flatten(item.data)
            job.write(item.ids, features)
        add_time(item.timings, "FLAT", time.perf_counter() - start)
        job.finish(item.task, item.timings, "pipeline", item.started)

    return flat


def run_stages(job: FeaturesJob, *, workers: Sequence[WorkerStub] = (), replicas: Sequence[int] | None = None,
               pipelines: int = 1, in_flight: int = IN_FLIGHT) -> list[Span]:
    """Every batch of `job` (planned) through the stage-mapped pipeline; returns the processors' spans."""
    counts = check_replicas(replicas, len(job.net.stages))
    if isinstance(pipelines, bool) or not isinstance(pipelines, int) or pipelines < 1:
        raise OptionError(f"pipelines={pipelines!r} must be a positive integer")
    usable = [w for w in workers if w.usable and job.accepts(w)]
    slots = itertools.count()
    stages = [StageProcessors("LOAD", [(f"load-{p}", _load(job)) for p in range(pipelines)])]
    for index, count in enumerate(counts):
        processors: list[tuple[str, Processor]] = []
        for replica in range(count * pipelines):
            suffix = f"-{replica}" if count * pipelines > 1 else ""
            if usable:
                worker = usable[next(slots) % len(usable)]
                processors.append((worker.name + suffix, _RemoteStage(job, index, worker)))
            else:
                processors.append((f"local{suffix}", _LocalStage(job, index)))
        stages.append(StageProcessors(f"CNP{index + 1}", processors))
    stages.append(StageProcessors("FLAT", [(f"flat-{p}", _flat(job)) for p in range(pipelines)]))
    return run_pipeline(job.tasks(), stages, in_flight=in_flight, key=_task_id)


def _task_id(item: FeatureBatch | _Item) -> int:
    return item.task_id if isinstance(item, FeatureBatch) else item.task.task_id
