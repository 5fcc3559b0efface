"""The paper's pipeline study on this machine: one dataset through one network, scheme by scheme.

Schemes: sequential (LOAD, every CNP stage and FLAT one after another on one processor, the paper's
serial program and the baseline), pipelined (each stage on its own processor: --placement stages on
threads here), task-parallel (whole batches on N local workers) and combined (P copies of the pipeline).
Runs are interleaved (run 1 of every scheme, then run 2, ...) so that a busy spell of the shared
machine spreads over all of them; medians are reported. Every run's features are compared with the
sequential run's before its time counts. The per-stage times of the sequential runs are the paper's
Table III, and the prediction's input.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from rmidl.client.bench.machine import machine_info
from rmidl.client.bench.pipeline_model import PAPER_PIPELINE, paper_predictions, predict
from rmidl.datasets import Dataset
from rmidl.errors import OptionError, RmidlError
from rmidl.geometry import split_range
from rmidl.kernels import available_cores
from rmidl.network import Network

__all__ = ["SCHEMA", "PipelineSettings", "SchemeResult", "check_settings", "run_pipeline_study",
           "sequential_run", "stage_names"]

log = logging.getLogger(__name__)

SCHEMA = 1
TOLERANCE = 1e-5
"""A run counts when max|X - X_sequential| <= TOLERANCE * max|X_sequential| (identical with one engine
thread everywhere, as the default settings have it)."""


@dataclass(frozen=True)
class PipelineSettings:
    """What the study runs; `rmidl bench pipeline` builds one from its options."""

    batch: int = 4
    runs: int = 3
    warmup: int = 1
    workers: tuple[int, ...] = (1, 2)
    threads_per_worker: int = 1
    pipelines: int = 2
    replicas: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        replicas = None if self.replicas is None else list(self.replicas)
        data.update(workers=list(self.workers), replicas=replicas)
        return data


@dataclass
class SchemeResult:
    """Every timed run of one scheme and how its features compared with the sequential ones."""

    name: str
    kind: str
    processors: int
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    max_abs_error: float = 0.0
    failure: str | None = None
    spans: list[list[Any]] = field(default_factory=list)
    """[stage, processor, batch, start, end] of the first timed run, for the Gantt chart."""

    @property
    def median(self) -> float | None:
        return float(np.median(self.times)) if self.times and self.failure is None else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median}


def stage_names(net: Network) -> list[str]:
    """The paper's pipeline stages for `net`: LOAD, CNP1..CNPn, FLAT."""
    return ["LOAD", *(f"CNP{i + 1}" for i in range(len(net.stages))), "FLAT"]


def sequential_run(dataset: Dataset, net: Network, batch: int) -> tuple[np.ndarray, list[dict[str, float]],
                                                                        list[list[Any]]]:
    """Every batch through LOAD, each stage and FLAT in turn on this thread (one engine thread): the
    features, each batch's stage seconds, and the spans as they followed one another."""
    n = len(dataset)
    out = np.empty((n, net.output_shape(dataset.shape)[0]), np.float32)
    per_batch: list[dict[str, float]] = []
    spans: list[list[Any]] = []
    names = stage_names(net)
    origin = time.perf_counter()
    for index, (a, b) in enumerate(split_range(n, size=batch)):
        start = time.perf_counter() - origin
        timings: dict[str, float] = {}
        images = dataset.read(slice(a, b), timings=timings).images
        out[a:b] = net.forward_batch(images, threads=1, timings=timings)
        per_batch.append(timings)
        for name in names:
            spans.append([name, "cpu", index, start, start + timings.get(name, 0.0)])
            start += timings.get(name, 0.0)
    return out, per_batch, spans


def _task_spans(spans: list[Any], names: list[str]) -> list[list[Any]]:
    """A task-placed job's tasks as stage segments on their runners (the stage seconds measured where each
    ran, laid end to end from its start; a remote task's round trip holds its transfers too)."""
    rows = []
    for span in spans:
        start = span.start
        for name in names:
            seconds = span.timings.get(name, 0.0)
            if seconds:
                rows.append([name, span.runner, span.task_id, start, min(span.end, start + seconds)])
                start += seconds
    return rows


@contextlib.contextmanager
def _schemes(dataset: Dataset, net: Network, settings: PipelineSettings
             ) -> Iterator[list[tuple[SchemeResult, Callable[[], tuple[np.ndarray, list[list[Any]]]]]]]:
    """(result record, run) per scheme; local clusters started once, stopped after the study."""
    from rmidl.client import Coordinator
    from rmidl.client.localcluster import LocalCluster

    names = stage_names(net)
    replicas = list(settings.replicas) if settings.replicas else None
    stages = len(names) + sum(replicas or [1] * len(net.stages)) - len(net.stages)

    def staged(pipelines: int) -> Callable[[], tuple[np.ndarray, list[list[Any]]]]:
        def run() -> tuple[np.ndarray, list[list[Any]]]:
            with Coordinator(None, local_threads=1) as co:
                result = co.features(dataset, net, batch=settings.batch, progress=False, placement="stages",
                                     replicas=replicas, pipelines=pipelines)
                spans = [[s.stage, s.processor, s.key, s.start, s.end] for s in co.last_job()["stage_spans"]]
            return result.X, spans
        return run

    with contextlib.ExitStack() as stack:
        schemes = [(SchemeResult("pipelined", "pipelined", stages), staged(1))]
        if settings.pipelines > 1:
            schemes.append((SchemeResult(f"combined ({settings.pipelines} pipelines)", "combined",
                                         stages * settings.pipelines), staged(settings.pipelines)))
        for count in settings.workers:
            cluster = stack.enter_context(LocalCluster(
                workers=count, threads_per_worker=settings.threads_per_worker, die_with_parent=True))

            def run(cluster: LocalCluster = cluster) -> tuple[np.ndarray, list[list[Any]]]:
                with Coordinator(cluster, local_threads=0) as co:
                    result = co.features(dataset, net, batch=settings.batch, progress=False)
                    spans = _task_spans(co.last_job()["spans"], names)
                return result.X, spans

            label = f"{count} worker" + ("s" if count != 1 else "")
            schemes.append((SchemeResult(label, "workers", count * settings.threads_per_worker), run))
        yield schemes


