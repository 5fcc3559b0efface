"""Worker daemons: start one and register it with the name server (library), serve it (loop).

`rmidl worker` (client/cli/worker.py) is the command line over these.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import Pyro5.errors
import Pyro5.server
import Pyro5.socketutil

import rmidl
from rmidl.config import Config
from rmidl.errors import OptionError, RegistryError
from rmidl.kernels import available_cores
from rmidl.remote.bulk import BulkServer
from rmidl.remote.contract import WORKER_PREFIX
from rmidl.remote.security import SecretHandshake, check_bind, probe_bind, server_ssl_context
from rmidl.remote.transport import WORKER_METADATA, configure_pyro, connect_ns, worker_proxy
from rmidl.server.worker import HANG_ENV, ConvolutionWorker

__all__ = ["WorkerDaemon", "WorkerHandle", "metadata", "start_worker", "worker_loop"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class WorkerDaemon(SecretHandshake, Pyro5.server.Daemon):
    """A Pyro5 daemon that refuses connections without the cluster secret (when one is set)."""


@dataclass
class WorkerHandle:
    """A started worker: its daemon (not yet looping), the served object and its registration."""

    name: str
    uri: str
    host: str
    daemon: WorkerDaemon
    worker: ConvolutionWorker
    bulk: BulkServer | None
    config: Config
    ns_address: str | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def object_name(self) -> str:
        return WORKER_PREFIX + self.name

    def serve_in_thread(self) -> threading.Thread:
        """Run the request loop in a background thread (tests, `rmidl worker`)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.daemon.requestLoop, name=f"rmidl-worker-{self.name}", daemon=True
            )
            self._thread.start()
        return self._thread

    def close(self, timeout: float = 5.0) -> None:
        """Unregister, stop serving, release hung calls, the bulk channel and shared memory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.ns_address:
            _unregister(self.ns_address, self.config, self.object_name, self.uri)
        self.worker.close()  # first: lets hung test calls return so the daemon's threads can finish
        self.daemon.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.bulk is not None:
            self.bulk.close()

    def __enter__(self) -> WorkerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_worker(
    *,
    ns: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    threads: int | None = None,
    name: str | None = None,
    config: Config | None = None,
    insecure: bool = False,
    bulk: bool = True,
    hang_tasks: int | None = None,
) -> WorkerHandle:
    """Create a worker daemon on host:port and register it under `rmidl.worker.<name>` at `ns` (if given).

    The daemon is not yet serving: call `handle.serve_in_thread()` or `worker_loop(handle)`.
    """
    config = config or Config()
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{os.getpid()}")
    if not _NAME.match(name):
        raise OptionError(f"worker name {name!r} must be letters, digits, '_', '.' or '-' (at most 100)")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise OptionError(f"threads={threads!r} must be a positive integer")
    if not 0 <= port <= 65535:
        raise OptionError(f"port {port} is outside 0-65535")
    check_bind(host, config, insecure=insecure, what=f"worker {name}")
    configure_pyro(config)
    if hang_tasks is None:
        hang_tasks = _hang_tasks_from_env()
    advertised = host
    nat: dict[str, Any] = {}
    if host in _WILDCARD_HOSTS:
        # A URI must name a reachable address, not the wildcard: advertise this host's outward IP.
        advertised = str(Pyro5.socketutil.get_ip_address("", workaround127=True))
        nat = {"nathost": advertised, "natport": 0}
    probe_bind(f"worker {name}", host, port)  # the bulk channel binds the same host
    bulk_server = None
    if bulk:
        context = server_ssl_context(config)
        bulk_server = BulkServer(host or "0.0.0.0", context, max_bytes=config.memory_budget)
    try:
        worker = ConvolutionWorker(
            name=name,
            config=config,
            threads=threads,
            host=advertised,
            bulk=bulk_server,
            hang_tasks=hang_tasks,
        )
        daemon = WorkerDaemon(host=host, port=port, secret=config.secret, **nat)
    except BaseException:
        if bulk_server is not None:
            bulk_server.close()
        raise
    uri = str(daemon.register(worker, objectId=WORKER_PREFIX + name))
    handle = WorkerHandle(name, uri, advertised, daemon, worker, bulk_server, config)
    if ns is not None:
        try:
            _register(ns, config, handle)
        except BaseException:
            handle.close()
            raise
        handle.ns_address = ns
    logger.info("worker %s serving at %s", name, uri)
    return handle


def worker_loop(handle: WorkerHandle, stop: threading.Event | None = None) -> None:
    """Serve until `stop` is set (or forever), then close the handle."""
    stop = stop or threading.Event()
    thread = handle.serve_in_thread()
    try:
        while thread.is_alive() and not stop.wait(0.5):
            pass
    finally:
        handle.close()


def _hang_tasks_from_env() -> int:
    value = os.environ.get(HANG_ENV, "0")
    try:
        return max(0, int(value))
    except ValueError:
        raise OptionError(f"{HANG_ENV}={value!r} is not an integer") from None


def metadata(handle: WorkerHandle) -> set[str]:
    """The name-server tags by which coordinators discover a worker."""
    return set(WORKER_METADATA) | {
        f"host:{handle.host}",
        f"cores:{available_cores()}",
        f"version:{rmidl.__version__}",
    }


def _register(ns: str, config: Config, handle: WorkerHandle) -> None:
    with connect_ns(ns, config) as registry:
        try:
            registry.register(handle.object_name, handle.uri, safe=True, metadata=sorted(metadata(handle)))
            return
        except Pyro5.errors.NamingError:
            previous = str(registry.lookup(handle.object_name))
        if _alive(previous, config):
            raise OptionError(f"worker name {handle.name!r} is taken by a live worker at {previous}")
        logger.info("replacing stale registration of %s (%s)", handle.name, previous)
        registry.register(handle.object_name, handle.uri, safe=False, metadata=sorted(metadata(handle)))


def _unregister(ns: str, config: Config, object_name: str, uri: str) -> None:
    try:
        with connect_ns(ns, config) as registry:
            # Only our own entry: a newer worker may have taken the name over.
            if str(registry.lookup(object_name)) == uri:
                registry.remove(object_name)
    except (RegistryError, Pyro5.errors.PyroError) as error:
        logger.warning("could not unregister %s from %s: %s", object_name, ns, error)


def _alive(uri: str, config: Config) -> bool:
    try:
        with worker_proxy(uri, config, timeout=config.connect_timeout) as proxy:
            return bool(proxy.ping() == "pong")
    except Pyro5.errors.PyroError:
        return False

