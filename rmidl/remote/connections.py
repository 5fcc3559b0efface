"""The transport server of every rmidl daemon: bounded connections, deadlines, whole messages only.

Pyro5's own servers cannot be defended against a stranger who can open TCP connections: the thread pool
server gives each connection a thread for its whole life, so N idle or half-open connections lock every
client out ("no free workers"); the multiplex server reads each message in its one loop thread, so one
peer stalling mid-message stalls the daemon. Here one selector thread owns every connection and reads
what arrives without blocking into that connection's buffer; only a whole message, its header checked
first (type, size, serializer, flags), goes to a small bounded pool of handler threads, where Pyro5's
daemon reads it from the buffer and answers. So a connection costs a thread only while its request is
handled, and a request that is not whole costs none.

Bounds and deadlines (`Limits`, and which connection gives way: rmidl/remote/limits.py): at most
`max_connections` connections, `per_peer` of them from one host; at a bound the connection quiet the
longest makes room, strangers (not yet authenticated) before members, and never one whose request is
being handled. A new connection has `handshake_timeout` for its TLS and Pyro5 handshakes and its
authentication, a message may go `io_timeout` without progress (a peer that stops sending, or stops
reading our answer), and an idle connection is closed after `idle_timeout`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import Pyro5.core
import Pyro5.errors
from Pyro5 import protocol

from rmidl.remote.framing import (
    HANDSHAKE_MAX_BYTES,
    HELLO,
    READY,
    TLS,
    Connection,
    Header,
    Refused,
    connect_fail,
)
from rmidl.remote.limits import Limits, check_header, make_room, overdue

__all__ = ["HANDSHAKE_MAX_BYTES", "ConnectionServer", "Limits"]

log = logging.getLogger(__name__)

_ACCEPTS_PER_WAKE = 64
_HOUSEKEEPING_S = 5.0


class _Handlers:
    """Up to `size` daemon threads, started as work arrives, each running `work(conn)` for queued ones
    and then `done(conn)` (once it counts as free again, so sequential requests reuse one thread)."""

    def __init__(self, size: int, work: Callable[[Connection], None], done: Callable[[Connection], None],
                 name: str) -> None:
        self.size = size
        self.work = work
        self.done = done
        self.name = name
        self._queue: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._free = 0
        self._lock = threading.Lock()

    def submit(self, conn: Connection) -> None:
        self._queue.put(conn)
        with self._lock:
            if self._free:
                self._free -= 1  # a thread between two items takes it
            elif len(self._threads) < self.size:
                thread = threading.Thread(target=self._run, name=f"{self.name}-{len(self._threads)}",
                                          daemon=True)
                self._threads.append(thread)
                thread.start()
            # else: every thread is busy; the request waits its turn

    def _run(self) -> None:
        while (conn := self._queue.get()) is not None:
            try:
                self.work(conn)
            finally:
                with self._lock:
                    self._free += 1
                self.done(conn)

    def stop(self) -> None:
        with self._lock:
            count = len(self._threads)
        for _ in range(count):
            self._queue.put(None)


class ConnectionServer:
    """A Pyro5 transport server (what `Daemon.transportServer` is); see the module docstring.

    Made with `adopting()` from the listening socket of the server Pyro5's Daemon constructor bound.
    """

    def __init__(self, daemon: Any, listening: socket.socket, location: str, limits: Limits) -> None:
        self.daemon = daemon
        self.sock: socket.socket | None = listening
        self.locationStr = location
        self.limits = limits
        if isinstance(listening, ssl.SSLSocket):
            # accept() would run the TLS handshake in the selector thread and block on a silent peer.
            listening.do_handshake_on_connect = False  # type: ignore[attr-defined]
        listening.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listening, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        self._conns: set[Connection] = set()
        self._per_peer: Counter[str] = Counter()
        self._returned: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        self._handlers = _Handlers(max(1, limits.handlers), self._handle, self._give_back,
                                   f"rmidl-{location}-handler")
        self._stopping = threading.Event()
        self._done = threading.Event()
        self._done.set()
        self._closed = False
        self._accept_paused_until = 0.0
        self._tick = max(0.01, min(1.0, limits.handshake_timeout / 4, limits.io_timeout / 4))
        self.dropped: Counter[str] = Counter()
        """Connections closed by reason ("room", "idle", "io timeout", "refused", ...): for logs and tests."""

    @classmethod
    def adopting(cls, server: Any, daemon: Any, limits: Limits) -> ConnectionServer:
        """Take over the bound listening socket of a Pyro5 multiplex server (which owns nothing else)."""
        listening, server.sock = server.sock, None
        server.selector.close()
        return cls(daemon, listening, server.locationStr, limits)

    def __repr__(self) -> str:
        return f"<ConnectionServer on {self.locationStr}; {len(self._conns)} connections>"

    @property
    def connections(self) -> int:
        return len(self._conns)

    @property
    def sockets(self) -> list[Any]:
        return [self.sock] if self.sock is not None else []

    @property
    def selector(self) -> Any:
        raise TypeError("rmidl's connection server has no selector to share")

    def combine_loop(self, server: Any) -> None:
        raise TypeError("rmidl's connection server cannot combine loops")

    def events(self, eventsockets: Any) -> None:
        raise TypeError("rmidl's connection server runs its own loop (requestLoop)")

    # -- the loop ------------------------------------------------------------------------------------
    def loop(self, loopCondition: Callable[[], bool] = lambda: True) -> None:  # noqa: N803 (Pyro5's name)
        self._done.clear()
        housekeeping = time.monotonic() + _HOUSEKEEPING_S
        sweep = 0.0
        try:
            while not self._stopping.is_set() and loopCondition():
                for key, _ in self._selector.select(self._tick):
                    if key.data is None:
                        self._accept()
                    elif key.data is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        self._on_readable(key.data)
                self._take_back()
                now = time.monotonic()
                if now >= sweep:
                    sweep = now + self._tick
                    self._sweep(now)
                if now >= housekeeping:
                    housekeeping = now + _HOUSEKEEPING_S
                    self.daemon._housekeeping()
        finally:
            for conn in list(self._conns):
                self._drop(conn, None)
            self._done.set()

    def wakeup(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def shutdown(self) -> None:
        self._stopping.set()
        self.wakeup()

    def close(self) -> None:
        """Stop the loop (waiting for it a little), every connection, the handlers and the socket."""
        self.shutdown()
        self._done.wait(5.0)
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns):
            self._drop(conn, None)
        self._handlers.stop()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
        self._selector.close()
        for end in (self._wake_r, self._wake_w):
            end.close()

    # -- the selector thread -------------------------------------------------------------------------
    def _accept(self) -> None:
        assert self.sock is not None
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                sock, address = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of descriptors, or a TLS socket refusing: pause a moment
                log.warning("daemon %s could not accept: %s", self.locationStr, error)
                self._selector.unregister(self.sock)
                self._accept_paused_until = time.monotonic() + 0.5
                return
            peer = str(address[0]) if isinstance(address, tuple) else "local"
            if self._stopping.is_set() or not self._make_room(peer):
                self.dropped["full"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            conn = Connection(sock, peer, self.limits.io_timeout)
            self._conns.add(conn)
            self._per_peer[peer] += 1
            self._selector.register(sock, selectors.EVENT_READ, conn)
            if conn.state == TLS:
                self._tls_step(conn)

    def _make_room(self, peer: str) -> bool:
        """Room for one more connection from `peer`, made by closing the quietest idle one if need be."""
        room, quietest = make_room(peer, self._conns, self._per_peer[peer], self.limits)
        if quietest is not None:
            self._drop(quietest, "room")
        return room

    def _tls_step(self, conn: Connection) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ, conn)
            return
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_WRITE, conn)
            return
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            log.info("TLS handshake with %s failed: %s", conn.peer, error)
            self._drop(conn, "tls")
            return
        conn.state = HELLO
        self._selector.modify(sock, selectors.EVENT_READ, conn)
        self._on_readable(conn)  # the Pyro5 handshake may already be in the TLS buffer

    def _on_readable(self, conn: Connection) -> None:
        if conn.state == TLS:
            self._tls_step(conn)
            return
        try:
            whole = conn.fill(self._check)
        except Refused as refusal:
            self._refuse(conn, str(refusal), reply=refusal.reply)
            return
        except (OSError, ValueError, Pyro5.errors.CommunicationError) as error:
            log.debug("connection from %s closed: %s", conn.peer, error)
            self._drop(conn, None)
            return
        if whole:
            self._selector.unregister(conn.sock)
            conn.busy = True
            self._handlers.submit(conn)

    def _check(self, conn: Connection, header: Header) -> None:
        check_header(conn, header, self.limits)

    def _refuse(self, conn: Connection, reason: str, *, reply: bool = False,
                level: int = logging.WARNING) -> None:
        log.log(level, "refused %s: %s", conn.peer, reason)
        if reply:
            conn.send_nowait(connect_fail(conn.header, reason))
        self._drop(conn, "refused")

    def _drop(self, conn: Connection, reason: str | None) -> None:
        """Close a connection and forget it (the selector thread's, or any thread's once the loop ended)."""
        if conn not in self._conns:
            conn.close()
            return
        self._conns.discard(conn)
        self._per_peer[conn.peer] -= 1
        if self._per_peer[conn.peer] <= 0:
            del self._per_peer[conn.peer]
        if reason is not None:
            self.dropped[reason] += 1
            log.debug("closing connection from %s (%s)", conn.peer, reason)
        if not conn.busy:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
        if conn.state == READY:
            with contextlib.suppress(Exception):
                self.daemon._clientDisconnect(conn)
        conn.close()

    def _take_back(self) -> None:
        """Connections whose request was handled: watch them again (or forget them, if closed)."""
        while True:
            try:
                conn = self._returned.get_nowait()
            except queue.Empty:
                return
            conn.busy = False
            if conn.closed or conn not in self._conns:
                self._drop(conn, None)
                continue
            try:
                conn.sock.setblocking(False)
                self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError):
                self._drop(conn, None)
                continue
            conn.active = time.monotonic()
            if isinstance(conn.sock, ssl.SSLSocket) and conn.sock.pending():
                self._on_readable(conn)  # decrypted bytes the selector cannot see

    def _sweep(self, now: float) -> None:
        if self.sock is not None and self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._selector.register(self.sock, selectors.EVENT_READ, None)
        for conn in list(self._conns):
            late = overdue(conn, now, self.limits)
            if late == "handshake":
                reason = f"handshake timeout after {self.limits.handshake_timeout:g} s"
                self._refuse(conn, reason, reply=conn.state == HELLO, level=logging.INFO)
            elif late is not None:
                self._drop(conn, late)

    # -- handler threads -----------------------------------------------------------------------------
    def _handle(self, conn: Connection) -> None:
        try:
            if conn.state == HELLO:
                assert conn.header is not None
                if self.daemon._handshake(conn):
                    conn.state, conn.serializer_id = READY, conn.header.serializer_id
                else:
                    conn.close()
            else:
                self._gate(conn)
                self.daemon.handleRequest(conn)
        except Exception as error:  # what Pyro5's servers do: the connection goes, the daemon stays
            level = logging.DEBUG if isinstance(error, Pyro5.errors.ConnectionClosedError) else logging.INFO
            log.log(level, "connection from %s: %s: %s", conn.peer, type(error).__name__, error)
            conn.close()
        finally:
            conn.finish()

    def _give_back(self, conn: Connection) -> None:
        self._returned.put(conn)
        self.wakeup()

    def _gate(self, conn: Connection) -> None:
        """Before authentication only the daemon's `authenticate` is served; a one-way call only for a
        method its object declares one-way (Pyro5 would run any method so, in a new thread each)."""
        header = conn.header
        assert header is not None
        if header.msgtype != protocol.MSG_INVOKE:
            return
        oneway = bool(header.flags & protocol.FLAGS_ONEWAY)
        if conn.authenticated and not oneway:
            return
        object_id, method = conn.call()
        if not conn.authenticated and (object_id, method) != (Pyro5.core.DAEMON_NAME, "authenticate"):
            raise Pyro5.errors.SecurityError(f"{method!r} called before authentication")
        if oneway:
            try:
                declared = self.daemon.objectsById[Pyro5.core.DAEMON_NAME].get_metadata(object_id)["oneway"]
            except Exception:
                declared = set()
            if method not in declared:
                raise Pyro5.errors.SecurityError(f"one-way call of {method!r}, which is not declared one-way")
