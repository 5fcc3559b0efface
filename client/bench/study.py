"""The scaling study behind `rmidl bench`: time one job per configuration, checking every result first.

A configuration is either a core count (the in-process engine, `rmidl.correlate(threads=N)`) or a worker
count driven through the Coordinator (a local cluster of that size, or the first N workers of --ns).
Each run's output is compared with a single-thread reference before its time counts, so a fast wrong
answer never enters a table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from Pyro5.errors import PyroError

from rmidl.errors import RmidlError
from rmidl.geometry import output_shape

__all__ = [
    "Configuration",
    "ConfigurationResult",
    "Job",
    "SCHEMA",
    "StudyResult",
    "StudySettings",
    "configurations",
    "job_of",
    "machine_info",
    "max_abs_difference",
    "run_study",
    "usable_cores",
]

logger = logging.getLogger(__name__)

SCHEMA = 1
"""Version of the results.json layout; bump when a key changes meaning."""

RELATIVE_TOLERANCE = 1e-5
"""A run is correct when max|out - ref| <= RELATIVE_TOLERANCE * max|ref| (the engine's exactness bar)."""

Correlate = Callable[[np.ndarray, np.ndarray, str], np.ndarray]
"""(image, kernels, mode) -> (K, OH, OW): what one configuration runs."""


@dataclass(frozen=True)
class Configuration:
    """One column of Table III: `kind` "cores" (engine alone), "workers" (a local cluster through the
    coordinator) or "cluster" (the workers of the name server given with --ns: the first `count` in name
    order, or all of them when `count` is 0)."""

    kind: str
    count: int
    threads: int
    label: str
    oversubscribed: bool = False


@dataclass
class ConfigurationResult:
    """Every timed run of one configuration, and how its output compared with the reference."""

    config: Configuration
    times: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0
    warmup_times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    max_abs_error: float = 0.0
    tolerance: float = 0.0
    verified: bool = False
    failure: str | None = None

    @property
    def counted(self) -> bool:
        """True when the timings may enter the tables (checked and complete)."""
        return self.verified and self.failure is None and bool(self.times)

    @property
    def total(self) -> float:
        return float(sum(self.times))

    @property
    def average(self) -> float:
        return self.total / len(self.times) if self.times else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(total=self.total, average=self.average if self.times else None, counted=self.counted)
        if self.times:
            data.update(minimum=min(self.times), maximum=max(self.times), median=float(np.median(self.times)))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConfigurationResult:
        return cls(
            config=Configuration(**data["config"]),
            times=[float(t) for t in data["times"]],
            setup_seconds=float(data.get("setup_seconds", 0.0)),
            warmup_times=[float(t) for t in data.get("warmup_times", [])],
            cpu_times=[float(t) for t in data.get("cpu_times", [])],
            details=dict(data.get("details") or {}),
            max_abs_error=float(data.get("max_abs_error", 0.0)),
            tolerance=float(data.get("tolerance", 0.0)),
            verified=bool(data.get("verified", False)),
            failure=data.get("failure"),
        )


@dataclass(frozen=True)
class Job:
    """What is computed: shapes, mode, and the work and bytes that follow from them."""

    image_shape: tuple[int, ...]
    kernels_shape: tuple[int, ...]
    mode: str
    dtype: str
    image_source: str = "array"
    kernels_source: str = "array"

    @property
    def out_shape(self) -> tuple[int, int, int]:
        h, w = self.image_shape[:2]
        k, kh, kw = self.kernels_shape[:3]
        return (k, *output_shape((h, w), (kh, kw), self.mode))

    @property
    def channels(self) -> int:
        return self.image_shape[2] if len(self.image_shape) == 3 else 1

    @property
    def flops(self) -> float:
        """Multiply-adds counted as 2 flops: 2·K·OH·OW·kh·kw·C (27.93 GFLOP for the paper's job)."""
        k, oh, ow = self.out_shape
        kh, kw = self.kernels_shape[1:3]
        return 2.0 * k * oh * ow * kh * kw * self.channels

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def input_bytes(self) -> int:
        return int(np.prod(self.image_shape)) * self.itemsize

    @property
    def bank_bytes(self) -> int:
        return int(np.prod(self.kernels_shape)) * self.itemsize

    @property
    def output_bytes(self) -> int:
        return int(np.prod(self.out_shape)) * self.itemsize

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            out_shape=list(self.out_shape),
            flops=self.flops,
            input_bytes=self.input_bytes,
            bank_bytes=self.bank_bytes,
            output_bytes=self.output_bytes,
        )
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(
            image_shape=tuple(data["image_shape"]),
            kernels_shape=tuple(data["kernels_shape"]),
            mode=data["mode"],
            dtype=data["dtype"],
            image_source=data.get("image_source", "array"),
            kernels_source=data.get("kernels_source", "array"),
        )


