"""Fault-injecting ConvolutionWorker subclasses for the tests (fault injection lives here, not in rmidl).

In-process: `start_worker(worker_class=HangingWorker)` (the conftest fixture). As a real process:
`python -m worker_doubles --ns HOST:PORT --name NAME [--hang N] [--die-in-gradient N]` with tests/ on
PYTHONPATH prints the worker's URI and "ready", serves until SIGTERM/SIGINT; its first N correlate calls
hang, or its N-th gradient call kills the process (SIGKILL) in the middle of the task.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections import Counter
from typing import Any

from Pyro5.api import expose

from rmidl.errors import WorkerLost
from rmidl.remote.contract import WireRecord
from rmidl.server.daemon import start_worker, worker_loop
from rmidl.server.worker import ConvolutionWorker


class HangingWorker(ConvolutionWorker):
    """Its first `hang` correlate calls block until close(), then fail as a worker shutting down does;
    `hung` is set once one is blocked. The others run normally."""

    hang = 1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hung = threading.Event()
        self._released = threading.Event()
        self._left = self.hang
        self._left_lock = threading.Lock()

    @expose
    def correlate(self, task: WireRecord) -> WireRecord:
        with self._left_lock:
            hang = self._left > 0
            self._left -= hang
        if not hang:
            return super().correlate(task)
        self.hung.set()
        self._released.wait()
        raise WorkerLost("the worker shut down under a hung task")

    def close(self) -> None:
        self._released.set()
        super().close()


class FailingWorker(ConvolutionWorker):
    """Every correlate call raises `error` (see `failing`); `calls` counts them."""

    error: Exception = RuntimeError("engine fell over")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    @expose
    def correlate(self, task: WireRecord) -> WireRecord:
        self.calls += 1
        raise self.error


def failing(error: Exception) -> type[FailingWorker]:
    """A FailingWorker class whose calls raise `error`."""
    return type("FailingWorker", (FailingWorker,), {"error": error})


class CountingWorker(ConvolutionWorker):
    """Counts the blobs put on it (by id) and its gradient calls."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.puts: Counter[str] = Counter()
        self.gradient_calls = 0
        self._count_lock = threading.Lock()

    @expose
    def put_blob(self, blob_id: str, record: WireRecord) -> None:
        with self._count_lock:
            self.puts[blob_id] += 1
        super().put_blob(blob_id, record)

    @expose
    def gradient(self, task: WireRecord) -> WireRecord:
        with self._count_lock:
            self.gradient_calls += 1
        return super().gradient(task)


class ForgetfulWorker(CountingWorker):
    """Forgets every blob it holds at its `forget_at`-th gradient call (as a restart or an eviction would)."""

    forget_at = 3

    @expose
    def gradient(self, task: WireRecord) -> WireRecord:
        if self.gradient_calls + 1 == self.forget_at:
            with self._lock:
                self._blobs.clear()
        return super().gradient(task)


class OlderWorker(CountingWorker):
    """Describes itself as a worker of an older rmidl, from before gradient tasks (no `methods` in info)."""

    @expose
    def info(self) -> WireRecord:
        record = super().info()
        del record["methods"]
        record["version"] = "0.0.9"
        return record


class DyingWorker(ConvolutionWorker):
    """Its `die_in`-th gradient call kills the whole process with SIGKILL, halfway through the task."""

    die_in = 1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._calls = 0
        self._calls_lock = threading.Lock()

    @expose
    def gradient(self, task: WireRecord) -> WireRecord:
        with self._calls_lock:
            self._calls += 1
            dies = self._calls == self.die_in
        if dies:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().gradient(task)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a worker process whose first calls hang, or that dies")
    parser.add_argument("--ns", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--hang", type=int, default=1)
    parser.add_argument("--die-in-gradient", type=int, metavar="N", help="die in the N-th gradient call")
    args = parser.parse_args(argv)
    worker_class: type[ConvolutionWorker] = type("HangingWorker", (HangingWorker,), {"hang": args.hang})
    if args.die_in_gradient:
        worker_class = type("DyingWorker", (DyingWorker,), {"die_in": args.die_in_gradient})
    handle = start_worker(ns=args.ns, name=args.name, threads=1, worker_class=worker_class)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(handle.uri, flush=True)
    print("ready", flush=True)
    worker_loop(handle, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
