"""Fault-injecting ConvolutionWorker subclasses for the tests (fault injection lives here, not in rmidl).

In-process: `start_worker(worker_class=HangingWorker)` (the conftest fixture). As a real process:
`python -m worker_doubles --ns HOST:PORT --name NAME [--hang N | --die-mid-write | --die-in-gradient N]`
with tests/ on PYTHONPATH prints the worker's URI and "ready", serves until SIGTERM/SIGINT, and its first
N task calls (correlate or features) hang (or its first shared-memory task writes half its slot and kills
the process, or its N-th gradient call kills the process with SIGKILL in the middle of the task).
`--fake` serves instead a stranger's worker: a plain Pyro5 daemon (no rmidl security) that registers
itself like a worker, accepts any handshake (and keeps what it was sent: `seen()`), and answers every
correlate with zeros.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from collections import Counter
from typing import Any

import numpy as np
import Pyro5.api
import Pyro5.server
from Pyro5.api import expose

from rmidl.config import Config
from rmidl.errors import SharedMemoryUnavailable, WorkerBusy, WorkerLost
from rmidl.remote.contract import CorrelateTask, ShmRef, WireRecord
from rmidl.remote.naming import object_name, worker_tags
from rmidl.remote.wire import pack, unpack
from rmidl.server.attachments import AttachedBlocks
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


class GatedWorker(ConvolutionWorker):
    """Its correlate calls wait until `gate` is set (by the test, or by close()), then run normally: a
    job that stays live while a test looks at it. `waiting` is set once a call waits."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    @expose
    def correlate(self, task: WireRecord) -> WireRecord:
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait()
        return super().correlate(task)

    def close(self) -> None:
        self.gate.set()
        super().close()


class FailingWorker(ConvolutionWorker):
    """Every correlate call raises `error` (see `failing`); `calls` counts them, the first sets `called`."""

    error: Exception = RuntimeError("engine fell over")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls = 0
        self.called = threading.Event()

    @expose
    def correlate(self, task: WireRecord) -> WireRecord:
        self.calls += 1
        self.called.set()
        raise self.error


class DyingWorker(ConvolutionWorker):
    """Its first task with a shared-memory output writes NaN over half of its slot, then SIGKILLs the
    worker's own process: a worker killed mid-write (of one image's task or a batch's)."""

    @expose
    def correlate(self, task: WireRecord) -> WireRecord:
        record = CorrelateTask.from_wire(task, max_bytes=self._config.max_message_size)
        if isinstance(record.output, ShmRef):
            block = self._attach(record.output)
            batch = block if record.images is not None else block[None]
            (n0, n1), (k0, k1), (r0, r1) = record.images or (0, 1), record.kernels, record.rows
            target = batch[n0:n1, k0:k1, r0:r1]
            target.flat[: target.size // 2] = np.nan  # .flat writes through a strided view
            os.kill(os.getpid(), signal.SIGKILL)
        return super().correlate(task)


class RefusingBlocks(AttachedBlocks):
    """Maps no block: every attach is refused as a foreign user's or pid namespace's would be."""

    def attach(self, ref: ShmRef) -> np.ndarray:
        raise SharedMemoryUnavailable(f"this worker cannot map shared block {ref.name}")


class ShmRefusingWorker(ConvolutionWorker):
    """Cannot map any caller's shared memory (as a worker of another user or pid namespace)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._attached.close()
        self._attached = RefusingBlocks(1, name=self._name)


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


class GradientDyingWorker(ConvolutionWorker):
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


class BlockingWorker(ConvolutionWorker):
    """Its engine calls block until `release` is set (each one releases `entered` once when it starts), so
    a test holds tasks inside the worker for as long as it likes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def _compute_into(self, images: np.ndarray, kernels: np.ndarray, out: np.ndarray, engine: str,
                      spectra: Any = None) -> str:
        self.entered.release()
        self.release.wait()
        return super()._compute_into(images, kernels, out, engine, spectra)

    def close(self) -> None:
        self.release.set()
        super().close()


class BusyWorker(ConvolutionWorker):
    """Its first `busy` correlate calls are refused as WorkerBusy (as a worker full of others' tasks
    refuses them); `refusals` counts them. The others run normally."""

    busy = 4

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refusals = 0
        self._count_lock = threading.Lock()

    @expose
    def correlate(self, task: WireRecord) -> WireRecord:
        with self._count_lock:
            refuse = self.refusals < self.busy
            self.refusals += refuse
        if refuse:
            raise WorkerBusy(f"worker {self._name} is busy (test double)")
        return super().correlate(task)


class ZeroWorker(ConvolutionWorker):
    """A stranger's worker: answers every inline correlate with zeros of the right shape."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.correlate_calls = 0
        self.handshakes: list[Any] = []

    @expose
    def correlate(self, task: WireRecord) -> WireRecord:
        self.correlate_calls += 1
        reply = super().correlate(task)
        if "result" in reply:
            reply["result"] = pack(np.zeros_like(unpack(reply["result"])))
        return reply

    @expose
    def seen(self) -> dict[str, Any]:
        """What the fake learnt: its correlate calls and every handshake's data, as sent."""
        return {"correlate_calls": self.correlate_calls, "handshakes": [repr(h) for h in self.handshakes]}


def serve_fake(ns: str, name: str, stop: threading.Event) -> None:
    """Serve a ZeroWorker on a plain Pyro5 daemon registered at `ns` as worker `name` (prints its URI and
    "ready"), until `stop`."""
    worker = ZeroWorker(name=name, config=Config(environ={}), threads=1)

    class OpenDaemon(Pyro5.server.Daemon):
        def validateHandshake(self, conn: Any, data: Any) -> Any:  # Pyro5's name
            worker.handshakes.append(data)
            return "hello"

    Pyro5.api.config.SERIALIZER = "msgpack"
    daemon = OpenDaemon(host="127.0.0.1", port=0)
    uri = str(daemon.register(worker, objectId=object_name(name)))
    with Pyro5.api.Proxy(f"PYRO:Pyro.NameServer@{ns}") as registry:
        tags = worker_tags(host="127.0.0.1", cores=1, version="0.1.0")
        registry.register(object_name(name), uri, metadata=tags)
    print(uri, flush=True)
    print("ready", flush=True)
    thread = threading.Thread(target=daemon.requestLoop, daemon=True)
    thread.start()
    stop.wait()
    daemon.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a worker process whose first calls hang, or that dies")
    parser.add_argument("--ns", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--hang", type=int, default=1)
    parser.add_argument("--die-in-gradient", type=int, metavar="N", help="die in the N-th gradient call")
    parser.add_argument("--fake", action="store_true", help="a stranger's worker that answers zeros")
    parser.add_argument("--die-mid-write", action="store_true")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if args.fake:
        serve_fake(args.ns, args.name, stop)
        return 0
    worker_class: type[ConvolutionWorker] = type("HangingWorker", (HangingWorker,), {"hang": args.hang})
    if args.die_mid_write:
        worker_class = DyingWorker
    if args.die_in_gradient:
        worker_class = type("GradientDyingWorker", (GradientDyingWorker,), {"die_in": args.die_in_gradient})
    handle = start_worker(ns=args.ns, name=args.name, threads=1, worker_class=worker_class)
    print(handle.uri, flush=True)
    print("ready", flush=True)
    worker_loop(handle, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
