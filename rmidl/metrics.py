"""Prometheus metrics of a process (coordinator, worker daemon, name server), served on an opt-in port.

Nothing is counted until a port is opened: `recorder()` is then a `Metrics` (prometheus_client series in
a registry of this module's own), else `NULL`, whose methods do nothing, so the hooks in the scheduler,
the queue and the worker cost one attribute read and an empty call. The recorder is process-wide on
purpose: Prometheus scrapes a process, events happen in threads deep below any object a caller holds,
and prometheus_client's own default registry is global for the same reason. The series stay across
servers (counters never go back), and recording stops when the last server closes.

Jobs that want their own figures call the module functions: a features job `images_done(n)` for every
batch it accepts, a training loop `training_step(seconds, loss)` after every step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from rmidl._served import Served
from rmidl.config import Config
from rmidl.errors import OptionError

__all__ = [
    "NULL",
    "Metrics",
    "MetricsServer",
    "NullMetrics",
    "Reading",
    "images_done",
    "info_readings",
    "recorder",
    "serve_metrics",
    "training_step",
]

log = logging.getLogger(__name__)

Reading = tuple[str, str, Mapping[str, str], float]
"""A gauge read at scrape time: (series name, help, labels, value)."""
Readings = Callable[[], Iterable[Reading]]

_STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))


class NullMetrics:
    """The recorder while no metrics port is open: every event is dropped."""

    enabled = False

    # -- the coordinator's jobs (rmidl.client.jobboard feeds these) ----------------------------------
    def job_started(self, kind: str) -> None: ...
    def job_ended(self, kind: str, ok: bool) -> None: ...
    def queue_depth(self, kind: str, delta: int) -> None: ...
    def task_taken(self, kind: str, worker: str) -> None: ...
    def task_finished(self, kind: str, worker: str, seconds: float, outcome: str) -> None: ...
    def bytes_moved(self, kind: str, worker: str, path: str, nbytes: int) -> None: ...

    # -- what jobs report themselves ------------------------------------------------------------------
    def images_done(self, n: int, kind: str = "features") -> None: ...
    def training_step(self, seconds: float, loss: float | None = None, kind: str = "gradient") -> None: ...

    # -- a worker daemon ------------------------------------------------------------------------------
    @contextmanager
    def worker_task(self, worker: str, method: str) -> Iterator[None]:
        yield

    # -- gauges read when scraped ---------------------------------------------------------------------
    def add_readings(self, readings: Readings) -> None: ...
    def remove_readings(self, readings: Readings) -> None: ...


NULL = NullMetrics()


class Metrics(NullMetrics):
    """The series of one process (names in Prometheus style, `rmidl_` prefix); see the README's
    "Watching a cluster" for what each one means."""

    enabled = True

    def __init__(self) -> None:
        from prometheus_client import (
            GC_COLLECTOR,
            PLATFORM_COLLECTOR,
            PROCESS_COLLECTOR,
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
        )

        self.registry = registry = CollectorRegistry()
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # CPU, memory, GC, Python
            registry.register(standard)
        kind, worker = ["kind"], ["kind", "worker"]
        self._jobs_running = Gauge("rmidl_jobs_running", "Jobs this coordinator is running", kind,
                                   registry=registry)
        self._jobs = Counter("rmidl_jobs", "Jobs finished, by outcome (done, failed)", ["kind", "outcome"],
                             registry=registry)
        self._depth = Gauge("rmidl_queue_depth", "Tasks waiting in the queues of running jobs", kind,
                            registry=registry)
        self._in_flight = Gauge("rmidl_tasks_in_flight", "Tasks a runner (worker or local pool) holds now",
                                worker, registry=registry)
        self._done = Counter("rmidl_tasks_done", "Tasks completed, by runner", worker, registry=registry)
        self._failed = Counter("rmidl_tasks_failed", "Task attempts that failed, by runner", worker,
                               registry=registry)
        self._requeued = Counter("rmidl_tasks_requeued", "Failed task attempts put back in the queue",
                                 worker, registry=registry)
        self._task_seconds = Counter("rmidl_task_seconds", "Seconds runners spent on task attempts (busy)",
                                     worker, registry=registry)
        self._bytes = Counter("rmidl_bytes_moved", "Result bytes received from workers, by path "
                              "(inline, bulk, shm)", ["kind", "worker", "path"], registry=registry)
        self._images = Counter("rmidl_images", "Images through feature jobs", kind, registry=registry)
        self._steps = Histogram("rmidl_training_step_seconds", "Seconds per training step", kind,
                                buckets=_STEP_BUCKETS, registry=registry)
        self._loss = Gauge("rmidl_training_loss", "Loss of the last training step", kind, registry=registry)
        self._worker_tasks = Counter("rmidl_worker_tasks", "Task calls a worker served, by method and "
                                     "outcome (done, failed)", ["worker", "method", "outcome"],
                                     registry=registry)
        self._worker_seconds = Counter("rmidl_worker_task_seconds", "Seconds a worker spent in task calls",
                                       ["worker", "method"], registry=registry)
        self._worker_busy = Counter("rmidl_worker_busy_seconds", "Seconds a worker had a task in progress",
                                    ["worker"], registry=registry)
        self._worker_running = Gauge("rmidl_worker_tasks_in_progress", "Task calls a worker is serving now",
                                     ["worker"], registry=registry)
        self._lock = threading.Lock()
        self._running: dict[str, int] = {}
        self._since: dict[str, float] = {}
        self._readings: list[Readings] = []
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        registry.register(_ReadingsCollector(self))

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus_client's lookup takes a lock and costs
        several times the increment itself."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:  # racing threads get the same child from labels(): no lock needed here
            child = self._children[key] = metric.labels(*labels)
        return child

    def job_started(self, kind: str) -> None:
        self._child(self._jobs_running, kind).inc()

    def job_ended(self, kind: str, ok: bool) -> None:
        self._child(self._jobs_running, kind).dec()
        self._child(self._jobs, kind, "done" if ok else "failed").inc()

    def queue_depth(self, kind: str, delta: int) -> None:
        self._child(self._depth, kind).inc(delta)

    def task_taken(self, kind: str, worker: str) -> None:
        self._child(self._in_flight, kind, worker).inc()

    def task_finished(self, kind: str, worker: str, seconds: float, outcome: str) -> None:
        """`outcome`: "done", "retried" (failed, back in the queue) or "failed" (failed the job)."""
        self._child(self._in_flight, kind, worker).dec()
        self._child(self._task_seconds, kind, worker).inc(max(0.0, seconds))
        if outcome == "done":
            self._child(self._done, kind, worker).inc()
            return
        self._child(self._failed, kind, worker).inc()
        if outcome == "retried":
            self._child(self._requeued, kind, worker).inc()

    def bytes_moved(self, kind: str, worker: str, path: str, nbytes: int) -> None:
        if nbytes > 0:
            self._child(self._bytes, kind, worker, path).inc(nbytes)

    def images_done(self, n: int, kind: str = "features") -> None:
        self._child(self._images, kind).inc(n)

    def training_step(self, seconds: float, loss: float | None = None, kind: str = "gradient") -> None:
        self._child(self._steps, kind).observe(seconds)
        if loss is not None:
            self._child(self._loss, kind).set(loss)

    @contextmanager
    def worker_task(self, worker: str, method: str) -> Iterator[None]:
        """Count one task call of `worker`: in progress while it runs, done or failed after, its seconds,
        and the worker's busy seconds (time with at least one call in progress, so at most wall time)."""
        started = time.perf_counter()
        with self._lock:
            self._running[worker] = self._running.get(worker, 0) + 1
            if self._running[worker] == 1:
                self._since[worker] = started
        self._child(self._worker_running, worker).inc()
        outcome = "failed"
        try:
            yield
            outcome = "done"
        finally:
            ended = time.perf_counter()
            self._child(self._worker_running, worker).dec()
            self._child(self._worker_tasks, worker, method, outcome).inc()
            self._child(self._worker_seconds, worker, method).inc(ended - started)
            with self._lock:
                self._running[worker] -= 1
                idle = self._running[worker] == 0
                since = self._since.get(worker, started)
            if idle:
                self._child(self._worker_busy, worker).inc(ended - since)

    def add_readings(self, readings: Readings) -> None:
        with self._lock:
            self._readings.append(readings)

    def remove_readings(self, readings: Readings) -> None:
        with self._lock:
            if readings in self._readings:
                self._readings.remove(readings)

    def readings(self) -> list[Reading]:
        """Every gauge the registered reading functions give now (one that fails is left out)."""
        with self._lock:
            sources = list(self._readings)
        found: list[Reading] = []
        for source in sources:
            try:
                found.extend(source())
            except Exception as error:  # a scrape must not fail for one broken source
                log.debug("metrics readings %r failed: %r", source, error)
        return found


