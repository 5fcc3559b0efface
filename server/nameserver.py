"""The name server (the RMI registry): start it (library) and serve it (loop).

`rmidl ns` (client/cli/ns.py) is the command line over these.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections import Counter
from typing import Any

import Pyro5.errors
import Pyro5.nameserver
import Pyro5.server
from Pyro5 import config as pyro_config

from rmidl.config import Config, MiB
from rmidl.errors import OptionError
from rmidl.metrics import MetricsServer, Reading, serve_metrics
from rmidl.remote.security import Limits, SecretHandshake, check_bind, probe_bind
from rmidl.remote.transport import configure_pyro

__all__ = ["NS_MAX_MESSAGE_SIZE", "NameServerDaemon", "address_of", "ns_loop", "start_ns"]

logger = logging.getLogger(__name__)

NS_MAX_MESSAGE_SIZE = 1 * MiB
"""Largest message `rmidl ns` accepts: a name server sees only registrations and lookups."""
NS_HANDLERS = 8
"""Requests the name server handles at once (each takes microseconds; more wait their turn)."""
NS_SERIALIZERS = ("msgpack", "serpent", "json")
"""What a client may shake hands in: rmidl's msgpack, and Pyro5's own tools (nsc speaks serpent)."""


class NameServerDaemon(SecretHandshake, Pyro5.nameserver.NameServerDaemon):
    """Pyro5's name server daemon, served like every rmidl daemon (`SecretHandshake`: bounded connections,
    mutual authentication with a secret), with an optional broadcast responder."""

    broadcast: Pyro5.nameserver.BroadcastServer | None = None
    broadcast_thread: threading.Thread | None = None
    metrics: MetricsServer | None = None

    def handleRequest(self, conn: Any) -> Any:  # noqa: N802 (Pyro5's name)
        # Pyro5's version turns protocol errors into warnings.warn, which our tests (rightly) treat as
        # errors; a bad client is the daemon's log business, not a warning in the host program.
        try:
            return Pyro5.server.Daemon.handleRequest(self, conn)
        except Pyro5.errors.ProtocolError as error:
            logger.warning("protocol error from a name server client: %s", error)
            raise

    def serve_in_thread(self) -> threading.Thread:
        """Run the request loop in a background thread; stop it with `shutdown()` and join it."""
        thread = threading.Thread(target=self.requestLoop, name="rmidl-ns", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        if self.broadcast is not None:
            self.broadcast.close()
            self.broadcast = None
        if self.broadcast_thread is not None:
            self.broadcast_thread.join(3.0)  # its socket times out every 2 s, then it sees the flag
            self.broadcast_thread = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        super().close()

    def readings(self) -> list[Reading]:
        """Gauges for the metrics endpoint: registrations by role (rmidl.worker.*, rmidl.coordinator.*)."""
        names = self.nameserver.list(prefix="rmidl.")
        roles = Counter(name.split(".")[1] for name in names if "." in name[len("rmidl."):])
        return [("rmidl_ns_registrations", "Names registered, by role (worker, coordinator)", {"role": role},
                 count) for role, count in sorted(roles.items())]


def start_ns(
    host: str = "127.0.0.1",
    port: int = 9090,
    *,
    config: Config | None = None,
    broadcast: bool = False,
    insecure: bool = False,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> tuple[str, NameServerDaemon]:
    """Create a name server on host:port (port 0: any free one); returns (uri, daemon), not yet serving.
    `metrics_port` serves Prometheus metrics on `metrics_host` as `daemon.metrics`, closed with it."""
    config = config or Config()
    if not 0 <= port <= 65535:
        raise OptionError(f"port {port} is outside 0-65535")
    check_bind(host, config, insecure=insecure, what="name server")
    configure_pyro(config)
    probe_bind("name server", host, port)
    limits = Limits.from_config(config, handlers=NS_HANDLERS, serializers=NS_SERIALIZERS)
    daemon = NameServerDaemon(host=host, port=port, secret=config.secret, limits=limits)
    uri = str(daemon.uriFor(daemon.nameserver))
    if broadcast:
        internal = daemon.uriFor(daemon.nameserver, nat=False)
        try:
            bc_host, bc_port = pyro_config.NS_BCHOST or "0.0.0.0", pyro_config.NS_BCPORT
            probe_bind("broadcast responder", bc_host, bc_port, socket.SOCK_DGRAM)
            daemon.broadcast = Pyro5.nameserver.BroadcastServer(internal)
        except BaseException:
            daemon.close()
            raise
        daemon.broadcast_thread = daemon.broadcast.runInThread()
    if metrics_port is not None:
        try:
            daemon.metrics = serve_metrics(metrics_port, metrics_host, config=config,
                                           readings=daemon.readings)
        except BaseException:
            daemon.close()
            raise
    logger.info("name server at %s", uri)
    return uri, daemon


def address_of(daemon: NameServerDaemon) -> str:
    """"HOST:PORT" of a started name server, as `--ns` takes it."""
    return str(daemon.locationStr)


def ns_loop(daemon: NameServerDaemon, stop: threading.Event | None = None) -> None:
    """Serve until `stop` is set (or forever), then close the daemon."""
    stop = stop or threading.Event()
    thread = daemon.serve_in_thread()
    try:
        while thread.is_alive() and not stop.wait(0.5):
            pass
    finally:
        daemon.shutdown()
        thread.join(5.0)

