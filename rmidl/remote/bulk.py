"""Bulk side channel: results cross hosts over a raw (optionally TLS) socket at several times Pyro5's rate.

A worker keeps a finished result under a one-time, unguessable ticket that travels in the authenticated
Pyro5 reply; the caller connects, sends the ticket and receives the bytes with `recv_into` straight into
its output array. Wire format (both ways fixed-size headers):
    request:  MAGIC + ticket (TICKET_CHARS ascii)
    reply:    MAGIC + status byte (0 ok, 1 unknown or expired) + 8-byte big-endian length + the bytes

Nobody holds a sending thread without a ticket: one selector thread accepts connections and reads their
tickets (and does their TLS handshakes) without blocking, within TICKET_TIMEOUT seconds; only a
connection that showed a valid ticket is handed to one of `max_transfers` sending threads. Connections
still waiting for their ticket are bounded per peer address and in all, the oldest hung up on first, so
a flood of idle connections costs the flooder file descriptors and the worker nothing but a selector
entry each; a caller whose fetch still fails gets the result another way (`rmidl.client.stub`).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import selectors
import socket
import ssl
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rmidl.errors import BudgetExceeded, WorkerBusy
from rmidl.remote.bulk_fetch import MAGIC, OK, REPLY, REQUEST_BYTES, TICKET_CHARS, UNKNOWN, fetch

__all__ = ["TICKET_CHARS", "BulkServer", "fetch"]

logger = logging.getLogger(__name__)

TICKET_TIMEOUT = 2.0
"""Seconds a new connection has to finish its TLS handshake and send its ticket (a caller does so at once)."""


@dataclass
class _Waiting:
    """A connection that has not shown its ticket yet."""

    sock: socket.socket
    peer: str
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    handshaken: bool = True


class BulkServer:
    """Worker side: holds results under one-time tickets and streams each to whoever presents its ticket.

    At most `max_waiting_per_peer` connections per address and `max_waiting` in all may wait for their
    ticket (each for at most TICKET_TIMEOUT s; beyond a bound the oldest is closed); `max_transfers`
    results stream at once, each bounded by `timeout` seconds of silence.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        ssl_context: ssl.SSLContext | None = None,
        *,
        ttl: float = 120.0,
        max_bytes: int = 2 << 30,
        timeout: float = 30.0,
        ticket_timeout: float = TICKET_TIMEOUT,
        max_transfers: int = 8,
        max_waiting: int = 128,
        max_waiting_per_peer: int = 16,
    ) -> None:
        self.ssl_context = ssl_context
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.ticket_timeout = ticket_timeout
        self.max_waiting = max_waiting
        self.max_waiting_per_peer = max_waiting_per_peer
        self.refused = 0
        """Connections hung up on before they showed a ticket (over a bound, too slow, or a bad request)."""
        self._lock = threading.Lock()
        self._offers: dict[str, tuple[float, np.ndarray]] = {}
        self._waiting: OrderedDict[socket.socket, _Waiting] = OrderedDict()
        self._sending: set[socket.socket] = set()
        self._closing = threading.Event()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family, backlog=128, reuse_port=False)
        self._listener.setblocking(False)
        self._port = int(self._listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._senders = ThreadPoolExecutor(max(1, max_transfers), thread_name_prefix="rmidl-bulk-send")
        self._thread = threading.Thread(target=self._loop, name="rmidl-bulk", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._port

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return sum(array.nbytes for _, array in self._offers.values())

    @property
    def waiting(self) -> int:
        """Connections waiting for their ticket now."""
        with self._lock:
            return len(self._waiting)

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
                # is a busy worker (WorkerBusy: the caller runs the task again, uncounted, not fail its job).
                error = BudgetExceeded if array.nbytes > self.max_bytes else WorkerBusy
                raise error(
                    f"bulk result of {array.nbytes} bytes exceeds the worker's bulk budget "
                    f"({self.max_bytes} bytes, {pending} waiting to be fetched)"
                )
            ticket = secrets.token_urlsafe(32)
            self._offers[ticket] = (now + self.ttl, array)
        return ticket

    def close(self) -> None:
        """Stop accepting, hang up on connections without a ticket, end transfers in progress (bounded by
        `timeout`) and drop every offer."""
        if self._closing.is_set():
            return
        self._closing.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(self.timeout)
        self._senders.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            never_sent, self._sending = list(self._sending), set()
        for sock in never_sent:  # their transfers were cancelled before they started
            with contextlib.suppress(OSError):
                sock.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()
        with self._lock:
            self._offers.clear()

    def __enter__(self) -> BulkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the selector thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._closing.is_set():
                for key, _ in self._selector.select(self._next_timeout()):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    else:
                        self._advance(key.data)
                self._expire()
        except Exception:  # pragma: no cover - a bug here must be seen, not silently end the channel
            logger.exception("bulk channel loop failed")
        finally:
            with self._lock:
                waiting, self._waiting = list(self._waiting.values()), OrderedDict()
                sending = list(self._sending)
            for entry in waiting:
                self._drop(entry, count=False)
            for sock in sending:  # their sendall returns at once instead of at the socket timeout
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _next_timeout(self) -> float:
        with self._lock:
            first = next(iter(self._waiting.values()), None)
        if first is None:
            return 0.5
        return min(0.5, max(0.0, first.deadline - time.monotonic()))

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. out of file descriptors: try again on the next event
                logger.warning("bulk: accept failed: %s", error)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            entry = _Waiting(sock, str(address[0]), time.monotonic() + self.ticket_timeout)
            if self.ssl_context is not None:
                entry.sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                          do_handshake_on_connect=False)
                entry.handshaken = False
            self._make_room(entry.peer)
            with self._lock:
                self._waiting[entry.sock] = entry
            self._selector.register(entry.sock, selectors.EVENT_READ, entry)

    def _make_room(self, peer: str) -> None:
        """Hang up on the oldest waiting connections of `peer` and of everyone until one more fits: a
        caller sends its ticket at once, so the oldest are the idle ones."""
        with self._lock:
            same = [e for e in self._waiting.values() if e.peer == peer]
            drop = same[: max(0, len(same) - self.max_waiting_per_peer + 1)]
            others = [e for e in self._waiting.values() if e not in drop]
            drop += others[: max(0, len(others) - self.max_waiting + 1)]
        for entry in drop:
            self._drop(entry)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [e for e in self._waiting.values() if e.deadline <= now]
        for entry in late:
            self._drop(entry)

    def _drop(self, entry: _Waiting, *, count: bool = True) -> None:
        with self._lock:
            self._waiting.pop(entry.sock, None)
            self.refused += count
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(entry.sock)
        with contextlib.suppress(OSError):
            entry.sock.close()

    def _advance(self, entry: _Waiting) -> None:
        """Move a waiting connection on: its TLS handshake, then its ticket; hand it over once complete."""
        sock = entry.sock
        try:
            if not entry.handshaken:
                assert isinstance(sock, ssl.SSLSocket)
                sock.do_handshake()
                entry.handshaken = True
            chunk = sock.recv(REQUEST_BYTES - len(entry.request))
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return
        except (OSError, ValueError) as error:
            logger.debug("bulk: connection from %s failed before its ticket: %s", entry.peer, error)
            self._drop(entry)
            return
        if not chunk:
            self._drop(entry)
            return
        entry.request += chunk
        if len(entry.request) < REQUEST_BYTES:
            return
        with self._lock:
            self._waiting.pop(sock, None)
        self._selector.unregister(sock)
        request = bytes(entry.request)
        if request[: len(MAGIC)] != MAGIC:
            logger.warning("bulk: bad request from %s", entry.peer)
            self._drop(entry)
            return
        array = self._take(request[len(MAGIC) :].decode("ascii", "replace"))
        with self._lock:
            self._sending.add(sock)
        try:
            self._senders.submit(self._send, sock, array, entry.peer)
        except RuntimeError:  # shutting down
            self._finish(sock)

    def _take(self, ticket: str) -> np.ndarray | None:
        with self._lock:
            entry = self._offers.pop(ticket, None)
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1]

    # -- the sending threads ---------------------------------------------------------------------------
    def _send(self, sock: socket.socket, array: np.ndarray | None, peer: str) -> None:
        try:
            sock.settimeout(self.timeout)
            if array is None:
                sock.sendall(REPLY.pack(MAGIC, UNKNOWN, 0))
                return
            sock.sendall(REPLY.pack(MAGIC, OK, array.nbytes))
            if array.size:
                sock.sendall(array.data.cast("B"))
        except (OSError, ValueError) as error:
            logger.warning("bulk: transfer to %s failed: %s", peer, error)
        finally:
            del array  # the result's buffer goes back to its recycler now, not when the thread idles
            self._finish(sock)

    def _finish(self, sock: socket.socket) -> None:
        with self._lock:
            self._sending.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()