class _ReadingsCollector:
    """Turns the readings of a `Metrics` into gauge families when the registry is scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # unknown until scraped: the registry then never checks names against it

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        families: dict[str, GaugeMetricFamily] = {}
        for name, help_text, labels, value in self._metrics.readings():
            family = families.get(name)
            if family is None:
                family = families[name] = GaugeMetricFamily(name, help_text, labels=list(labels))
            family.add_metric(list(labels.values()), float(value))
        yield from families.values()


def info_readings(info: Callable[[], Mapping[str, Any]]) -> Readings:
    """Gauges of a worker from its `info()` record (what it computes at, its caches), read when scraped."""

    def read() -> list[Reading]:
        record = info()
        labels = {"worker": str(record.get("name", ""))}
        return [
            ("rmidl_worker_threads", "Engine threads of a worker", labels, record.get("threads") or 0),
            ("rmidl_worker_cores", "Cores of a worker's machine", labels, record.get("cores") or 0),
            ("rmidl_worker_gflops", "A worker's measured engine rate (GFLOP/s)", labels,
             record.get("gflops") or 0.0),
            ("rmidl_worker_blobs", "Blobs (banks, networks, shards) a worker holds", labels,
             len(record.get("blobs") or ())),
            ("rmidl_worker_shm_blocks", "Shared-memory blocks a worker has mapped", labels,
             record.get("shm_blocks") or 0),
        ]

    return read


# -- the process's recorder ---------------------------------------------------------------------------
@dataclass
class _Process:
    active: NullMetrics = NULL
    metrics: Metrics | None = None
    servers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_PROCESS = _Process()


def recorder() -> NullMetrics:
    """Where events go: the process's `Metrics` while a metrics port is open, else `NULL`."""
    return _PROCESS.active


