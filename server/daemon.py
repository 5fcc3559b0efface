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
from rmidl.errors import AuthenticationError, ClusterError, OptionError
from rmidl.kernels import available_cores
from rmidl.metrics import MetricsServer, info_readings, serve_metrics
from rmidl.remote.bulk import BulkServer
from rmidl.remote.naming import (
    check_worker_name,
    ensure_registered,
    object_name,
    register_worker,
    unregister_worker,
    worker_tags,
)
from rmidl.remote.security import Limits, SecretHandshake, check_bind, probe_bind, server_ssl_context
from rmidl.remote.transport import configure_pyro, connect_ns, worker_proxy
from rmidl.server.worker import ConvolutionWorker

__all__ = ["WorkerDaemon", "WorkerHandle", "metadata", "start_worker", "worker_loop"]

logger = logging.getLogger(__name__)

_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SPARE_HANDLERS = 8
"""Request threads a worker keeps beyond `worker_max_tasks`, so a full worker still answers pings."""


class WorkerDaemon(SecretHandshake, Pyro5.server.Daemon):
    """A Pyro5 daemon that serves through rmidl's bounded connection server and, with a cluster secret,
    only clients that proved they know it (`SecretHandshake`)."""


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
    metrics: MetricsServer | None = None
    """Its metrics endpoint (`start_worker(metrics_port=...)`), closed with it."""
    _thread: threading.Thread | None = field(default=None, repr=False)
    _heartbeat: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def object_name(self) -> str:
        return object_name(self.name)

    def serve_in_thread(self) -> threading.Thread:
        """Run the request loop in a background thread (tests, `rmidl worker`)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.daemon.requestLoop, name=f"rmidl-worker-{self.name}", daemon=True
            )
            self._thread.start()
        return self._thread

    def keep_registered(self) -> None:
        """Check every `heartbeat_interval` seconds that the registry names this worker, and register it
        again if not: after a name server restart, or a coordinator that took it for dead (started by
        `start_worker` when it registers; stopped by `close`)."""
        if self._heartbeat is None and self.ns_address:
            self._heartbeat = threading.Thread(target=self._beat, name=f"rmidl-heartbeat-{self.name}",
                                               daemon=True)
            self._heartbeat.start()

    def _beat(self) -> None:
        assert self.ns_address is not None
        config = self.config
        # A hung name server must not keep the beat (or close()) waiting longer than one interval.
        beat = max(0.5, config.heartbeat_interval)
        quick = config.replace(connect_timeout=min(config.connect_timeout, beat))
        refused = False
        while not self._stop.wait(config.heartbeat_interval):
            try:
                with connect_ns(self.ns_address, quick) as registry:
                    again = ensure_registered(registry, self.name, self.uri, sorted(metadata(self)),
                                              alive=lambda uri: _alive(uri, quick))
                if again:
                    logger.warning("worker %s was not registered at %s; registered again", self.name,
                                   self.ns_address)
                refused = False
            except OptionError as error:  # our name is held by another live worker: say so once
                if not refused:
                    logger.warning("worker %s cannot register again: %s", self.name, error)
                refused = True
            except Exception as error:  # name server down or restarting: try again next beat
                logger.debug("heartbeat of %s: %s", self.name, error)

    def close(self, timeout: float = 5.0) -> None:
        """Unregister, stop serving, drop the bulk channel and shared blocks (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout)
        if self.ns_address:
            _unregister(self.ns_address, self.config, self.name, self.uri)
        self.worker.close()  # first: refuses queued tasks, so the daemon's threads can finish
        self.daemon.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.bulk is not None:
            self.bulk.close()
        if self.metrics is not None:
            self.metrics.close()

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
    worker_class: type[ConvolutionWorker] = ConvolutionWorker,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> WorkerHandle:
    """Create a worker daemon on host:port and register it under `rmidl.worker.<name>` at `ns` (if given).

    The daemon is not yet serving: call `handle.serve_in_thread()` or `worker_loop(handle)`.
    `worker_class` serves a subclass of ConvolutionWorker instead (an instrumented worker, or the test
    suite's fault-injecting ones); it is built with the same keywords. `metrics_port` (0: any free one)
    serves Prometheus metrics on `metrics_host` (`rmidl.metrics.serve_metrics`), as `handle.metrics`.
    """
    config = config or Config()
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "-", f"{socket.gethostname()}-{os.getpid()}")
    check_worker_name(name)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise OptionError(f"threads={threads!r} must be a positive integer")
    if not 0 <= port <= 65535:
        raise OptionError(f"port {port} is outside 0-65535")
    check_bind(host, config, insecure=insecure, what=f"worker {name}")
    configure_pyro(config)
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
        worker = worker_class(name=name, config=config, threads=threads, host=advertised, bulk=bulk_server)
        # Beyond the tasks it admits, handler threads stay free for pings, info and blobs.
        limits = Limits.from_config(config, handlers=config.worker_max_tasks + SPARE_HANDLERS)
        daemon = WorkerDaemon(host=host, port=port, secret=config.secret, limits=limits, **nat)
    except BaseException:
        if bulk_server is not None:
            bulk_server.close()
        raise
    uri = str(daemon.register(worker, objectId=object_name(name)))
    handle = WorkerHandle(name, uri, advertised, daemon, worker, bulk_server, config)
    if metrics_port is not None:
        try:
            handle.metrics = serve_metrics(metrics_port, metrics_host, config=config,
                                           readings=info_readings(worker.info))
        except BaseException:
            handle.close()
            raise
    if ns is not None:
        try:
            _register(ns, config, handle)
        except BaseException:
            handle.close()
            raise
        handle.ns_address = ns
        handle.keep_registered()
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


def metadata(handle: WorkerHandle) -> set[str]:
    """The name-server tags by which coordinators discover a worker."""
    return set(worker_tags(host=handle.host, cores=available_cores(), version=rmidl.__version__))


def _register(ns: str, config: Config, handle: WorkerHandle) -> None:
    with connect_ns(ns, config) as registry:
        register_worker(registry, handle.name, handle.uri, sorted(metadata(handle)),
                        alive=lambda uri: _alive(uri, config))


def _unregister(ns: str, config: Config, name: str, uri: str) -> None:
    try:
        with connect_ns(ns, config) as registry:
            unregister_worker(registry, name, uri)
    except (ClusterError, Pyro5.errors.PyroError) as error:
        logger.warning("could not unregister %s from %s: %s", object_name(name), ns, error)


def _alive(uri: str, config: Config) -> bool:
    """Whether a live worker of this cluster answers at `uri` (one that cannot authenticate is not)."""
    try:
        with worker_proxy(uri, config, timeout=config.connect_timeout) as proxy:
            return bool(proxy.ping() == "pong")
    except (Pyro5.errors.PyroError, AuthenticationError):
        return False

