"""The worker's features handler: a batch (images, a stage's maps, or files it reads) through network stages.

The worker's `features(task)` parses a `FeaturesTask` and hands it here with the network blob it names;
this module reads the batch (decoding files outside the compute lock, so one task's LOAD overlaps another
task's CNP work on the same worker), runs `Network.forward_stages` with every thread of the worker and
delivers the features (or maps) inline or over the bulk channel.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np

from rmidl.datasets import from_dict
from rmidl.errors import BudgetExceeded, NonFiniteInput, ShapeError
from rmidl.network import Network
from rmidl.network._stage import add_time
from rmidl.remote.blobs import Blob
from rmidl.remote.bulk import BulkServer
from rmidl.remote.contract import BulkTicket, Result
from rmidl.remote.features import FeaturesReply, FeaturesTask
from rmidl.validate import first_non_finite

__all__ = ["FeaturesHandler"]

Reserve = Callable[[int, int], AbstractContextManager[None]]
"""(bytes, task id) -> a context holding that much of the worker's memory budget."""
Count = Callable[[str, Blob, int], None]
"""(blob id, network blob, bytes its built network keeps) -> counted in the worker's blob cache."""


class FeaturesHandler:
    """Runs parsed features tasks for one worker (thread-safe; the worker holds its compute lock)."""

    def __init__(self, *, threads: int, computing: Callable[[], AbstractContextManager[None]],
                 reserve: Reserve, count: Count, room: Callable[[Blob], int], bulk: BulkServer | None,
                 name: str, max_message_size: int, reply_framing: int) -> None:
        self._threads = threads
        self._inline_limit = max_message_size - reply_framing
        self._computing = computing
        self._reserve = reserve
        self._count = count
        self._room = room
        self._bulk = bulk
        self._name = name
        # A built network lives as long as its blob (in the cache, or in a task still running), and what
        # its stages keep (kernel spectra) is counted in the blob's bytes after each task.
        self._networks: weakref.WeakKeyDictionary[Blob, Network] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def network(self, blob: Blob, blob_id: str) -> Network:
        """The network of a cached blob, built once (its check already ran when it was put)."""
        with self._lock:
            net = self._networks.get(blob)
        if net is None:
            net = blob.as_network(f"network {blob_id!r}")
            net.limit_kept(self._room(blob))
            with self._lock:
                net = self._networks.setdefault(blob, net)
        return net

    def run(self, task: FeaturesTask, blob: Blob) -> FeaturesReply:
        net = self.network(blob, task.network_id)
        try:
            return self._run(task, net)
        finally:
            self._count(task.network_id, blob, _held_bytes(net, blob))

    def _run(self, task: FeaturesTask, net: Network) -> FeaturesReply:
        s0, s1 = task.stages
        if s1 > len(net.stages):
            raise ShapeError(f"task {task.task_id}: stages [{s0}, {s1}) go past the network's last stage "
                             f"({len(net.stages)})")
        if task.output == "bulk" and self._bulk is None:
            raise ShapeError(f"task {task.task_id}: worker {self._name} has no bulk channel")
        timings: dict[str, float] = {}
        ids, bad, maps = self._input(task, net, timings)
        if maps is None:  # every image of the batch was bad (skip_bad)
            if s0 != 0 or s1 != len(net.stages):
                raise ShapeError(f"task {task.task_id}: an empty batch only goes through every stage")
            width = net.output_shape(self._image_shape(task))[0]
            return FeaturesReply(task.task_id, 0.0, (), timings, bad, np.empty((0, width), np.float32))
        need = (maps.shape[0] * net.peak_bytes(maps.shape[1:], s0, s1)
                + net.scratch_bytes(maps.shape[1:], self._threads, s0, s1, batch=maps.shape[0]))
        with self._reserve(need, task.task_id), self._computing():
            out = net.forward_stages(maps, s0, s1, threads=self._threads, timings=timings)
            if s1 == len(net.stages):
                start = time.perf_counter()
                out = net.flatten(out)
                add_time(timings, "FLAT", time.perf_counter() - start)
        return FeaturesReply(task.task_id, 0.0, ids, timings, bad, self._deliver(out, task.output))

    def _input(self, task: FeaturesTask, net: Network, timings: dict[str, float]
               ) -> tuple[tuple[int, ...], tuple[tuple[int, str], ...], np.ndarray | None]:
        """(ids computed, bad images, maps entering stage s0) of the task's batch."""
        s0 = task.stages[0]
        if isinstance(task.source, dict):
            dataset = from_dict(task.source)
            if tuple(int(i) for i in dataset.ids) != task.ids:
                raise ShapeError(f"task {task.task_id}: its dataset describes other images than its ids")
            try:
                batch = dataset.read(timings=timings)
            finally:
                dataset.close()
            bad = tuple((i, why) for i, why in sorted(dataset.bad.items()) if i in set(task.ids))
            if not len(batch):
                return (), bad, None
            images, ids = batch.images, tuple(int(i) for i in batch.ids)
        else:
            images, ids, bad = task.source, task.ids, ()
            if not len(images):  # the coordinator found every image of the batch bad
                return (), (), None
        start = time.perf_counter()
        if s0 == 0:
            maps = net.to_maps(images)
        else:
            maps = np.asarray(images)
            if maps.ndim != 4 or maps.dtype != np.float32:
                raise ShapeError(f"task {task.task_id}: maps entering stage {s0 + 1} are float32 "
                                 f"(n, C, H, W), got {maps.dtype} {maps.shape}")
            problem = first_non_finite(maps)
            if problem is not None:
                raise NonFiniteInput(f"task {task.task_id}: maps entering stage {s0 + 1} contain {problem}")
        add_time(timings, f"CNP{s0 + 1}", time.perf_counter() - start)
        return ids, bad, maps

    @staticmethod
    def _image_shape(task: FeaturesTask) -> tuple[int, ...]:
        if isinstance(task.source, np.ndarray):
            return tuple(task.source.shape[1:])
        return tuple(int(v) for v in task.source["shape"])

    def _deliver(self, out: np.ndarray, output: str) -> Result:
        if output == "inline":
            if out.nbytes > self._inline_limit:
                raise BudgetExceeded(f"inline result of {out.nbytes} bytes does not fit the max_message_size "
                                     f"of worker {self._name} (use 'bulk' output or smaller batches)")
            return out
        assert self._bulk is not None
        out = np.ascontiguousarray(out)
        return BulkTicket(self._bulk.offer(out), int(out.nbytes), out.shape, out.dtype.name)


def _held_bytes(net: Network, blob: Blob) -> int:
    """What a built network holds beyond its blob's arrays: its stages' own copies of the banks and what
    they keep for their engine calls (kernel spectra)."""
    arrays = list(blob.arrays.values())
    copies = sum(stage.bank.nbytes for stage in net.stages
                 if not any(np.may_share_memory(stage.bank, array) for array in arrays))
    return copies + net.kept_bytes