def images_done(n: int, kind: str = "features") -> None:
    """Count `n` images a feature job has finished (`rmidl_images_total`; images/s is its rate)."""
    _PROCESS.active.images_done(n, kind)


def training_step(seconds: float, loss: float | None = None, kind: str = "gradient") -> None:
    """Count one training step of `seconds` (`rmidl_training_step_seconds`: its _count is the steps) and
    set its loss (`rmidl_training_loss`)."""
    _PROCESS.active.training_step(seconds, loss, kind)


class MetricsServer(Served):
    """The HTTP endpoint serving this process's metrics (`.url`, ending in /metrics); `close()` stops it."""

    def __init__(self, httpd: Any, thread: threading.Thread, host: str, scheme: str,
                 readings: Readings | None) -> None:
        super().__init__(httpd, thread, host, scheme=scheme, path="/metrics")
        self._readings = readings

    def close(self) -> None:
        """Stop serving and release the port (idempotent); the last one closed stops the recording."""
        if self.closed:
            return
        super().close()
        with _PROCESS.lock:
            if _PROCESS.metrics is not None and self._readings is not None:
                _PROCESS.metrics.remove_readings(self._readings)
            _PROCESS.servers -= 1
            if _PROCESS.servers == 0:
                _PROCESS.active = NULL

    def __enter__(self) -> MetricsServer:
        return self


def serve_metrics(port: int = 0, host: str = "127.0.0.1", *, config: Config | None = None,
                  readings: Readings | None = None) -> MetricsServer:
    """Serve this process's metrics on host:port (port 0: any free one; `.port` says which) and start
    recording. `readings` adds gauges read at each scrape (removed again by `close()`).

    Prometheus has no authentication: past loopback the endpoint uses 2-way TLS when `config` has TLS
    files (scrapers then need a client certificate of the cluster's CA), and otherwise is served
    in the clear with a loud warning, as the host was named explicitly.
    """
    from prometheus_client import start_http_server

    from rmidl.remote.security import is_loopback
    from rmidl.remote.transport import tls_enabled

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise OptionError(f"metrics port {port!r} must be 0-65535 (0: any free port)")
    config = config or Config()
    tls: dict[str, Any] = {}
    if not is_loopback(host):
        if tls_enabled(config):
            tls = {"certfile": config.tls_cert, "keyfile": config.tls_key, "client_cafile": config.tls_ca,
                   "client_auth_required": True}
        else:
            log.warning("!!! metrics on %s:%d are served without TLS: anyone who can reach it reads "
                        "them (Prometheus has no authentication) !!!", host, port)
    with _PROCESS.lock:
        metrics = _PROCESS.metrics or Metrics()
        try:
            httpd, thread = start_http_server(port, addr=host, registry=metrics.registry, **tls)
        except OSError as error:
            raise OptionError(f"cannot serve metrics on {host}:{port}: {error.strerror or error}") from None
        thread.name = f"rmidl-metrics-{httpd.server_port}"
        _PROCESS.metrics = metrics
        _PROCESS.active = metrics
        _PROCESS.servers += 1
        if readings is not None:
            metrics.add_readings(readings)
    server = MetricsServer(httpd, thread, host, "https" if tls else "http", readings)
    log.info("metrics at %s", server.url)
    return server
