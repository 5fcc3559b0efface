"""What a coordinator keeps of its jobs: each job's progress and a bounded task log (which runner ran
which task when, and how it ended), fed by the job's queue; the running jobs and the last few finished
ones; and the job series of `rmidl.metrics`. The dashboard draws a job's timeline from the log.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, deque
from typing import Any

from rmidl import metrics
from rmidl.remote.contract import BulkTicket, Result

__all__ = ["KEEP_FINISHED", "TASK_LOG", "JobBoard", "JobTrace", "result_path"]

TASK_LOG = 4096
"""Task attempts a job's log keeps (the newest; `dropped` counts the others)."""
KEEP_FINISHED = 8
"""Finished jobs a board keeps (the newest)."""


def result_path(result: Result) -> str:
    """How a task's result came back: "bulk" (side channel), "inline" (in the reply), "shm" (written in
    shared memory)."""
    if isinstance(result, BulkTicket):
        return "bulk"
    return "shm" if result is None else "inline"


class JobTrace:
    """One job as its TaskQueue reports it (a `rmidl.client.queue.QueueObserver`): "queued" until a runner
    takes a task, then "running", then "done" or "failed". Safe to call from every runner thread."""

    def __init__(self, board: JobBoard, job_id: int, kind: str, total: int) -> None:
        self.id = job_id
        self.kind = kind
        self.total = total
        self.state = "queued"
        self.created = time.time()
        self.started_at: float | None = None
        """Wall-clock time (time.time) of the first task taken; task times in the log count from it."""
        self.ended_at: float | None = None
        self.error: str | None = None
        self.done = self.failed = self.requeued = 0
        self.by_runner: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self._board = board
        self._metrics = metrics.recorder()  # one recorder for the job's life: its gauges stay balanced
        self._clock0 = 0.0
        self._open: dict[int, tuple[str, float]] = {}
        self._log: deque[tuple[int, str, float, float, str]] = deque(maxlen=TASK_LOG)
        self._dropped = 0
        self._depth = 0
        self._lock = threading.Lock()

    # -- QueueObserver -------------------------------------------------------------------------------
    def taken(self, task_id: int, runner: str) -> None:
        with self._lock:
            now = time.perf_counter()
            if self.state == "queued":
                self._start(now)
            self._open[task_id] = (runner, now)
            self._set_depth(self._depth - 1)
        self._metrics.task_taken(self.kind, runner)
        self._board.touch()

    def finished(self, task_id: int, runner: str, outcome: str) -> None:
        """A task attempt ended: "done", "retried" (back in the queue) or "failed" (it failed the job)."""
        with self._lock:
            now = time.perf_counter()
            _, since = self._open.pop(task_id, (runner, now))
            if len(self._log) == self._log.maxlen:
                self._dropped += 1
            self._log.append((task_id, runner, since - self._clock0, now - self._clock0, outcome))
            if outcome == "done":
                self.done += 1
                self.by_runner[runner] += 1
            else:
                self.failed += 1
                if outcome == "retried":
                    self.requeued += 1
                    if self.state == "running":
                        self._set_depth(self._depth + 1)
        self._metrics.task_finished(self.kind, runner, now - since, outcome)
        self._board.touch()

    def ended(self, error: BaseException | None) -> None:
        """The job is over: every task done (None) or failed with `error` (later calls are ignored)."""
        with self._lock:
            if self.state in ("done", "failed"):
                return
            if self.state == "queued":  # failed before any runner started: count it as started and ended
                self._start(time.perf_counter())
            self.state = "failed" if error is not None else "done"
            self.error = None if error is None else f"{type(error).__name__}: {error}"
            self.ended_at = time.time()
            self._set_depth(0)
        self._metrics.job_ended(self.kind, error is None)
        self._board.finish(self)

    def received(self, runner: str, path: str, nbytes: int) -> None:
        """A result of `nbytes` arrived from `runner` by `path` (see `result_path`)."""
        with self._lock:
            self.bytes[path] += nbytes
        self._metrics.bytes_moved(self.kind, runner, path, nbytes)

    # -- what it says --------------------------------------------------------------------------------
    def summary(self, *, timeline: bool = True, max_tasks: int = TASK_LOG) -> dict[str, Any]:
        """A JSON-ready dict: progress, counts per runner, bytes per path and (`timeline`) the newest
        `max_tasks` attempts as [task_id, runner, start, end, outcome], times in seconds since `started`;
        attempts still running have end None and outcome "running"."""
        with self._lock:
            in_flight = Counter(runner for runner, _ in self._open.values())
            ended, started = self.ended_at, self.started_at
            seconds = (ended if ended is not None else time.time()) - started if started else 0.0
            summary: dict[str, Any] = {
                "id": self.id, "kind": self.kind, "state": self.state, "total": self.total,
                "done": self.done, "failed": self.failed, "requeued": self.requeued,
                "in_flight": dict(in_flight), "by_runner": dict(self.by_runner), "bytes": dict(self.bytes),
                "created": self.created, "started": started, "ended": ended,
                "seconds": round(seconds, 4), "error": self.error, "dropped": self._dropped,
            }
            if timeline:
                rows = [[task, runner, round(start, 4), round(end, 4), outcome]
                        for task, runner, start, end, outcome in self._log]
                rows += [[task, runner, round(start - self._clock0, 4), None, "running"]
                         for task, (runner, start) in self._open.items()]
                summary["tasks"] = rows[-max_tasks:] if max_tasks > 0 else []
                summary["dropped"] = self._dropped + max(0, len(rows) - max_tasks)
        return summary

    # -- internals (under the lock) --------------------------------------------------------------------
    def _start(self, now: float) -> None:
        self.state = "running"
        self.started_at = time.time()
        self._clock0 = now
        self._metrics.job_started(self.kind)
        self._set_depth(self.total)

    def _set_depth(self, depth: int) -> None:
        """Keep the queue-depth gauge at this job's pending tasks (what it added, it takes away)."""
        depth = max(0, depth) if self.state == "running" else 0
        if depth != self._depth:
            self._metrics.queue_depth(self.kind, depth - self._depth)
            self._depth = depth


