"""Bulk side channel: results cross hosts over a raw (optionally TLS) socket at several times Pyro5's rate.

A worker keeps a finished result under a one-time, unguessable ticket that travels in the
authenticated Pyro5 reply; the caller connects, sends the ticket and receives the bytes with
`recv_into` straight into its output array. Wire format (both ways fixed-size headers):
    request:  MAGIC + ticket (TICKET_CHARS ascii)
    reply:    MAGIC + status byte (0 ok, 1 unknown or expired) + 8-byte big-endian length + the bytes
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import socketserver
import ssl
import struct
import threading
import time
from typing import Any

import numpy as np

from rmidl.errors import BudgetExceeded, ClusterError, ShapeError, WorkerLost

__all__ = ["BulkServer", "fetch"]

logger = logging.getLogger(__name__)

MAGIC = b"RMB1"
TICKET_CHARS = 43  # secrets.token_urlsafe(32): 256 random bits
_REPLY = struct.Struct("!4sBQ")
OK, UNKNOWN = 0, 1


class _TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True  # server_close() joins the handler threads (each bounded by the socket timeout)

    def __init__(self, host: str, bulk: BulkServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.bulk = bulk
        # Anyone who can reach the port may connect before showing a ticket: bound the threads they get.
        self._slots = threading.BoundedSemaphore(bulk.max_connections)
        super().__init__((host, 0), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            logger.warning("bulk: %d connections open; refused %s", self.bulk.max_connections, client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        sock.settimeout(self.bulk.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.bulk.ssl_context is not None:
            # The handshake runs in the handler thread, so a slow client cannot stall accept().
            sock = self.bulk.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        bulk: BulkServer = self.server.bulk  # type: ignore[attr-defined]
        if not bulk._await_ticket(sock):
            return
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock.do_handshake()
            request = _recv_exact(sock, len(MAGIC) + TICKET_CHARS)
            bulk._got_ticket(sock)
            if request[: len(MAGIC)] != MAGIC:
                logger.warning("bulk: bad request from %s", self.client_address)
                return
            array = bulk._take(request[len(MAGIC) :].decode("ascii", "replace"))
            if array is None:
                sock.sendall(_REPLY.pack(MAGIC, UNKNOWN, 0))
                return
            sock.sendall(_REPLY.pack(MAGIC, OK, array.nbytes))
            if array.size:
                sock.sendall(array.data.cast("B"))
        except (OSError, ConnectionError, ValueError) as error:
            logger.warning("bulk: transfer to %s failed: %s", self.client_address, error)
        finally:
            bulk._got_ticket(sock)


class BulkServer:
    """Worker side: holds results under one-time tickets and streams each to whoever presents its ticket.

    At most `max_connections` connections are served at once (a silent one for at most `timeout` seconds);
    more are closed at once, before a byte is read.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        *,
        ttl: float = 120.0,
        max_bytes: int = 2 << 30,
        timeout: float = 30.0,
        max_connections: int = 32,
    ) -> None:
        self.ssl_context = ssl_context
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._offers: dict[str, tuple[float, np.ndarray]] = {}
        self._idle: set[socket.socket] = set()  # connections that have not sent their ticket yet
        self._closing = False
        self._server = _TCPServer(host, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="rmidl-bulk", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return sum(array.nbytes for _, array in self._offers.values())

    def offer(self, array: np.ndarray) -> str:
        """Keep `array` (not copied if contiguous) for one fetch within `ttl` seconds; return its ticket."""
        array = np.ascontiguousarray(array)
        now = time.monotonic()
        with self._lock:
            for ticket in [t for t, (expires, _) in self._offers.items() if expires < now]:
                logger.warning("bulk: result under an expired ticket was never fetched; dropped")
                del self._offers[ticket]
            pending = sum(a.nbytes for _, a in self._offers.values())
            if pending + array.nbytes > self.max_bytes:
                # Too big on its own is the task's fault; too big beside results still to be fetched
                # is a busy worker (ClusterError: the caller runs the task again, not fail its job).
                error = BudgetExceeded if array.nbytes > self.max_bytes else ClusterError
                raise error(
                    f"bulk result of {array.nbytes} bytes exceeds the worker's bulk budget "
                    f"({self.max_bytes} bytes, {pending} waiting to be fetched)"
                )
            ticket = secrets.token_urlsafe(32)
            self._offers[ticket] = (now + self.ttl, array)
        return ticket

    def _take(self, ticket: str) -> np.ndarray | None:
        with self._lock:
            entry = self._offers.pop(ticket, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    def _await_ticket(self, sock: socket.socket) -> bool:
        """Note a connection waiting for its ticket, so close() can hang up on it; False once closing."""
        with self._lock:
            if not self._closing:
                self._idle.add(sock)
            return not self._closing

    def _got_ticket(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle.discard(sock)

    def close(self) -> None:
        """Stop serving, hang up on connections that sent no ticket yet, wait for transfers in progress
        (bounded by `timeout`) and drop every offer."""
        self._server.shutdown()
        with self._lock:
            self._closing = True
            idle, self._idle = list(self._idle), set()
        for sock in idle:  # their recv returns at once instead of at the socket timeout
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._server.server_close()
        self._thread.join(timeout=self.timeout)
        with self._lock:
            self._offers.clear()

    def __enter__(self) -> BulkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch(
    host: str,
    port: int,
    ticket: str,
    out: np.ndarray,
    *,
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Receive the result under `ticket` straight into `out` (e.g. `result[k0:k1, r0:r1, :]`); return bytes.

    `out` may be a strided view as long as each `out[i]` is contiguous; the bytes land chunk by chunk
    with `recv_into`, never through an intermediate buffer.
    """
    chunks = _contiguous_chunks(out)
    if len(ticket) != TICKET_CHARS or not ticket.isascii():
        raise ShapeError(f"bulk ticket {ticket[:8]!r}... is malformed")
    where = f"{host}:{port}"
    sock: socket.socket | None = None
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        sock.sendall(MAGIC + ticket.encode("ascii"))
        magic, status, nbytes = _REPLY.unpack(_recv_exact(sock, _REPLY.size))
        if magic != MAGIC:
            raise WorkerLost(f"bulk channel {where} answered with a bad header")
        if status != OK:
            raise WorkerLost(f"bulk channel {where}: ticket unknown or expired (run the task again)")
        if nbytes != out.nbytes:
            raise ShapeError(f"bulk result from {where} has {nbytes} bytes; out {out.shape} has {out.nbytes}")
        for chunk in chunks:
            _recv_into_exact(sock, chunk)
        return int(nbytes)
    except (OSError, ConnectionError) as error:
        raise WorkerLost(f"bulk transfer from {where} failed: {error}") from None
    finally:
        if sock is not None:
            sock.close()


def _contiguous_chunks(out: np.ndarray) -> list[memoryview]:
    if not out.flags.writeable:
        raise ShapeError("bulk fetch needs a writable output array")
    if out.flags.c_contiguous:
        return [out.data.cast("B")] if out.size else []
    if out.ndim == 0 or not all(out[i].flags.c_contiguous for i in range(out.shape[0])):
        raise ShapeError(f"bulk fetch needs out[i] contiguous; got strides {out.strides}, shape {out.shape}")
    return [out[i].data.cast("B") for i in range(out.shape[0]) if out[i].size]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    _recv_into_exact(sock, memoryview(buffer))
    return bytes(buffer)


def _recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    received, total = 0, view.nbytes
    while received < total:
        n = sock.recv_into(view[received:], min(total - received, 1 << 22))
        if n == 0:
            raise ConnectionError(f"connection closed after {received} of {total} bytes")
        received += n
