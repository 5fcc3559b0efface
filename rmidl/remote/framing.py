"""One client connection of a daemon as rmidl's connection server keeps it: Pyro5 messages read
without blocking into its buffer (header first), read back by Pyro5's daemon from there, answered with
a deadline on progress (see rmidl/remote/connections.py for the server around it)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import Pyro5.errors
import Pyro5.serializers
import Pyro5.socketutil
from Pyro5 import protocol

__all__ = [
    "HANDSHAKE_MAX_BYTES",
    "HELLO",
    "READY",
    "SERIALIZER_IDS",
    "TLS",
    "Connection",
    "Header",
    "Refused",
    "connect_fail",
    "flag_names",
    "serializer_names",
]

HANDSHAKE_MAX_BYTES = 64 * 1024
"""A handshake carries a challenge and an object name: anything larger is refused unread."""
SERIALIZER_IDS = {name: s.serializer_id for name, s in Pyro5.serializers.serializers.items()}
_HEADER = struct.Struct("!4sHBBHHII16sHH")  # Pyro5's wire header (its protocol module's docstring)
_MAGIC = 0x4DC5
_CHUNK = 1 << 20
_FLAG_NAMES = {protocol.FLAGS_COMPRESSED: "compressed", protocol.FLAGS_BATCH: "batch",
               protocol.FLAGS_KEEPSERIALIZED: "keep-serialized", protocol.FLAGS_ONEWAY: "one-way",
               protocol.FLAGS_EXCEPTION: "exception", protocol.FLAGS_ITEMSTREAMRESULT: "item-stream"}


@dataclass(frozen=True)
class Header:
    """The fields of a Pyro5 message header that decide whether the message is read at all."""

    msgtype: int
    serializer_id: int
    flags: int
    seq: int
    data_size: int
    annotations_size: int

    @property
    def size(self) -> int:
        return self.data_size + self.annotations_size

    @classmethod
    def parse(cls, raw: bytes) -> Header:
        tag, version, msgtype, serializer_id, flags, seq, data_size, ann_size, *_, magic = _HEADER.unpack(raw)
        if tag != b"PYRO" or version != protocol.PROTOCOL_VERSION or magic != _MAGIC:
            raise Refused(f"not a Pyro5 message of protocol version {protocol.PROTOCOL_VERSION}")
        return cls(msgtype, serializer_id, flags, seq, data_size, ann_size)


class Refused(Exception):
    """A message refused by its header; `reply` says whether the peer is told why (handshakes only)."""

    def __init__(self, reason: str, *, reply: bool = False) -> None:
        super().__init__(reason)
        self.reply = reply


TLS, HELLO, READY = "tls", "hello", "ready"
"""The states of a connection: TLS handshake, Pyro5 handshake, requests."""


class Connection(Pyro5.socketutil.SocketConnection):
    """One client connection: the selector thread fills its buffer, a handler thread lets Pyro5's daemon
    read the whole message from it (`recv`) and answer (`send`, dropped after `io_timeout` s without
    progress). `authenticated` is the daemon's to set; until then only its authentication is served."""

    def __init__(self, sock: socket.socket, peer: str, io_timeout: float) -> None:
        super().__init__(sock)
        self.peer = peer
        self.state = TLS if isinstance(sock, ssl.SSLSocket) else HELLO
        self.created = self.active = time.monotonic()
        self.busy = False
        self.closed = False
        self.authenticated = False
        self.expected_proof = ""
        self.serializer_id: int | None = None
        self.header: Header | None = None
        self._io_timeout = io_timeout
        self._head = bytearray()
        self._body: bytearray | None = None
        self._got = 0
        self._message: tuple[bytes, bytearray] | None = None
        self._pos = 0

    @property
    def mid_message(self) -> bool:
        return bool(self._head)

    # -- the selector thread -------------------------------------------------------------------------
    def fill(self, check: Callable[[Connection, Header], None]) -> bool:
        """Read what the socket holds into the current message (never blocking); True once it is whole.
        `check` sees the header before a byte of the body is read (and raises to refuse it)."""
        try:
            while True:
                if self._body is None:
                    chunk = self.sock.recv(_HEADER.size - len(self._head))
                    if not chunk:
                        raise Pyro5.errors.ConnectionClosedError("peer closed the connection")
                    self._head += chunk
                    self.active = time.monotonic()
                    if len(self._head) < _HEADER.size:
                        continue
                    self.header = Header.parse(bytes(self._head))
                    check(self, self.header)
                    self._body, self._got = bytearray(self.header.size), 0
                if self._got < len(self._body):
                    view = memoryview(self._body)[self._got:]
                    count = self.sock.recv_into(view, min(len(view), _CHUNK))
                    if not count:
                        raise Pyro5.errors.ConnectionClosedError("peer closed the connection mid-message")
                    self._got += count
                    self.active = time.monotonic()
                    continue
                self._message, self._pos = (bytes(self._head), self._body), 0
                self._head, self._body = bytearray(), None
                return True
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False

    def send_nowait(self, data: bytes) -> None:
        """Best effort from the selector thread (a short refusal before hanging up)."""
        with contextlib.suppress(OSError, ValueError):
            self.sock.send(data)

    # -- a handler thread: what Pyro5's daemon calls -------------------------------------------------
    def recv(self, size: int) -> Any:
        if self._message is None:
            raise Pyro5.errors.ConnectionClosedError("receiving: no message")
        head, body = self._message
        start, end = self._pos, self._pos + size
        if end > len(head) + len(body):
            raise Pyro5.errors.ConnectionClosedError("receiving: not enough data")
        self._pos = end
        if end <= len(head):
            return head[start:end]
        if start >= len(head):
            return memoryview(body)[start - len(head) : end - len(head)]  # the payload: no copy
        return head[start:] + bytes(body[: end - len(head)])

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            self.sock.settimeout(self._io_timeout)
            while view:
                view = view[self.sock.send(view[:_CHUNK]) :]
        except TimeoutError as error:  # socket.timeout: no byte went out for io_timeout seconds
            raise Pyro5.errors.TimeoutError(f"sending: no progress for {self._io_timeout:g} s") from error
        except (OSError, ValueError) as error:
            raise Pyro5.errors.ConnectionClosedError(f"sending: connection lost: {error}") from error

    def call(self) -> tuple[str, str]:
        """(object id, method) of the whole request in the buffer, decoded by its serializer."""
        assert self._message is not None and self.header is not None
        data = memoryview(self._message[1])[self.header.annotations_size :]
        serializer = Pyro5.serializers.serializers_by_id[self.header.serializer_id]
        object_id, method, _, _ = serializer.loadsCall(data)
        return str(object_id), str(method)

    def finish(self) -> None:
        """Drop the handled message (its buffer may be large)."""
        self._message, self._pos = None, 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._message = None
            super().close()


def connect_fail(header: Header | None, reason: str) -> bytes:
    """A MSG_CONNECTFAIL answering `header`'s handshake (in its serializer when that one is known)."""
    serializer_id = header.serializer_id if header else SERIALIZER_IDS["msgpack"]
    serializer = Pyro5.serializers.serializers_by_id.get(serializer_id)
    if serializer is None:
        serializer = Pyro5.serializers.serializers["msgpack"]
    message = protocol.SendingMessage(protocol.MSG_CONNECTFAIL, 0, header.seq if header else 0,
                                      serializer.serializer_id, serializer.dumps(reason))
    return bytes(message.data)


def serializer_names(ids: frozenset[int]) -> str:
    by_id = {number: name for name, number in SERIALIZER_IDS.items()}
    return ", ".join(sorted(by_id.get(i, str(i)) for i in ids))


def flag_names(flags: int) -> str:
    return "+".join(name for bit, name in sorted(_FLAG_NAMES.items()) if flags & bit) or hex(flags)