class JobBoard:
    """The jobs of one coordinator: running ones and the last KEEP_FINISHED finished ones; `version`
    grows with every event, and `wait(version)` wakes when it has (the job feed publishes then)."""

    def __init__(self, keep: int = KEEP_FINISHED) -> None:
        self._ids = itertools.count(1)
        self._live: dict[int, JobTrace] = {}
        self._finished: deque[JobTrace] = deque(maxlen=max(1, keep))
        self._changed = threading.Condition()
        self.version = 0

    def trace(self, kind: str, total: int) -> JobTrace:
        """A new job's trace (give it to the job's TaskQueue as its observer)."""
        with self._changed:
            trace = JobTrace(self, next(self._ids), kind, total)
            self._live[trace.id] = trace
            return trace

    def touch(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def finish(self, trace: JobTrace) -> None:
        with self._changed:
            if self._live.pop(trace.id, None) is not None:
                self._finished.append(trace)
            self.version += 1
            self._changed.notify_all()

    def wait(self, version: int, timeout: float) -> int:
        """Block until `version` is out of date or `timeout` s passed; the current version."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != version, timeout)
            return self.version

    def traces(self) -> list[JobTrace]:
        """Jobs that ran or run (never-started ones left out), newest first."""
        with self._changed:
            live = [trace for trace in self._live.values() if trace.state != "queued"]
            finished = list(self._finished)
        return sorted(live + finished, key=lambda trace: trace.id, reverse=True)

    def jobs(self, *, timeline: bool = True, max_tasks: int = TASK_LOG) -> list[dict[str, Any]]:
        """`JobTrace.summary` of every job of `traces()`, newest first."""
        return [trace.summary(timeline=timeline, max_tasks=max_tasks) for trace in self.traces()]
