"""The job model: one small protocol every distributed job kind implements, so that the pull queue,
retries, task deadlines, quarantine, discovery, fault handling and figures are written once (scheduler.py).

A job is a fixed list of idempotent tasks, each writing its own slot of an output the job preallocated;
a retry rewrites its slot, so results never depend on who ran what or in which order. The scheduler
takes tasks from one queue into local pool threads (`run_local`) and per-worker threads, which build a
typed record (`request`), send it through the worker's stub with its blobs and a deadline from the cost
model (`cost`), and hand the reply back (`accept`). Every option is checked when the job is built,
before any padding, planning, discovery or shared memory; options travel in the records.

Two more kinds plug in (the second through one optional hook, `TaskBlobs`):

- features (issue 9): tasks are batches of image ids; `blobs()` is the network (its banks and settings
  as one `Blob` kind "network", checked by an entry added to `rmidl.remote.blobs.KINDS`); `request`
  builds a `FeaturesTask` record (image ids, the images inline or in shared memory) for a worker method
  `features(task)` that calls `Network.forward_batch`; `accept` writes the reply's (n, F) rows into
  rows [ids] of the preallocated feature matrix (`stub.receive(reply.result, matrix[i0:i1], ...)`);
  `run_local` runs `forward_batch` on the batch in-process.
- gradient (issue 10, client/jobs/gradient.py): `Coordinator.training_session(job)` fills
  rmidl.dataparallel's ShardExecutor seam (client/training.py). Each step is one job whose tasks are
  fixed bundles of shard ids; `blobs()` is the step's weights (kind "weights", under their version) and
  `task_blobs(task)` (the optional `TaskBlobs` hook) the bundle's shards (kind "shard", by content id),
  so a worker is put only the data of the bundles it runs and is offered those bundles first;
  `request` builds a `GradientTask` (rmidl.remote.gradient) for the worker method `gradient(task)`,
  which calls `rmidl.dataparallel.compute_shard` per shard; `accept` writes each shard's float64
  gradient sum into its row, and `reduce_in_order` sums them in shard order: the serial weights.

Each new record goes in `rmidl.remote` beside `CorrelateTask` (frozen dataclass, METHOD, one
to_wire/from_wire pair, parse_reply), and each worker method beside `correlate` in server/worker.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from rmidl.client.cost import TaskCost
from rmidl.client.queue import Keyed
from rmidl.remote.blobs import Blob
from rmidl.remote.contract import ReplyRecord, TaskRecord

if TYPE_CHECKING:
    from rmidl.client.stub import WorkerStub

__all__ = ["JobKind", "T", "TaskBlobs"]

T = TypeVar("T", bound=Keyed)
T_contra = TypeVar("T_contra", bound=Keyed, contravariant=True)


class JobKind(Protocol[T]):
    """What the scheduler needs of a job of tasks `T` (anything with a unique `task_id`)."""

    kind: str
    """"correlate" | "features" | "gradient": for logs and figures."""

    def tasks(self) -> Sequence[T]:
        """Every task of the job (fixed before the job runs)."""
        ...

    def describe(self, task: T) -> str:
        """The task for errors and logs: "task 3 (rows 0:64, kernels 0:128)"."""
        ...

    def cost(self, task: T) -> TaskCost:
        """Flops and bytes of one task: the cost model turns them into its deadline on a consumer."""
        ...

    def blobs(self) -> Mapping[str, Blob]:
        """Blobs (by content id) a worker must hold before it runs any of the tasks."""
        ...

    def accepts(self, stub: WorkerStub) -> bool:
        """Whether this worker can take the job's tasks (e.g. messages sized for a larger limit than its
        own: it sits this job out and counts for the next)."""
        ...

    def misfit(self, task: T, stub: WorkerStub) -> str | None:
        """None if this worker can hold `task` within the limits it advertises (`stub.info`), else why not
        (one short line): the task then waits for another participant, and fails the job only if none
        can hold it."""
        ...

    def run_local(self, task: T, threads: int) -> None:
        """Compute `task` in this process into the job's output."""
        ...

    def request(self, task: T, stub: WorkerStub) -> TaskRecord:
        """The typed record that runs `task` on this worker (shared memory, inline or bulk chosen for it)."""
        ...

    def accept(self, task: T, reply: ReplyRecord, stub: WorkerStub) -> int:
        """Write the reply's result into the job's output (fetching it over the bulk channel if need be);
        return the bytes that crossed TCP."""
        ...


@runtime_checkable
class TaskBlobs(Protocol[T_contra]):
    """Optional for a job kind: blobs that only some tasks need (a training shard each). A worker is put
    those of the tasks it runs, beside `blobs()`, and the queue offers it first the tasks whose blobs it
    already holds, so each worker keeps working on the data it has."""

    def task_blobs(self, task: T_contra) -> Mapping[str, Blob]:
        """Blobs (by content id) a worker must hold to run `task`, besides the job's `blobs()`."""
        ...
