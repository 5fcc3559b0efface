"""The gradient job: one training step's shards as tasks of fixed shard bundles (rmidl.train on a cluster).

A session (`ShardSet`) makes each logical shard of a `rmidl.dataparallel.TrainingJob` a "shard" blob once
and cuts the shard ids into contiguous bundles, kept for the whole session so that a worker keeps the
data of the bundles it ran (`task_blobs`: it is put only those, and offered them first). Each step is a
`GradientStep` job whose tasks are the bundles' shards of that step: a worker computes them at the step's
"weights" blob and returns one float64 gradient sum per shard (inline, or over the bulk channel when
that pays), the local pool computes them in-process; every part lands in its shard's row, so who ran
what never changes the sum `rmidl.dataparallel.reduce_in_order` makes of them.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from rmidl.dataparallel import Step, TrainingJob, Weights
from rmidl.errors import BudgetExceeded, RmidlError
from rmidl.mlp import GradientSums
from rmidl.remote.blobs import Blob
from rmidl.remote.contract import ReplyRecord, ShmRef
from rmidl.remote.gradient import REPLY_FRAMING, GradientReply, GradientTask

from ..cost import TaskCost, bulk_pays

if TYPE_CHECKING:
    from ..shared import Lease
    from ..stub import WorkerStub

__all__ = ["FLOPS_PER_ROW_PARAMETER", "Bundle", "GradientStep", "ShardSet", "weights_blob_id"]

FLOPS_PER_ROW_PARAMETER = 6.0
"""A sample's forward and backward pass cost ~6 flops per parameter (three matrix products per layer)."""
BLOB_FRAMING = 64 << 10
"""Room a blob's message needs besides its arrays (settings, keys, Pyro5's header)."""


def weights_blob_id(weights: Weights) -> str:
    """The blob id of a step's weights: their version, which already names their content."""
    return f"weights-{weights.version}"


@dataclass(frozen=True)
class Bundle:
    """A task: some shards of one step (ascending ids)."""

    task_id: int
    shards: tuple[int, ...]


