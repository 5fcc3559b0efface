"""Cutting a correlation into tasks by the cost model (`rmidl.client.cost`): image groups (of a batch), row
bands, kernel groups."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from rmidl.errors import BudgetExceeded
from rmidl.geometry import Task, plan_tasks

from .cost import FALLBACK_GFLOPS, MAX_TASK_BYTES, Capacity, balanced_tasks

__all__ = ["MIN_BAND_ROWS", "MIN_GROUP", "SMALL_WORKER", "Plan", "plan", "task_bytes_for"]

log = logging.getLogger(__name__)

MIN_BAND_ROWS = 8
"""Below this many rows a band spends too much on its halo and on per-call overhead: split kernels instead."""
MIN_GROUP = 8
"""Kernel groups smaller than this starve the engine's GEMM of columns."""
SMALL_WORKER = 16
"""A worker whose room for one task is under 1/SMALL_WORKER of the planned task size does not shrink
every task of the job: it takes the tasks that fit it (none, if none does) and the others the rest."""


@dataclass(frozen=True)
class Plan:
    tasks: list[Task]
    band: int
    group: int
    flops: float
    """Floating-point operations of the whole job (2 per multiply-add)."""
    images: int = 1
    """Images of a batch per task (1 for a job of one image)."""


def plan(
    out_shape: Sequence[int],
    kernel_shape: Sequence[int],
    consumers: Sequence[Capacity],
    *,
    itemsize: int = 4,
    max_task_bytes: int = MAX_TASK_BYTES,
    max_band_rows: int | None = None,
    min_tasks: int = 1,
    images: int = 1,
) -> Plan:
    """Cut a (K, OH, OW) output of each of `images` images into tasks sized by the consumers' rates and
    overheads.

    The count is the cost model's `balanced_tasks` (TASKS_PER_CORE per core of every consumer, but no
    more than keeps each task MIN_ROUND_TRIPS round trips long). Every task's
    result stays under `max_task_bytes` and its band under `max_band_rows` output rows (hard limits: a
    message above a worker's size limit is refused; a task of several images holds no more input rows
    than one band of that size). Whole images come first when a batch has enough of them (a task then
    ships no halo), then row bands (a band ships its input once for all kernels); kernel groups only
    when bands would get thinner than MIN_BAND_ROWS.
    """
    k, out_h, out_w = (int(n) for n in out_shape)
    flops = 2.0 * math.prod(int(n) for n in kernel_shape[1:]) * k * out_h * out_w * images
    cores = sum(max(1, c.cores) for c in consumers) or 1
    rate = sum(c.gflops for c in consumers) * 1e9 or FALLBACK_GFLOPS * 1e9
    # Job time on all consumers if nothing but compute counted.
    job_s = flops / rate
    overhead = max((c.overhead_s for c in consumers), default=0.0)
    by_size = math.ceil(images * k * out_h * out_w * itemsize / max(1, max_task_bytes))
    n = max(1, min_tasks, by_size, balanced_tasks(job_s, cores, overhead))
    n = min(n, images * k * out_h)
    per_task = _images_per_task(images, n, image_bytes=k * out_h * out_w * itemsize,
                                max_task_bytes=max_task_bytes, max_band_rows=max_band_rows, out_h=out_h,
                                kh=int(kernel_shape[1]))
    if per_task > 1:
        tasks = plan_tasks(out_h, k, band=out_h, group=k, n_images=images, images=per_task)
        log.debug("plan: %d tasks of %d images for %.2f GFLOP on %d cores", len(tasks), per_task,
                  flops / 1e9, cores)
        return Plan(tasks, out_h, k, flops, per_task)
    n = math.ceil(n / images)  # tasks per image, by rows and kernels

    bands = min(n, max(1, out_h // MIN_BAND_ROWS))
    groups = min(k, max(1, math.ceil(n / bands)))
    if groups > 1 and k // groups < MIN_GROUP and k >= MIN_GROUP and n <= out_h:
        # Thin kernel groups hurt more than thin bands: prefer bands down to one row.
        bands, groups = n, 1
    band = math.ceil(out_h / bands)
    group = math.ceil(k / groups)
    band, group = _within_limits(band, group, out_w * itemsize, max_task_bytes, max_band_rows)
    tasks = plan_tasks(out_h, k, band=band, group=group, n_images=images)
    log.debug(
        "plan: %d tasks (band %d rows x group %d kernels) for %.2f GFLOP on %d cores",
        len(tasks), band, group, flops / 1e9, cores,
    )
    return Plan(tasks, band, group, flops)


def _images_per_task(images: int, n: int, *, image_bytes: int, max_task_bytes: int,
                     max_band_rows: int | None, out_h: int, kh: int) -> int:
    """Whole images per task for `n` tasks of `images`, within the per-task limits; 1 when there are too
    few images for `n` tasks or a whole image is over a limit (its tasks are then bands and groups)."""
    if images < n:
        return 1
    per_task = images // n  # at least n tasks
    per_task = min(per_task, max_task_bytes // max(1, image_bytes))
    if max_band_rows is not None:
        per_task = min(per_task, (max_band_rows + kh - 1) // (out_h + kh - 1))
    return max(1, per_task)


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



def task_bytes_for(max_task_bytes: int, rooms: Sequence[int], least: int, *, unbounded: bool) -> int:
    """The largest result (bytes) to plan one task for, given what each worker taking results over TCP
    has room for per task (`rooms`: its output budget over the tasks it holds at once): tasks fit every
    worker, except ones far smaller than the rest (SMALL_WORKER), and those that cannot hold `least`
    bytes (one row of one kernel) at all. `unbounded`: someone else (the local pool, a shared-memory
    worker) holds any task, so only workers within reach shrink the plan."""
    usable = [room for room in rooms if room >= least]
    if not usable:
        return max_task_bytes
    near = [room for room in usable if room * SMALL_WORKER >= max_task_bytes]
    if near:
        return max(least, min(max_task_bytes, *near))
    # Every worker is far smaller than the plan: fit the largest, unless someone else can hold any task.
    return max_task_bytes if unbounded else max(least, min(max_task_bytes, max(usable)))
