"""What a daemon's connections may cost it (`Limits`) and the policy the connection server applies at
those bounds: which requests a header shows to be no part of the protocol, which connection makes room
at a bound, and which one is overdue. Pure functions of a connection's state; the server acts on them."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from Pyro5 import protocol

from rmidl.config import Config
from rmidl.remote.framing import (
    HANDSHAKE_MAX_BYTES,
    HELLO,
    READY,
    SERIALIZER_IDS,
    Connection,
    Header,
    Refused,
    flag_names,
    serializer_names,
)

__all__ = ["Limits", "check_header", "make_room", "overdue"]

_MARSHAL = SERIALIZER_IDS["marshal"]
_REQUEST_FLAGS = protocol.FLAGS_CORR_ID | protocol.FLAGS_ONEWAY
"""Flags a request may carry: compressed (a zlib bomb), batched and kept-serialized (unpickled by marshal)
calls are no part of any contract here."""


@dataclass(frozen=True)
class Limits:
    """What a daemon's connections may cost it (see rmidl/remote/connections.py's docstring)."""

    max_connections: int = 512
    per_peer: int = 128
    handshake_timeout: float = 10.0
    io_timeout: float = 20.0
    idle_timeout: float = 600.0
    handlers: int = 8
    """Threads handling whole requests at once (more requests wait their turn)."""
    max_message: int = 256 << 20
    serializers: frozenset[int] = frozenset({SERIALIZER_IDS["msgpack"]})
    """Serializers a handshake may use; the connection then keeps the handshake's one."""

    @classmethod
    def from_config(cls, config: Config, *, handlers: int, serializers: tuple[str, ...] = ("msgpack",)
                    ) -> Limits:
        connections = _within_fd_limit(config.max_connections)
        return cls(max_connections=connections, per_peer=max(4, connections // 4),
                   handshake_timeout=config.handshake_timeout, io_timeout=config.io_timeout,
                   idle_timeout=config.idle_timeout, handlers=handlers, max_message=config.max_message_size,
                   serializers=frozenset(SERIALIZER_IDS[name] for name in serializers))


def check_header(conn: Connection, header: Header, limits: Limits) -> None:
    """Refuse (raise Refused) a message its header shows to be no part of the protocol here, before
    reading it."""
    """Refuse a message its header shows to be no part of the protocol here, before reading it."""
    if conn.state == HELLO:
        if header.msgtype != protocol.MSG_CONNECT:
            raise Refused(f"expected a handshake, got message type {header.msgtype}")
        if header.size > HANDSHAKE_MAX_BYTES:
            raise Refused(f"handshake of {header.size} bytes exceeds the limit of {HANDSHAKE_MAX_BYTES}",
                           reply=True)
        if header.serializer_id not in limits.serializers:
            if header.serializer_id == _MARSHAL:
                raise Refused("handshake in marshal refused (unsafe on untrusted data)", reply=True)
            raise Refused(f"handshake in serializer {header.serializer_id} refused (this daemon "
                           f"speaks {serializer_names(limits.serializers)})", reply=True)
        if header.flags & ~protocol.FLAGS_CORR_ID:
            raise Refused(f"handshake with flags {flag_names(header.flags)} refused", reply=True)
        return
    if header.msgtype == protocol.MSG_PING:  # answered without decoding anything
        if header.size > HANDSHAKE_MAX_BYTES:
            raise Refused(f"ping of {header.size} bytes")
        return
    if header.msgtype != protocol.MSG_INVOKE:
        raise Refused(f"message type {header.msgtype} is not a request")
    if header.size > limits.max_message:
        limit = limits.max_message
        raise Refused(f"request of {header.size} bytes exceeds max_message_size={limit}")
    if header.serializer_id != conn.serializer_id:
        raise Refused(f"request in serializer {header.serializer_id} on a connection that shook hands "
                       f"in {conn.serializer_id} (one serializer per connection)")
    if header.flags & ~_REQUEST_FLAGS:
        raise Refused(f"request with flags {flag_names(header.flags & ~_REQUEST_FLAGS)} refused")


def make_room(peer: str, conns: Collection[Connection], from_peer: int, limits: Limits,
              ) -> tuple[bool, Connection | None]:
    """Whether one more connection from `peer` (which has `from_peer` already) may come, and the one to
    close for it: the quietest idle one (strangers before members), among the peer's own at its bound."""
    if from_peer >= limits.per_peer:
        candidates = [c for c in conns if c.peer == peer and not c.busy]
    elif len(conns) >= limits.max_connections:
        candidates = [c for c in conns if not c.busy]
    else:
        return True, None
    if not candidates:
        return False, None
    return True, min(candidates, key=lambda c: (c.authenticated, c.active))


def overdue(conn: Connection, now: float, limits: Limits) -> str | None:
    """Why `conn` must go at `now`: "handshake" (not through its handshakes and authentication in time),
    "io timeout" (no progress mid-message), "idle"; None while it may stay (always while it is busy)."""
    if conn.busy:
        return None
    if conn.state != READY or not conn.authenticated:
        return "handshake" if now - conn.created > limits.handshake_timeout else None
    if conn.mid_message:
        return "io timeout" if now - conn.active > limits.io_timeout else None
    return "idle" if now - conn.active > limits.idle_timeout else None


def _within_fd_limit(wanted: int) -> int:
    """`wanted`, or half this process's descriptor limit if that is less (the rest is the daemon's own)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return wanted
    return wanted if soft == resource.RLIM_INFINITY else max(4, min(wanted, soft // 2))
