"""The worker's gradient task: some shards of one training step, at weights and on data it already holds."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager

import numpy as np

from rmidl.dataparallel import ShardData, compute_shard
from rmidl.errors import BankError, BudgetExceeded, ShapeError
from rmidl.mlp import GradientSums
from rmidl.remote.blobs import Blob
from rmidl.remote.bulk import BulkServer
from rmidl.remote.contract import BulkTicket, Result, ShmRef
from rmidl.remote.gradient import REPLY_FRAMING, GradientReply, GradientTask

__all__ = ["run_gradient"]


def _cached(blob_of: Callable[[str], Blob | None], blob_id: str, kind: str, worker: str) -> Blob:
    blob = blob_of(blob_id)
    if blob is None or blob.kind != kind:
        raise BankError(f"{kind} {blob_id!r} is not cached on worker {worker} (put it again)")
    return blob


def run_gradient(
    task: GradientTask,
    *,
    blob_of: Callable[[str], Blob | None],
    attach: Callable[[ShmRef], np.ndarray],
    computing: Callable[[], AbstractContextManager[object]],
    threads: int,
    bulk: BulkServer | None,
    max_message_size: int,
    worker: str,
) -> GradientReply:
    """Compute the task's shards (on up to `threads` threads, inside `computing()`, the worker's
    one-task-at-a-time section) from the blobs `blob_of` finds; the gradients inline, offered in bulk, or
    written into their rows of the shared block `attach` maps."""
    vector = _cached(blob_of, task.weights_id, "weights", worker).arrays["weights"]
    if vector.shape != (task.spec.parameter_count,):
        raise ShapeError(f"gradient task {task.task_id}: weights {task.weights_id!r} hold {vector.size} "
                         f"values; sizes {task.spec.sizes} need {task.spec.parameter_count}")
    data = []
    for shard, blob_id in task.shards:
        blob = _cached(blob_of, blob_id, "shard", worker)
        if blob.settings["shard"] != shard:
            raise ShapeError(f"gradient task {task.task_id}: blob {blob_id!r} holds shard "
                             f"{blob.settings['shard']}, not {shard}")
        data.append(ShardData(blob.arrays["x"], blob.arrays["y"].astype(np.int64)))
    nbytes = int(np.prod(task.result_shape)) * 8
    if task.output == "inline" and nbytes + REPLY_FRAMING > max_message_size:
        raise BudgetExceeded(f"gradient task {task.task_id}: {nbytes} bytes of gradients do not fit this "
                             f"worker's max_message_size of {max_message_size} bytes (use 'bulk')")
    if task.output == "bulk" and bulk is None:
        raise ShapeError(f"gradient task {task.task_id}: worker {worker} has no bulk channel")
    shared = attach(task.output) if isinstance(task.output, ShmRef) else None
    gradients = np.empty(task.result_shape) if shared is None else shared
    rows = list(range(len(data))) if shared is None else list(task.shard_ids)
    parts: list[GradientSums | None] = [None] * len(data)

    def work(i: int) -> None:
        shard = task.shards[i][0]
        part = compute_shard(vector, data[i], plan=task.plan, spec=task.spec, step=task.step, shard=shard)
        gradients[rows[i]] = part.grad_sum
        parts[i] = part

    with computing():
        started = time.perf_counter()
        if min(threads, len(data)) <= 1:
            for i in range(len(data)):
                work(i)
        else:  # shards are independent: one per thread (each part pins BLAS to its thread)
            with ThreadPoolExecutor(min(threads, len(data)), thread_name_prefix="rmidl-gradient") as pool:
                list(pool.map(work, range(len(data))))
        seconds = time.perf_counter() - started
    done = [part for part in parts if part is not None]
    result: Result = gradients if shared is None else None
    if task.output == "bulk":
        assert bulk is not None
        result = BulkTicket(bulk.offer(gradients), nbytes, task.result_shape, "float64")
    return GradientReply(task.task_id, seconds, task.shard_ids, tuple(p.loss_sum for p in done),
                         tuple(p.count for p in done), tuple(p.correct for p in done), result)
