"""Fault-injecting ConvolutionWorker subclasses for the tests (fault injection lives here, not in rmidl).

In-process: `start_worker(worker_class=HangingWorker)` (the conftest fixture). As a real process:
`python -m worker_doubles --ns HOST:PORT --name NAME [--hang N]` with tests/ on PYTHONPATH prints the
worker's URI and "ready", serves until SIGTERM/SIGINT, and its first N task calls hang.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from Pyro5.api import expose

from rmidl.errors import WorkerLost
from rmidl.remote.contract import WireRecord
from rmidl.server.daemon import start_worker, worker_loop
from rmidl.server.worker import ConvolutionWorker


class HangingWorker(ConvolutionWorker):
    """Its first `hang` task calls (correlate or features) block until close(), then fail as a worker
    shutting down does; `hung` is set once one is blocked. The others run normally."""

    hang = 1

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hung = threading.Event()
        self._released = threading.Event()
        self._left = self.hang
        self._left_lock = threading.Lock()

    @expose
    def correlate(self, task: WireRecord) -> WireRecord:
        self._maybe_hang()
        return super().correlate(task)

    @expose
    def features(self, task: WireRecord) -> WireRecord:
        self._maybe_hang()
        return super().features(task)

    def _maybe_hang(self) -> None:
        with self._left_lock:
            hang = self._left > 0
            self._left -= hang
        if not hang:
            return
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a worker process whose first calls hang")
    parser.add_argument("--ns", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--hang", type=int, default=1)
    args = parser.parse_args(argv)
    worker_class = type("HangingWorker", (HangingWorker,), {"hang": args.hang})
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
