"""The features job: a dataset through a network's CNP stages, batches of images as tasks (task parallelism).

Each task is a batch of consecutive dataset positions; whoever runs it runs the whole chain (LOAD, every
CNP stage, FLAT) and writes only the flattened features into the rows of a preallocated (n, F) matrix, so
the order is exact and a retry rewrites its rows. Where images are decoded: the coordinator decodes ahead
(`BatchLoader`, bounded) for its local pool and for workers on other hosts, which get the pixels inline;
workers on this host (or every worker, with load="workers": a shared filesystem) are sent the batch's
description and read the files themselves, so the LOAD stage runs in parallel there too.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from rmidl import metrics
from rmidl.config import Config
from rmidl.datasets import Batch, Dataset
from rmidl.errors import BudgetExceeded, OptionError, RmidlError
from rmidl.featureset import FeatureSet
from rmidl.geometry import split_range
from rmidl.network import Network
from rmidl.network._stage import add_time
from rmidl.provenance import PREPROCESSING
from rmidl.remote.blobs import Blob
from rmidl.remote.contract import ReplyRecord
from rmidl.remote.features import FeaturesReply, FeaturesTask

from ..cost import TASKS_PER_CORE, Capacity, TaskCost
from .loader import BatchLoader

if TYPE_CHECKING:
    from ..stub import WorkerStub

__all__ = ["BULK_MIN_BYTES", "LOADS", "MAX_AUTO_BATCH", "FeatureBatch", "FeaturesJob", "TaskSpan",
           "check_batch", "feature_inputs"]

log = logging.getLogger(__name__)

LOADS = ("auto", "coordinator", "workers")
"""Who decodes: auto (workers on this host read the files, the coordinator decodes for the rest),
coordinator (always here), workers (every worker reads the files: they share a filesystem)."""
MAX_AUTO_BATCH = 64
"""Largest batch chosen automatically (a per-call overhead of ~1 ms is long amortised by then)."""
TASK_SECONDS = 0.25
"""A task is made at least this long on one core (when the dataset allows), so round trips, blob checks
and Python per call stay a few percent of it."""
MEMORY_SHARE = 16
"""A batch's maps may take at most memory_budget / MEMORY_SHARE (a few tasks are in flight at once)."""
BULK_MIN_BYTES = 1 << 20
"""Results at least this large come over a worker's bulk channel instead of inside the reply."""


@dataclass(frozen=True)
class FeatureBatch:
    """One task: dataset positions [start, stop) of the job's view."""

    task_id: int
    positions: tuple[int, int]


@dataclass(frozen=True)
class TaskSpan:
    """One task as it ran: where, when (seconds since the job began; a remote task from its request to its
    reply), and its stage seconds (LOAD, CNP<i>, FLAT and their parts) as measured where it ran."""

    runner: str
    task_id: int
    start: float
    end: float
    timings: dict[str, float]


def check_batch(batch: object) -> int | None:
    """None (chosen per job) or a positive integer."""
    if batch is None:
        return None
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise OptionError(f"batch={batch!r} must be a positive integer or None (chosen for the job)")
    return int(batch)


def feature_inputs(dataset: Dataset | str | os.PathLike[str], net: Network | str | os.PathLike[str], *,
                   seed: int = 0) -> tuple[Dataset, Network]:
    """The dataset (opened if a path) and the network (a file, or a spec / preset built with `seed` for the
    images' channels) that `Coordinator.features` and `rmidl features` take."""
    from rmidl.datasets import open_dataset
    from rmidl.network import resolve_network

    data = dataset if isinstance(dataset, Dataset) else open_dataset(dataset)
    shape = data.shape
    return data, resolve_network(net, seed=seed, channels=shape[2] if len(shape) == 3 else 1)


