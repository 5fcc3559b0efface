"""Partitioning by cost model: how many tasks, row bands or kernel groups, and per-task deadlines."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from rmidl.errors import BudgetExceeded
from rmidl.geometry import Task, plan_tasks

__all__ = [
    "Capacity",
    "Plan",
    "deadline",
    "local_gflops",
    "plan",
    "task_flops",
    "task_out_bytes",
]

log = logging.getLogger(__name__)

# Fallback rate (GFLOP/s per core) when the engine cannot measure one; deliberately modest so that
# deadlines derived from it err on the long side.
FALLBACK_GFLOPS = 10.0
# Below this many rows a band spends too much on its halo and on per-call overhead: split kernels instead.
MIN_BAND_ROWS = 8
# Kernel groups smaller than this starve the engine's GEMM of columns.
MIN_GROUP = 8
# Tasks per consumer: enough that a slow or lost consumer costs a fraction of the job, not half of it.
TASKS_PER_CONSUMER = 4


@dataclass(frozen=True)
class Capacity:
    """One consumer of the pull queue: a local thread, or a remote worker (all its cores)."""

    name: str
    gflops: float
    """Engine rate of the consumer (GFLOP/s), over all its cores."""
    cores: int = 1
    overhead_s: float = 0.0
    """Fixed cost of one task on it (a Pyro5 round trip), which small tasks must amortise."""
    bytes_per_s: float | None = None
    """Data-plane rate for its results; None = shared memory (nothing to move)."""


@dataclass(frozen=True)
class Plan:
    tasks: list[Task]
    band: int
    group: int
    flops: float
    """Floating-point operations of the whole job (2 per multiply-add)."""


@functools.cache
def local_gflops() -> float:
    """This machine's single-thread engine rate, measured once per process (a machine constant)."""
    try:
        from rmidl.kernels import measure_gflops
    except ImportError:
        return FALLBACK_GFLOPS
    try:
        return float(measure_gflops(threads=1))
    except Exception as error:  # a failed calibration must not fail a job: fall back to a modest rate
        log.debug("calibration failed (%s); assuming %.0f GFLOP/s", error, FALLBACK_GFLOPS)
        return FALLBACK_GFLOPS


def task_flops(task: Task, kernel_shape: Sequence[int], out_w: int) -> float:
    """Operations of one task on a (K, kh, kw, C) bank: 2 per multiply-add."""
    _, kh, kw, c = kernel_shape
    return 2.0 * kh * kw * c * task.out_elements(out_w)


def task_out_bytes(task: Task, out_w: int, itemsize: int) -> int:
    return task.out_elements(out_w) * itemsize


def plan(
    out_shape: Sequence[int],
    kernel_shape: Sequence[int],
    consumers: Sequence[Capacity],
    *,
    itemsize: int = 4,
    max_task_bytes: int = 64 << 20,
    max_band_rows: int | None = None,
    min_tasks: int = 1,
) -> Plan:
    """Cut a (K, OH, OW) output into tasks sized by the consumers' rates and overheads.

    The count aims at TASKS_PER_CONSUMER tasks per core of every consumer (load balance, cheap
    re-runs after a fault), but no more than keeps each task at least ~20 round trips long. Every task's
    result stays under `max_task_bytes` and its band under `max_band_rows` output rows (hard limits: a
    message above a worker's size limit is refused). Row bands come first (a band ships its input
    once for all kernels); kernel groups only when bands would get thinner than MIN_BAND_ROWS.
    """
    k, out_h, out_w = (int(n) for n in out_shape)
    flops = 2.0 * math.prod(int(n) for n in kernel_shape[1:]) * k * out_h * out_w
    cores = sum(max(1, c.cores) for c in consumers) or 1
    rate = sum(c.gflops for c in consumers) * 1e9 or FALLBACK_GFLOPS * 1e9
    # Job time on all consumers if nothing but compute counted; a task on one core takes cores/n of it.
    job_s = flops / rate
    overhead = max((c.overhead_s for c in consumers), default=0.0)
    balance = TASKS_PER_CONSUMER * cores
    worth_it = math.floor(job_s * cores / (20 * overhead)) if overhead > 0 else balance
    by_size = math.ceil(k * out_h * out_w * itemsize / max(1, max_task_bytes))
    n = max(1, min_tasks, by_size, min(balance, max(1, worth_it)))
    n = min(n, k * out_h)

    bands = min(n, max(1, out_h // MIN_BAND_ROWS))
    groups = min(k, max(1, math.ceil(n / bands)))
    if groups > 1 and k // groups < MIN_GROUP and k >= MIN_GROUP and n <= out_h:
        # Thin kernel groups hurt more than thin bands: prefer bands down to one row.
        bands, groups = n, 1
    band = math.ceil(out_h / bands)
    group = math.ceil(k / groups)
    band, group = _within_limits(band, group, out_w * itemsize, max_task_bytes, max_band_rows)
    tasks = plan_tasks(out_h, k, band=band, group=group)
    log.debug(
        "plan: %d tasks (band %d rows x group %d kernels) for %.2f GFLOP on %d cores",
        len(tasks), band, group, flops / 1e9, cores,
    )
    return Plan(tasks, band, group, flops)


def _within_limits(band: int, group: int, row_bytes: int, max_task_bytes: int,
                   max_band_rows: int | None) -> tuple[int, int]:
    """Shrink (band, group) until one task's result fits `max_task_bytes` and its band `max_band_rows`:
    bands first down to MIN_BAND_ROWS, then kernel groups, then bands down to one row."""
    if max_band_rows is not None:
        band = max(1, min(band, max_band_rows))
    while band * group * row_bytes > max_task_bytes:
        if band > MIN_BAND_ROWS:
            band = max(MIN_BAND_ROWS, band // 2)
        elif group > 1:
            group = math.ceil(group / 2)
        elif band > 1:
            band = math.ceil(band / 2)
        else:
            raise BudgetExceeded(
                f"one output row of one kernel is {row_bytes} bytes, over the per-task limit of "
                f"{max_task_bytes} bytes (raise max_message_size)"
            )
    return band, group


def deadline(
    task: Task,
    kernel_shape: Sequence[int],
    out_w: int,
    consumer: Capacity,
    *,
    floor: float,
    itemsize: int = 4,
    factor: float = 10.0,
) -> float:
    """Seconds one task may take on `consumer` before it counts as hung: `factor` x the cost model
    (compute at its rate + moving its result + a round trip), never below `floor`."""
    compute = task_flops(task, kernel_shape, out_w) / max(consumer.gflops * 1e9, 1.0)
    moving = 0.0
    if consumer.bytes_per_s:
        moving = task_out_bytes(task, out_w, itemsize) / consumer.bytes_per_s
    return max(floor, factor * (compute + moving + consumer.overhead_s))