class ShardSet:
    """What stays the same over a training session: the job, its shards as blobs, the bundles and the
    buffers every step's parts are written into (row s: shard s)."""

    def __init__(self, job: TrainingJob, bundles: int, *, max_message_size: int) -> None:
        self.job = job
        self.max_message_size = max_message_size
        self.blobs = [Blob.shard(s, data.x, data.y) for s, data in enumerate(job.shards)]
        self.max_blob_bytes = max(blob.nbytes for blob in self.blobs) + BLOB_FRAMING
        """The largest message putting one of the shards takes."""
        if self.max_blob_bytes > max_message_size:
            raise BudgetExceeded(f"a training shard of {self.max_blob_bytes - BLOB_FRAMING} bytes does not "
                                 f"fit max_message_size={max_message_size}: train with more shards")
        self.ids = [blob.content_id for blob in self.blobs]
        count = job.plan.shards
        edges = [i * count // bundles for i in range(bundles + 1)]
        self.bundles = [tuple(range(a, b)) for a, b in itertools.pairwise(edges) if b > a]
        self.gradients = np.empty(self.block_shape)
        self.shared: ShmRef | None = None
        """The shared block `gradients` lives in (same-host workers write their rows there), or None."""
        self.losses = np.zeros(count)
        self.counts = np.zeros(count, np.int64)
        self.correct = np.zeros(count, np.int64)

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.job.plan.shards, self.job.spec.parameter_count

    def share(self, lease: Lease | None) -> None:
        """Keep the gradients on the shared block of `lease` from now on (None: in private memory)."""
        if lease is None:
            self.gradients, self.shared = np.empty(self.block_shape), None
        else:
            self.gradients, self.shared = lease.array, lease.ref

    def accepts(self, stub: WorkerStub) -> bool:
        return self.refusal(stub) is None

    def refusal(self, stub: WorkerStub) -> str | None:
        """Why the worker cannot run this session's tasks (None: it can): it does not serve them (an older
        version), takes smaller messages than a shard, or could not send back a bundle's gradients."""
        info = stub.info
        if not info.serves(GradientStep.kind):
            serves = ", ".join(info.methods) or "correlate"
            return f"{stub.name} (rmidl {info.version or 'unknown'}) serves {serves} only"
        limit = info.max_message_size
        if limit and self.max_blob_bytes > limit:
            return f"{stub.name} takes messages of {limit} bytes, a shard needs {self.max_blob_bytes}"
        if not info.bulk_port and not self.fits_inline(max(map(len, self.bundles)), stub):
            return f"{stub.name} has no bulk channel and a bundle's gradients exceed its message size"
        return None

    def fits_inline(self, shards: int, stub: WorkerStub) -> bool:
        """Whether a reply of `shards` gradients fits the messages of both ends."""
        limit = min(self.max_message_size, stub.info.max_message_size or self.max_message_size)
        return shards * self.job.spec.parameter_count * 8 + REPLY_FRAMING <= limit

    def parts(self, shard_ids: Sequence[int]) -> dict[int, GradientSums]:
        """The parts of the last step (views of the buffers, valid until the next step writes them)."""
        return {s: GradientSums(self.gradients[s], float(self.losses[s]), int(self.counts[s]),
                                int(self.correct[s])) for s in shard_ids}

    def store(self, shard: int, part: GradientSums) -> None:
        self.gradients[shard] = part.grad_sum
        self.record(shard, part.loss_sum, part.count, part.correct)

    def record(self, shard: int, loss: float, count: int, correct: int) -> None:
        self.losses[shard], self.counts[shard], self.correct[shard] = loss, count, correct


class GradientStep:
    """A `JobKind` (with `TaskBlobs`) of `Bundle`s: the shards of one step at one version of the weights."""

    kind = "gradient"

    def __init__(self, data: ShardSet, step: Step, weights: Weights, shard_ids: Sequence[int]) -> None:
        self.data = data
        self.step = step
        self.weights = weights
        self.weights_id = weights_blob_id(weights)
        self.weights_blob = Blob.weights(weights.vector, weights.version)
        wanted = set(shard_ids)
        bundles = (tuple(s for s in bundle if s in wanted) for bundle in data.bundles)
        self._tasks = [Bundle(i, shards) for i, shards in enumerate(bundles) if shards]
        self.compute_seconds: defaultdict[str, float] = defaultdict(float)
        """Seconds each participant (a worker, a local pool thread) spent computing this step's parts."""
        self.received = 0
        """Bytes of gradients that crossed TCP."""
        self._lock = threading.Lock()

    # -- JobKind -------------------------------------------------------------------------------------
    def tasks(self) -> Sequence[Bundle]:
        return self._tasks

    def describe(self, task: Bundle) -> str:
        shards = task.shards
        which = f"shard {shards[0]}" if len(shards) == 1 else f"shards {shards[0]}..{shards[-1]}"
        return f"gradient task {task.task_id} (step {self.step.number}, {which})"

    def cost(self, task: Bundle) -> TaskCost:
        plan = self.data.job.plan
        rows = sum(hi - lo for lo, hi in (plan.bounds(self.step.index, s) for s in task.shards))
        parameters = self.data.job.spec.parameter_count
        return TaskCost(FLOPS_PER_ROW_PARAMETER * rows * parameters,
                        result_bytes=len(task.shards) * parameters * 8)

    def blobs(self) -> Mapping[str, Blob]:
        return {self.weights_id: self.weights_blob}

    def task_blobs(self, task: Bundle) -> Mapping[str, Blob]:
        return {self.data.ids[s]: self.data.blobs[s] for s in task.shards}

    def accepts(self, stub: WorkerStub) -> bool:
        return self.data.accepts(stub)

    def misfit(self, task: Bundle, stub: WorkerStub) -> str | None:
        info = stub.info
        blobs = len(task.shards) + 1  # its shards and the weights, held together while it runs
        nbytes = sum(self.data.blobs[s].nbytes for s in task.shards) + self.weights_blob.nbytes
        if info.blob_budget and nbytes > info.blob_budget:
            return f"its shards and weights ({nbytes} bytes) are over the blob budget of {info.blob_budget}"
        if info.blob_slots and blobs > info.blob_slots:
            return f"its {blobs} blobs are more than the {info.blob_slots} the worker caches"
        return None

    def run_local(self, task: Bundle, threads: int) -> None:
        name = threading.current_thread().name
        for shard in task.shards:
            started = time.perf_counter()
            part = self.data.job.compute(self.weights.vector, self.step, shard)
            self.data.store(shard, part)
            with self._lock:
                self.compute_seconds[name] += time.perf_counter() - started

    def request(self, task: Bundle, stub: WorkerStub) -> GradientTask:
        output: str | ShmRef = "inline"
        if self.data.shared is not None and stub.same_host:
            output = self.data.shared
        elif stub.info.bulk_port:
            nbytes = len(task.shards) * self.data.job.spec.parameter_count * 8
            if not self.data.fits_inline(len(task.shards), stub) or bulk_pays(nbytes, stub.round_trip_s):
                output = "bulk"
        job = self.data.job
        pairs = tuple((s, self.data.ids[s]) for s in task.shards)
        return GradientTask(task.task_id, self.step, pairs, self.weights_id, job.spec, job.plan, output)

    def accept(self, task: Bundle, reply: ReplyRecord, stub: WorkerStub) -> int:
        if not isinstance(reply, GradientReply):
            raise RmidlError(f"worker {stub.name} sent no gradients for {self.describe(task)}")
        moved = 0
        if reply.result is not None:  # None: written into the shared block (the request's parse checked)
            first, last = task.shards[0], task.shards[-1]
            contiguous = last - first + 1 == len(task.shards)
            into = self.data.gradients[first:last + 1] if contiguous else np.empty(
                (len(task.shards), self.data.gradients.shape[1]))
            moved = stub.receive(reply.result, into, what=self.describe(task))
            if not contiguous:
                self.data.gradients[list(task.shards)] = into
        for shard, loss, count, correct in zip(task.shards, reply.loss_sums, reply.counts, reply.correct,
                                               strict=True):
            self.data.record(shard, loss, count, correct)
        with self._lock:
            self.compute_seconds[stub.name] += reply.seconds
            self.received += moved
        return moved