def check_settings(settings: PipelineSettings, net: Network) -> None:
    """Every setting in range, and replicas (if given) one count per CNP stage of `net`."""
    if settings.batch < 1 or settings.runs < 1 or settings.warmup < 0 or settings.threads_per_worker < 1:
        raise OptionError("batch, runs and threads per worker must be at least 1, warmup at least 0")
    if settings.pipelines < 1 or any(w < 1 for w in settings.workers):
        raise OptionError("pipelines and worker counts must be at least 1")
    if settings.replicas is not None and len(settings.replicas) != len(net.stages):
        raise OptionError(f"replicas {list(settings.replicas)} must give a count for each of the "
                          f"{len(net.stages)} CNP stages")


def run_pipeline_study(dataset: Dataset, net: Network, settings: PipelineSettings, *,
                       on_run: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    """Run every scheme `settings.runs` times, interleaved; the study as a JSON-ready dict."""
    check_settings(settings, net)
    net.output_shape(dataset.shape)  # a network that does not fit the images fails before any run
    for _ in range(settings.warmup):
        sequential_run(dataset, net, settings.batch)
    sequential = SchemeResult("sequential", "sequential", 1)
    per_batch_runs: list[list[dict[str, float]]] = []
    reference: np.ndarray | None = None
    with _schemes(dataset, net, settings) as schemes:
        for _, run in schemes:  # warm-up: processes, connections, network blobs
            for _ in range(settings.warmup):
                run()
        for index in range(settings.runs):
            start, cpu = time.perf_counter(), time.process_time()
            features, per_batch, spans = sequential_run(dataset, net, settings.batch)
            sequential.times.append(time.perf_counter() - start)
            sequential.cpu_times.append(time.process_time() - cpu)
            per_batch_runs.append(per_batch)
            sequential.spans = sequential.spans or spans
            reference = features if reference is None else reference
            if on_run:
                on_run("sequential", index)
            for result, run in schemes:
                if result.failure:
                    continue
                _timed(result, run, reference)
                if on_run:
                    on_run(result.name, index)
    return _assemble(dataset, net, settings, sequential, [r for r, _ in schemes], runs=per_batch_runs)


def _timed(result: SchemeResult, run: Callable[[], tuple[np.ndarray, list[list[Any]]]],
           reference: np.ndarray) -> None:
    try:
        start, cpu = time.perf_counter(), time.process_time()
        features, spans = run()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    except RmidlError as error:
        result.failure = f"{type(error).__name__}: {error}"
        log.warning("%s failed: %s", result.name, result.failure)
        return
    worst = float(np.max(np.abs(features - reference), initial=0.0))
    result.max_abs_error = max(result.max_abs_error, worst)
    if worst > TOLERANCE * float(np.max(np.abs(reference), initial=0.0)):
        result.failure = f"features differ from the sequential run's by {worst:.3g}; timings do not count"
        return
    result.times.append(seconds)
    result.cpu_times.append(cpu)
    result.spans = result.spans or spans


def _assemble(dataset: Dataset, net: Network, settings: PipelineSettings, sequential: SchemeResult,
              schemes: list[SchemeResult], *, runs: list[list[dict[str, float]]]) -> dict[str, Any]:
    per_batch_runs = runs
    names = stage_names(net)
    batches = len(per_batch_runs[0])

    def median_total(key: str) -> float:
        return float(np.median([sum(b.get(key, 0.0) for b in run) for run in per_batch_runs]))

    # Table III: each stage's seconds over the whole dataset, the median over runs
    totals = {name: median_total(name) for name in names}
    parts = {f"{s}.{p}": median_total(f"{s}.{p}") for s in names[1:-1] for p in ("conv", "act", "pool")}
    per_item = {name: seconds / batches for name, seconds in totals.items()}
    base = sequential.median or float("nan")
    measured = {r.kind if r.kind != "workers" else r.name: base / r.median for r in schemes if r.median}
    cores = available_cores()
    predictions = predict(per_item, batches, cores=cores, replicas=settings.replicas,
                          pipelines=settings.pipelines, measured=measured)
    summary = net.describe(dataset.shape)
    return {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat("T", "seconds"),
        "machine": machine_info(),
        "dataset": {"origin": dataset.origin, "images": len(dataset), "shape": list(dataset.shape),
                    "classes": list(dataset.classes)},
        "net": {"spec": net.spec or repr(net), "fingerprint": net.fingerprint, "features": summary.features,
                "stages": [{"name": s.name, "spec": s.spec, "mflop": s.flops / 1e6, "out": list(s.shapes.out)}
                           for s in summary.stages]},
        "settings": {**settings.to_dict(), "cores": cores},
        "stages": names,
        "table3": {"seconds": totals, "parts": parts, "per_batch": per_item, "batches": batches},
        "sequential": sequential.to_dict(),
        "schemes": [r.to_dict() for r in schemes],
        "predictions": [p.to_dict() for p in predictions],
        "paper": {**PAPER_PIPELINE, **paper_predictions()},
    }
