"""The scaling study behind `rmidl bench`: time one job per configuration, checking every result first.

A configuration is either a core count (the in-process engine, `rmidl.correlate(threads=N)`) or a worker
count driven through the Coordinator (a local cluster of that size, or the first N workers of --ns).
Each run's output is compared with a single-thread reference before its time counts, so a fast wrong
answer never enters a table. The records it fills are in `results.py`, the machine's description in
`machine.py`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from Pyro5.errors import PyroError

from rmidl.client.bench.machine import machine_info
from rmidl.client.bench.results import (
    Configuration,
    ConfigurationResult,
    Job,
    StudyResult,
    StudySettings,
    job_of,
)
from rmidl.errors import RmidlError
from rmidl.kernels import available_cores

__all__ = [
    "Correlate",
    "OnRun",
    "RELATIVE_TOLERANCE",
    "configurations",
    "feature_stage_seconds",
    "max_abs_difference",
    "run_study",
]

logger = logging.getLogger(__name__)

RELATIVE_TOLERANCE = 1e-5
"""A run is correct when max|out - ref| <= RELATIVE_TOLERANCE * max|ref| (the engine's exactness bar)."""

Correlate = Callable[[np.ndarray, np.ndarray, str], np.ndarray]
"""(image, kernels, mode) -> (K, OH, OW): what one configuration runs."""


def configurations(settings: StudySettings, available: int | None = None) -> list[Configuration]:
    """Table III's columns: every core count (oversubscribed ones marked, kept), then every worker count
    (local clusters; with --ns, that many workers of its name server), then without worker counts the
    whole --ns cluster if one was given. Zero workers is the coordinator's local pool alone."""
    available = available_cores() if available is None else available
    configs = [
        Configuration("cores", c, c, f"{c} core" + ("s" if c != 1 else ""), c > available)
        for c in settings.cores
    ]
    for w in settings.workers:
        local = settings.local_threads if w else max(1, settings.local_threads)
        label = f"{w} worker" + ("s" if w != 1 else "")
        if local and w:
            label += f" + {local} local"
        if settings.ns and w:
            # The workers' threads are theirs to say (details["threads"]), not --threads-per-worker's.
            configs.append(Configuration("cluster", w, 0, f"{label} at {settings.ns}"))
            continue
        threads = w * settings.threads_per_worker + local
        configs.append(Configuration("workers", w, threads, label, threads > available))
    if settings.ns and not settings.workers:
        configs.append(Configuration("cluster", 0, 0, f"cluster at {settings.ns}"))
    return configs


def max_abs_difference(result: np.ndarray, reference: np.ndarray) -> float:
    """max|result - reference|, one kernel's map at a time so no second full-size temporary is made."""
    if result.shape != reference.shape:
        raise RmidlError(f"result shape {result.shape} differs from the reference's {reference.shape}")
    worst = 0.0
    for got, want in zip(result, reference, strict=True):
        worst = max(worst, float(np.max(np.abs(got - want))))
    return worst


def feature_stage_seconds(maps: np.ndarray, *, pool: int = 2, repeat: int = 3,
                          clock: Callable[[], float] = time.perf_counter) -> float | None:
    """One core's seconds (best of `repeat`) to turn a job's maps (K, OH, OW) into the feature pipeline's
    features: relu and a `pool` x `pool` max pool, as a CNP stage does beside its correlation (the cost
    model's features predictions add it to the correlation's compute); None for maps the window does not
    fit."""
    from rmidl.network import Stage

    if min(maps.shape[1:]) < pool:
        return None
    stage = Stage(np.zeros((maps.shape[0], 1, 1, 1), np.float32), activation="relu", pool="max",
                  pool_size=pool)
    best = float("inf")
    for _ in range(max(1, repeat)):
        start = clock()
        stage.activate_and_pool(maps[None], 1, None, "features")
        best = min(best, clock() - start)
    return best


@contextlib.contextmanager
def _engine_runner(threads: int) -> Iterator[Correlate]:
    import rmidl

    yield lambda image, kernels, mode: rmidl.correlate(image, kernels, mode=mode, threads=threads)


@contextlib.contextmanager
def _coordinator_runner(config: Configuration, settings: StudySettings) -> Iterator[Correlate]:
    """A Coordinator over a fresh local cluster of `config.count` workers (none: its local pool alone),
    or over the first `config.count` workers of the name server given with --ns (0: all of them)."""
    from rmidl.client import Coordinator
    from rmidl.client.localcluster import LocalCluster

    with contextlib.ExitStack() as stack:
        workers = None
        secured = settings.config
        if config.kind == "cluster":
            ns, local, workers = settings.ns, settings.local_threads, config.count or None
        elif config.count:
            cluster = stack.enter_context(
                LocalCluster(workers=config.count, threads_per_worker=settings.threads_per_worker,
                             die_with_parent=True, secure=True)
            )
            ns, local, secured = cluster.address, settings.local_threads, cluster.config
        else:
            ns, local = None, max(1, settings.local_threads)
        coordinator = stack.enter_context(
            Coordinator(ns=ns, local_threads=local, shared_memory=settings.shared_memory, workers=workers,
                        config=secured)
        )
        yield _CoordinatorCall(coordinator)


class _CoordinatorCall:
    """Coordinator.correlate as a Correlate, keeping what the coordinator says about its last job."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator

    def __call__(self, image: np.ndarray, kernels: np.ndarray, mode: str) -> np.ndarray:
        return self.coordinator.correlate(image, kernels, mode=mode)  # type: ignore[no-any-return]

    def details(self) -> dict[str, Any]:
        """Workers used and the last job's task figures, for results.json and the cost model."""
        last = dict(getattr(self.coordinator, "last_job", dict)())
        keep = {
            k: v for k, v in last.items() if isinstance(v, (int, float, str, bool, dict, list)) or v is None
        }
        workers = self.coordinator.workers()
        threads = sum(int(w.get("threads") or 0) for w in workers) + int(self.coordinator.local_threads or 0)
        return {"workers": len(workers), "threads": threads, "last_job": keep}


def _runner(config: Configuration, settings: StudySettings) -> contextlib.AbstractContextManager[Correlate]:
    if config.kind == "cores":
        return _engine_runner(config.threads)
    return _coordinator_runner(config, settings)


OnRun = Callable[[Configuration, int, float], None]
"""Progress callback: (configuration, run index from 0, seconds) after every timed run."""


def run_study(
    image: np.ndarray,
    kernels: np.ndarray,
    settings: StudySettings,
    *,
    job: Job | None = None,
    on_run: OnRun | None = None,
    runner: Callable[[Configuration, StudySettings], contextlib.AbstractContextManager[Correlate]] = _runner,
    clock: Callable[[], float] = time.perf_counter,
) -> StudyResult:
    """Run every configuration `settings.runs` times; a run counts only if its output matches the reference.

    The reference is one single-thread engine run, timed after one untimed run unless `settings.warmup`
    is 0 (it is the baseline when no 1-core configuration runs; a cold first call made a small job's look
    ~80x too slow). Each configuration first runs `settings.warmup` times untimed (thread pools,
    connections, bank uploads), checked like the timed runs.
    A configuration that fails (cluster error, wrong result) is recorded with the reason, not dropped.
    """
    import rmidl

    job = job or job_of(image, kernels, settings.mode)
    for _ in range(min(1, settings.warmup)):
        rmidl.correlate(image, kernels, mode=settings.mode, threads=1)
    start = clock()
    reference = rmidl.correlate(image, kernels, mode=settings.mode, threads=1)
    reference_seconds = clock() - start
    tolerance = RELATIVE_TOLERANCE * float(np.max(np.abs(reference)))
    logger.info("reference (1 thread): %.3f s, tolerance %.3g", reference_seconds, tolerance)
    seconds = feature_stage_seconds(reference, clock=clock)
    stage = None if seconds is None else {"seconds": seconds, "threads": 1,
                                          "what": "relu and a 2x2 max pool of the reference maps"}
    results = []
    for config in configurations(settings):
        result = ConfigurationResult(config, tolerance=tolerance, verified=True)
        results.append(result)
        try:
            _run_configuration(
                result,
                image=image,
                kernels=kernels,
                reference=reference,
                settings=settings,
                on_run=on_run,
                runner=runner,
                clock=clock,
            )
        except (RmidlError, PyroError, OSError) as error:
            # one configuration's cluster trouble is recorded against it; the study goes on
            result.failure = f"{type(error).__name__}: {error}"
            logger.warning("%s failed: %s", config.label, result.failure)
    return StudyResult(machine_info(), job, settings.to_dict(), reference_seconds, results,
                       extra={"feature_stage": stage})


def _run_configuration(
    result: ConfigurationResult,
    *,
    image: np.ndarray,
    kernels: np.ndarray,
    reference: np.ndarray,
    settings: StudySettings,
    on_run: OnRun | None,
    runner: Callable[[Configuration, StudySettings], contextlib.AbstractContextManager[Correlate]],
    clock: Callable[[], float],
) -> None:
    config = result.config
    start = clock()
    with runner(config, settings) as correlate:
        result.setup_seconds = clock() - start
        for index in range(-settings.warmup, settings.runs):
            start, cpu = clock(), time.process_time()
            output = correlate(image, kernels, settings.mode)
            seconds, cpu = clock() - start, time.process_time() - cpu
            error = max_abs_difference(output, reference)
            del output  # before the next run allocates its own: two full outputs can be large
            result.max_abs_error = max(result.max_abs_error, error)
            if error > result.tolerance:
                result.verified = False
                which = f"run {index + 1}" if index >= 0 else "warm-up run"
                result.failure = (
                    f"{which} differs from the single-thread result by {error:.3g} "
                    f"(tolerance {result.tolerance:.3g}); its timings do not count"
                )
                logger.warning("%s: %s", config.label, result.failure)
                return
            if index < 0:
                result.warmup_times.append(seconds)
                continue
            result.times.append(seconds)
            result.cpu_times.append(cpu)
            logger.debug("%s run %d: %.4f s", config.label, index + 1, seconds)
            if on_run is not None:
                on_run(config, index, seconds)
        details = getattr(correlate, "details", None)
        if callable(details):
            result.details = details()
