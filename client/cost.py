"""The cost model of distributed work: consumers' rates, per-task overhead, data-plane rates, tasks per core.

One place that the planner (how many tasks), the task deadlines (when a task counts as hung) and the bench
predictor (what N nodes would take) all read. A task costs compute (its flops at the consumer's rate) plus
moving its bytes (at the consumer's data-plane rate; nothing over shared memory) plus one round trip.
Which engine runs and how fast it is on a given shape is the engines' own model, `rmidl.kernels._cost`,
reached through `rmidl.kernels.measure_gflops` and `estimate_seconds`.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

__all__ = [
    "BULK_BYTES_PER_S",
    "BULK_SETUP_S",
    "DEADLINE_FACTOR",
    "FALLBACK_GFLOPS",
    "INLINE_BYTES_PER_S",
    "MAX_TASK_BYTES",
    "MIN_ROUND_TRIPS",
    "ROUND_TRIP_S",
    "TASKS_PER_CORE",
    "Capacity",
    "TaskCost",
    "balanced_tasks",
    "bulk_pays",
    "deadline",
    "local_gflops",
    "task_seconds",
]

log = logging.getLogger(__name__)

FALLBACK_GFLOPS = 10.0
"""Rate (GFLOP/s per core) assumed when the engine cannot measure one; modest, so deadlines err long."""
TASKS_PER_CORE = 4
"""Tasks per core of every consumer: enough that a slow or lost consumer costs a fraction of the job."""
MIN_ROUND_TRIPS = 20
"""A task is kept at least this many round trips long, so its fixed cost stays a few percent."""
ROUND_TRIP_S = 0.002
"""Round trip assumed for a remote worker until its ping is timed (a LAN hop plus Pyro5's framing)."""
BULK_BYTES_PER_S = 1.0e9
"""Results over the bulk side channel (measured on the 2-core dev box, see issue 3)."""
INLINE_BYTES_PER_S = 0.25e9
"""Arrays inline in a Pyro5 message (msgpack framing and one more copy each way)."""
BULK_SETUP_S = 3e-3
"""What one bulk fetch costs besides its bytes (a connection, the channel's handler thread, the ticket):
2-5 ms measured on the loaded 2-core dev box, where inline replies were faster below ~1 MB."""
MAX_TASK_BYTES = 64 << 20
"""Largest result of one task: more tasks than the balance asks for when the output is big (the planner
cuts by it; the bench predictor counts tasks the same way)."""
DEADLINE_FACTOR = 10.0
"""A task counts as hung after this many times its modelled seconds (and never before the floor)."""


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
    """Data-plane rate for its inputs and results; None = shared memory (nothing to move)."""


@dataclass(frozen=True)
class TaskCost:
    """What one task asks of a consumer: floating-point operations and the bytes it moves each way."""

    flops: float
    input_bytes: int = 0
    result_bytes: int = 0


@functools.cache
def local_gflops() -> float:
    """This machine's single-thread engine rate, measured once per process (a machine constant)."""
    try:
        from rmidl.kernels import measure_gflops

        return float(measure_gflops(threads=1))
    except Exception as error:  # a failed calibration must not fail a job: fall back to a modest rate
        log.debug("calibration failed (%s); assuming %.0f GFLOP/s", error, FALLBACK_GFLOPS)
        return FALLBACK_GFLOPS


def task_seconds(cost: TaskCost, consumer: Capacity) -> float:
    """Modelled seconds of one task on `consumer`: compute + moving its bytes + one round trip."""
    compute = cost.flops / max(consumer.gflops * 1e9, 1.0)
    moving = 0.0
    if consumer.bytes_per_s:
        moving = (cost.input_bytes + cost.result_bytes) / consumer.bytes_per_s
    return compute + moving + consumer.overhead_s


def deadline(cost: TaskCost, consumer: Capacity, *, floor: float, factor: float = DEADLINE_FACTOR) -> float:
    """Seconds one task may take on `consumer` before it counts as hung: `factor` x the model, >= `floor`."""
    return max(floor, factor * task_seconds(cost, consumer))


def balanced_tasks(job_seconds: float, cores: int, overhead_s: float) -> int:
    """Tasks to cut a job into: TASKS_PER_CORE per core, but no more than keeps each task at least
    MIN_ROUND_TRIPS round trips long. `job_seconds` is the job's compute time on all `cores` together."""
    balance = TASKS_PER_CORE * max(1, cores)
    if overhead_s <= 0:
        return balance
    # A task on one core takes job_seconds * cores / n.
    worth_it = math.floor(job_seconds * max(1, cores) / (MIN_ROUND_TRIPS * overhead_s))
    return min(balance, max(1, worth_it))


def bulk_pays(nbytes: int, round_trip_s: float) -> bool:
    """Whether a result of `nbytes` comes faster over the bulk channel (its own connection: a round trip
    and BULK_SETUP_S more) than inline in the reply."""
    return nbytes / INLINE_BYTES_PER_S - nbytes / BULK_BYTES_PER_S > BULK_SETUP_S + round_trip_s
