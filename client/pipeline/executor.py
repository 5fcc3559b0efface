"""A bounded pipeline of processors: items flow through stages, each served by its own thread(s).

Stage k's processors take items from one queue of at most `in_flight` items and put their results on
stage k+1's, so a slow stage holds back those before it (back pressure) and memory stays bounded by the
queue sizes, whatever the number of items. The first error stops every processor and is raised to the
caller; every thread is joined before `run_pipeline` returns. Each processed item is reported as a span
(stage, processor, item key, start, end) on the pipeline's clock, which the study draws as a Gantt chart.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["POLL_S", "Processor", "Span", "StageProcessors", "run_pipeline"]

log = logging.getLogger(__name__)

POLL_S = 0.05
"""How often a processor blocked on a full or empty queue looks whether the pipeline was stopped."""
_JOIN_SECONDS = 60.0

Processor = Callable[[Any], Any]
"""One processor of a stage: an item in, the item for the next stage out (the same key)."""


@dataclass(frozen=True)
class StageProcessors:
    """A stage's name and its processors (more than one: a replicated stage, items shared among them)."""

    name: str
    processors: Sequence[tuple[str, Processor]]
    """(processor label, callable) pairs: "local-0", "w1", ..."""


@dataclass(frozen=True)
class Span:
    """One item through one processor, in seconds since the pipeline started."""

    stage: str
    processor: str
    key: Hashable
    start: float
    end: float


class _Done:
    """The end-of-stream marker one processor of a stage receives."""


class _Pipeline:
    def __init__(self, stages: Sequence[StageProcessors], in_flight: int,
                 key: Callable[[Any], Hashable]) -> None:
        self.stages = stages
        self.queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=max(1, in_flight)) for _ in stages]
        self.key = key
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        self.left = [len(stage.processors) for stage in stages]
        self.origin = time.perf_counter()

    def fail(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
        self.stop.set()

    def put(self, index: int, item: Any) -> bool:
        """Put on stage `index`'s queue unless the pipeline stopped meanwhile; False if it did."""
        while not self.stop.is_set():
            try:
                self.queues[index].put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self, index: int) -> Any:
        while not self.stop.is_set():
            try:
                return self.queues[index].get(timeout=POLL_S)
            except queue.Empty:
                continue
        return _Done()

    def end_stage(self, index: int) -> None:
        """Called as each processor of stage `index` finishes: the last one ends the next stage's input."""
        with self.lock:
            self.left[index] -= 1
            last = self.left[index] == 0
        if last and index + 1 < len(self.stages):
            for _ in self.stages[index + 1].processors:
                self.put(index + 1, _Done())

    def feed(self, items: Iterable[Any]) -> None:
        try:
            for item in items:
                if not self.put(0, item):
                    return
            for _ in self.stages[0].processors:
                self.put(0, _Done())
        except BaseException as error:
            self.fail(error)

    def serve(self, index: int, label: str, processor: Processor) -> None:
        stage = self.stages[index].name
        try:
            while True:
                item = self.get(index)
                if isinstance(item, _Done):
                    return
                start = time.perf_counter()
                result = processor(item)
                end = time.perf_counter()
                span = Span(stage, label, self.key(item), start - self.origin, end - self.origin)
                with self.lock:
                    self.spans.append(span)
                if index + 1 < len(self.stages) and not self.put(index + 1, result):
                    return
        except BaseException as error:
            self.fail(error)
        finally:
            self.end_stage(index)


def run_pipeline(items: Iterable[Any], stages: Sequence[StageProcessors], *, in_flight: int = 2,
                 key: Callable[[Any], Hashable] = id) -> list[Span]:
    """Every item through every stage in order (processors of a stage in parallel); the spans, by start.

    `in_flight` bounds each stage's input queue. The last stage's results are dropped: its processors
    deliver them (e.g. write rows of a matrix). Raises the first processor's error, after joining all.
    """
    if not stages:
        return []
    pipeline = _Pipeline(stages, in_flight, key)
    threads = [threading.Thread(target=pipeline.feed, args=(items,), name="rmidl-pipeline-feed", daemon=True)]
    for index, stage in enumerate(stages):
        for label, processor in stage.processors:
            threads.append(threading.Thread(target=pipeline.serve, args=(index, label, processor),
                                            name=f"rmidl-{stage.name}-{label}", daemon=True))
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            thread.join()
    except BaseException as error:  # Ctrl-C while waiting: stop the processors, then report it
        pipeline.fail(error)
        for thread in threads:
            thread.join(_JOIN_SECONDS)
        raise
    if pipeline.error is not None:
        raise pipeline.error
    return sorted(pipeline.spans, key=lambda span: span.start)