class FeaturesJob:
    """A `JobKind` of `FeatureBatch`es. Built (every option checked, the first image decoded for the
    shape), `plan_for()` the consumers at hand, run inside `running()`, then `feature_set()`."""

    kind = "features"

    def __init__(self, dataset: Dataset, net: Network, *, config: Config, batch: int | None = None,
                 load: str = "auto", progress: Callable[[int, int], None] | None = None) -> None:
        if not isinstance(dataset, Dataset):
            raise OptionError(f"dataset must be an rmidl.datasets.Dataset, got {type(dataset).__name__}")
        if not isinstance(net, Network):
            raise OptionError(f"net must be an rmidl.Network, got {type(net).__name__}")
        if load not in LOADS:
            raise OptionError(f"load={load!r} is not one of {', '.join(LOADS)}")
        if progress is not None and not callable(progress):
            raise OptionError(f"progress={progress!r} must be a callable (done, total) or None")
        self.batch = check_batch(batch)
        ids = np.asarray(dataset.ids)
        if len(np.unique(ids)) != len(ids):
            raise OptionError("the dataset view repeats images: each image id may appear once")
        self.dataset, self.net, self.config, self.load = dataset, net, config, load
        self.shape = tuple(dataset.shape)  # the first readable image, decoded once
        self.width = net.output_shape(self.shape)[0]
        self.maps_in = net.stage_shapes(self.shape)[0].maps_in
        self.image_flops = net.describe(self.shape).flops
        self.image_bytes = 4 * math.prod(self.shape)
        self.peak_bytes = net.peak_bytes(self.maps_in)
        n = len(dataset)
        if 4 * n * self.width > config.memory_budget:
            raise BudgetExceeded(f"features of {n} images x {self.width} float32 need "
                                 f"{4 * n * self.width / 2**20:.0f} MiB, over the memory budget of "
                                 f"{config.memory_budget / 2**20:.0f} MiB")
        self.out = np.zeros((n, self.width), np.float32)  # calloc: pages appear as rows are written
        self.kept = np.zeros(n, bool)
        self.writes = np.zeros(n, np.uint8)
        """Successful writes per row (1 for every kept image after a run, retries included)."""
        self.blob = Blob.network(net)
        self.stage_seconds: dict[str, float] = {}
        """Seconds per stage (LOAD, CNP1.., FLAT and the CNP parts) summed over every batch and runner."""
        self.load_where: Counter[str] = Counter()
        """Batches decoded by the coordinator ("coordinator") and by the workers ("workers")."""
        self.worker_bad: dict[int, str] = {}
        self._position: dict[int, int] | None = (
            None if np.array_equal(ids, np.arange(n)) else {int(i): p for p, i in enumerate(ids)})
        self._progress = progress
        self.origin = time.perf_counter()
        """The clock's zero for spans (the job's construction)."""
        self.spans: list[TaskSpan] = []
        """Each task as it ran: runner, start and end on this process's clock, its stage seconds."""
        self._sent: dict[int, float] = {}
        self._done = 0
        self._tasks: list[FeatureBatch] = []
        self.message_limit = 0
        """The max_message_size the batches were sized for: a worker taking them inline needs as much."""
        self._loader: BatchLoader[Batch] | None = None
        self._lock = threading.Lock()

    # -- before the run ------------------------------------------------------------------------------
    def plan_for(self, consumers: Sequence[Capacity], workers: Sequence[WorkerStub]) -> list[FeatureBatch]:
        """Cut the dataset into batches for these consumers (and the message limits of these workers)."""
        from ..scheduler import LOCAL

        n = len(self.dataset)
        batch = self.batch or self.auto_batch(consumers)
        batch = min(batch, self._message_cap(workers))
        self._tasks = [FeatureBatch(i, r) for i, r in enumerate(split_range(n, size=batch))]
        here = sum(1 for c in consumers if c.name == LOCAL)
        remote = [w for w in workers if not self._reads_itself(w)]
        # Decode ahead whenever someone takes decoded batches: one waiting batch per such consumer slot.
        self._depth = max(2, here + len(remote) * max(1, self.config.tasks_in_flight))
        self._ahead = bool(here or remote)
        return self._tasks

    def auto_batch(self, consumers: Sequence[Capacity]) -> int:
        """Images per task: TASK_SECONDS of one core's work (at least MIN_ROUND_TRIPS round trips), then
        no more than gives TASKS_PER_CORE tasks per core of the consumers, within MEMORY_SHARE."""
        from ..cost import MIN_ROUND_TRIPS, local_gflops

        cores = sum(max(1, c.cores) for c in consumers) or 1
        rate = min((c.gflops / max(1, c.cores) for c in consumers), default=0.0) or local_gflops()
        image_seconds = self.image_flops / (rate * 1e9)
        overhead = max((c.overhead_s for c in consumers), default=0.0)
        long_enough = math.ceil(max(TASK_SECONDS, MIN_ROUND_TRIPS * overhead) / max(image_seconds, 1e-9))
        balanced = math.ceil(len(self.dataset) / (TASKS_PER_CORE * cores))
        memory = self.config.memory_budget // MEMORY_SHARE // max(1, self.peak_bytes)
        return max(1, min(long_enough, balanced, MAX_AUTO_BATCH, memory))

    def _message_cap(self, workers: Sequence[WorkerStub]) -> int:
        """Images per task such that inline images and inline features fit every worker's messages."""
        own = self.config.max_message_size
        smallest = min([own] + [w.info.max_message_size or own for w in workers])
        limit = smallest - min(64 << 10, smallest // 8)
        cap = limit // max(1, self.image_bytes, 4 * self.width)
        if cap < 1:
            raise BudgetExceeded(f"one image ({self.image_bytes} bytes) or its features do not fit the "
                                 f"smallest worker message limit of {limit} bytes (raise max_message_size)")
        self.message_limit = smallest
        return int(cap)

    @contextmanager
    def running(self) -> Iterator[None]:
        """The run's LOAD thread (decoding ahead, bounded), stopped and joined after."""
        loader = BatchLoader(self.read_batch, [t.task_id for t in self._tasks], depth=self._depth,
                             ahead=self._ahead)
        self._loader = loader
        try:
            yield
        finally:
            loader.close()

    # -- JobKind -------------------------------------------------------------------------------------
    def tasks(self) -> Sequence[FeatureBatch]:
        return self._tasks

    def describe(self, task: FeatureBatch) -> str:
        a, b = task.positions
        return f"batch {task.task_id} (images {a}:{b})"

    def cost(self, task: FeatureBatch) -> TaskCost:
        n = task.positions[1] - task.positions[0]
        return TaskCost(flops=float(n * self.image_flops), input_bytes=n * self.image_bytes,
                        result_bytes=4 * n * self.width)

    def blobs(self) -> Mapping[str, Blob]:
        return {self.blob.content_id: self.blob}

    def accepts(self, stub: WorkerStub) -> bool:
        limit = stub.info.max_message_size
        return not (0 < limit < self.message_limit)

    def misfit(self, task: FeatureBatch, stub: WorkerStub) -> str | None:
        n = task.positions[1] - task.positions[0]
        budget = stub.info.memory_budget
        need = n * self.peak_bytes + self.net.scratch_bytes(self.maps_in, stub.info.threads, batch=n)
        if budget and need > budget:
            return f"its maps of {need} bytes are over the memory budget of {budget} bytes"
        return None

    def run_local(self, task: FeatureBatch, threads: int) -> None:
        start = time.perf_counter()
        batch = self._batch(task)
        timings: dict[str, float] = {}
        if len(batch):
            features = self.net.forward_batch(batch.images, threads=threads, timings=timings)
            self.write(batch.ids, features)
        self.finish(task, timings, threading.current_thread().name.removeprefix("rmidl-"), start)

    def request(self, task: FeatureBatch, stub: WorkerStub) -> FeaturesTask:
        stages = (0, len(self.net.stages))
        a, b = task.positions
        with self._lock:
            self._sent[task.task_id] = time.perf_counter()
        output = "bulk" if stub.bulk_usable and 4 * (b - a) * self.width >= BULK_MIN_BYTES else "inline"
        if self._reads_itself(stub):
            assert self._loader is not None
            decoded = self._loader.claim(task.task_id)
            if decoded is None:
                view = self.dataset.subset(slice(a, b))
                return FeaturesTask(task.task_id, self.blob.content_id, stages, tuple(map(int, view.ids)),
                                    view.to_dict(), output)
        else:
            decoded = self._batch(task)
        return FeaturesTask(task.task_id, self.blob.content_id, stages, tuple(map(int, decoded.ids)),
                            np.ascontiguousarray(decoded.images, np.float32), output)

    def accept(self, task: FeatureBatch, reply: ReplyRecord, stub: WorkerStub) -> int:
        if not isinstance(reply, FeaturesReply):
            raise RmidlError(f"worker {stub.name} answered {self.describe(task)} with {type(reply).__name__}")
        moved = 0
        if reply.ids:
            rows = self._rows(reply.ids)
            contiguous = rows[-1] - rows[0] + 1 == len(rows) and bool(np.all(np.diff(rows) == 1))
            into = self.out[rows[0] : rows[-1] + 1] if contiguous else np.empty((len(rows), self.width),
                                                                               np.float32)
            moved = stub.receive(reply.result, into, what=self.describe(task))
            self.write(np.asarray(reply.ids), into)
        with self._lock:
            self.worker_bad.update(dict(reply.bad))
            if "LOAD" in reply.timings:
                self.load_where["workers"] += 1
        with self._lock:
            sent = self._sent.pop(task.task_id, time.perf_counter())
        self.finish(task, reply.timings, stub.name, sent)
        return moved

    # -- the result ----------------------------------------------------------------------------------
    def feature_set(self, stats: dict[str, Any]) -> FeatureSet:
        """The rows of every image computed, in dataset order; bad images (skip_bad) left out. `stats` go
        into the set but its span lists (kept by the coordinator's last_job for the study)."""
        stats = {k: v for k, v in stats.items() if k not in ("spans", "stage_spans")}
        bad_ids = {**self.dataset.bad, **self.worker_bad}
        view_ids = np.asarray(self.dataset.ids)
        bad = {int(i): bad_ids[int(i)] for i in view_ids if int(i) in bad_ids}
        missing = int(np.count_nonzero(~self.kept)) - len(bad)
        if missing:
            raise RmidlError(f"{missing} image(s) of the dataset were neither computed nor reported bad")
        keep = self.kept
        labels = None if self.dataset.labels is None else np.asarray(self.dataset.labels)[keep]
        paths = self.dataset.paths
        return FeatureSet(
            X=self.out if keep.all() else self.out[keep], labels=labels, classes=tuple(self.dataset.classes),
            paths=None if paths is None else tuple(p for p, k in zip(paths, keep, strict=True) if k),
            ids=view_ids[keep], network={"fingerprint": self.net.fingerprint, **self.net.settings()},
            stats=stats, bad=bad)

    def figures(self) -> dict[str, Any]:
        """Per-stage seconds, where batches were decoded, the batch size and task count, the images' shape
        and preprocessing (with the network's fingerprint, the features' provenance)."""
        with self._lock:
            return {"images": len(self.dataset), "features": self.width, "batch": self.batch_size,
                    "tasks": len(self._tasks), "stage_seconds": dict(self.stage_seconds),
                    "load": dict(self.load_where), "image_shape": list(self.shape),
                    "preprocessing": {key: self.dataset.settings[key] for key in PREPROCESSING},
                    "bad": len(self.dataset.bad) + len(self.worker_bad)}

    @property
    def batch_size(self) -> int:
        return max((b - a for a, b in (t.positions for t in self._tasks)), default=0)

    # -- internals -----------------------------------------------------------------------------------
    def _reads_itself(self, stub: WorkerStub) -> bool:
        return self.load == "workers" or (self.load == "auto" and stub.same_host)

    def read_batch(self, task_id: int) -> Batch:
        """Decode one task's images here (the coordinator's LOAD stage)."""
        timings: dict[str, float] = {}
        batch = self.dataset.read(slice(*self._tasks[task_id].positions), timings=timings)
        with self._lock:
            for stage, seconds in timings.items():
                add_time(self.stage_seconds, stage, seconds)
            self.load_where["coordinator"] += 1
        return batch

    def _batch(self, task: FeatureBatch) -> Batch:
        assert self._loader is not None, "run the job inside running()"
        return self._loader.get(task.task_id)

    def _rows(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        array = np.asarray(ids, np.int64)
        if self._position is None:
            if len(array) and (array.min() < 0 or array.max() >= len(self.out)):
                raise RmidlError(f"image ids {array.min()}..{array.max()} are outside the dataset")
            return array
        try:
            return np.array([self._position[int(i)] for i in array], np.int64)
        except KeyError as error:
            raise RmidlError(f"image id {error} is not in the dataset") from None

    def write(self, ids: np.ndarray, features: np.ndarray) -> None:
        """Rows of these dataset ids := features (a view of the matrix itself is not copied)."""
        rows = self._rows(ids)
        if len(rows) and not np.shares_memory(features, self.out):
            self.out[rows] = features
        with self._lock:
            self.kept[rows] = True
            self.writes[rows] += 1

    def finish(self, task: FeatureBatch, timings: Mapping[str, float], runner: str, start: float) -> None:
        """Count a task's images as done (progress), its stage seconds, and its span on `runner`."""
        a, b = task.positions
        end = time.perf_counter()
        with self._lock:
            for stage, seconds in timings.items():
                add_time(self.stage_seconds, stage, seconds)
            self.spans.append(TaskSpan(runner, task.task_id, start - self.origin, end - self.origin,
                                       dict(timings)))
            self._done += b - a
            done = self._done
        metrics.images_done(b - a)
        if self._progress is not None:
            try:
                self._progress(done, len(self.out))
            except Exception as error:  # a broken progress display must not lose the job
                log.warning("progress callback failed (%r); not calling it again", error)
                self._progress = None