@dataclass(frozen=True)
class StudySettings:
    """How the study runs; the CLI builds one from its options."""

    cores: tuple[int, ...] = (1, 2, 4, 8)
    workers: tuple[int, ...] = ()
    runs: int = 10
    warmup: int = 1
    mode: str = "valid"
    threads_per_worker: int = 1
    local_threads: int = 0
    shared_memory: bool = True
    ns: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(cores=list(self.cores), workers=list(self.workers))
        return data


@dataclass
class StudyResult:
    """Everything results.json holds: machine, job, settings, reference run and every timing."""

    machine: dict[str, Any]
    job: Job
    settings: dict[str, Any]
    reference_seconds: float
    results: list[ConfigurationResult]
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat("T", "seconds"))
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[ConfigurationResult]:
        return [r for r in self.results if not r.counted]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "created": self.created,
            "machine": self.machine,
            "job": self.job.to_dict(),
            "settings": self.settings,
            "reference": {"threads": 1, "seconds": self.reference_seconds},
            "configurations": [r.to_dict() for r in self.results],
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyResult:
        if data.get("schema") != SCHEMA:
            raise RmidlError(f"results.json schema {data.get('schema')!r} is not {SCHEMA}")
        known = {"schema", "created", "machine", "job", "settings", "reference", "configurations"}
        return cls(
            machine=data["machine"],
            job=Job.from_dict(data["job"]),
            settings=data["settings"],
            reference_seconds=float(data["reference"]["seconds"]),
            results=[ConfigurationResult.from_dict(c) for c in data["configurations"]],
            created=data.get("created", ""),
            extra={k: v for k, v in data.items() if k not in known},
        )


def usable_cores() -> int:
    """Cores this process may run on (affinity mask), which is what oversubscription is judged by."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_model_and_physical_cores() -> tuple[str, int | None]:
    model, cores = "", set()
    physical = "0"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and not model:
                    model = value
                elif key == "physical id":
                    physical = value
                elif key == "core id":
                    cores.add((physical, value))
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), len(cores) or None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, BLAS kernel (threadpoolctl) and library versions of this machine."""
    from threadpoolctl import threadpool_info

    model, physical = _cpu_model_and_physical_cores()
    blas = [
        {
            "library": pool.get("internal_api"),
            "architecture": pool.get("architecture"),
            "version": pool.get("version"),
            "threads": pool.get("num_threads"),
            "file": os.path.basename(pool.get("filepath", "")),
        }
        for pool in threadpool_info()
        if pool.get("user_api") == "blas"
    ]
    versions = {
        name: _version(name)
        for name in ("rmidl", "numpy", "scipy", "Pyro5", "threadpoolctl", "matplotlib", "msgpack")
    }
    versions["python"] = platform.python_version()
    return {
        "cpu_model": model,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "usable_cores": usable_cores(),
        "blas": blas,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "versions": versions,
    }


def configurations(settings: StudySettings, available: int | None = None) -> list[Configuration]:
    """Table III's columns: every core count (oversubscribed ones marked, kept), then every worker count
    (local clusters; with --ns, that many workers of its name server), then without worker counts the
    whole --ns cluster if one was given. Zero workers is the coordinator's local pool alone."""
    available = usable_cores() if available is None else available
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


def job_of(
    image: np.ndarray,
    kernels: np.ndarray,
    mode: str,
    *,
    image_source: str = "array",
    kernels_source: str = "array",
) -> Job:
    """The Job record of canonical arrays (as `rmidl.validate.prepare` returns them)."""
    return Job(tuple(image.shape), tuple(kernels.shape), mode, str(image.dtype), image_source, kernels_source)


def max_abs_difference(result: np.ndarray, reference: np.ndarray) -> float:
    """max|result - reference|, one kernel's map at a time so no second full-size temporary is made."""
    if result.shape != reference.shape:
        raise RmidlError(f"result shape {result.shape} differs from the reference's {reference.shape}")
    worst = 0.0
    for got, want in zip(result, reference, strict=True):
        worst = max(worst, float(np.max(np.abs(got - want))))
    return worst


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
        if config.kind == "cluster":
            ns, local, workers = settings.ns, settings.local_threads, config.count or None
        elif config.count:
            cluster = stack.enter_context(
                LocalCluster(workers=config.count, threads_per_worker=settings.threads_per_worker,
                             die_with_parent=True)
            )
            ns, local = cluster.ns_address, settings.local_threads
        else:
            ns, local = None, max(1, settings.local_threads)
        coordinator = stack.enter_context(
            Coordinator(ns=ns, local_threads=local, shared_memory=settings.shared_memory, workers=workers)
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
    return StudyResult(machine_info(), job, settings.to_dict(), reference_seconds, results)


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
