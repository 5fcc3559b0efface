"""The bulk side channel's wire format and its caller's side: `fetch` a result by its ticket into an array.

Request: MAGIC + ticket (TICKET_CHARS ascii). Reply: MAGIC + status byte (OK, UNKNOWN) + 8-byte
big-endian length + the bytes, received with `recv_into` straight into the caller's output (any layout a
numpy view can have). The worker's side is `rmidl.remote.bulk.BulkServer`.
"""

from __future__ import annotations

import socket
import ssl
import struct

import numpy as np

from rmidl.errors import ShapeError, WorkerLost

__all__ = ["MAGIC", "OK", "REPLY", "REQUEST_BYTES", "TICKET_CHARS", "UNKNOWN", "fetch"]

MAGIC = b"RMB1"
TICKET_CHARS = 43  # secrets.token_urlsafe(32): 256 random bits
REQUEST_BYTES = len(MAGIC) + TICKET_CHARS
REPLY = struct.Struct("!4sBQ")
OK, UNKNOWN = 0, 1
RECV_CHUNK = 8 << 20
"""Bytes asked of one recv_into: large enough that the system call's cost vanishes, small enough for the
socket buffer to keep up."""
BOUNCE_BYTES = 4 << 20
"""A strided or Fortran-ordered `out` receives through a contiguous buffer of at most this size."""


def fetch(
    host: str,
    port: int,
    ticket: str,
    out: np.ndarray,
    *,
    timeout: float = 30.0,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """Receive the result under `ticket` into `out` (e.g. `result[k0:k1, r0:r1, :]`); return its bytes.

    `out` may have any layout a numpy view can have (strided, Fortran-ordered): its contiguous runs
    receive straight with `recv_into`, the rest through a small contiguous buffer, in C order.
    """
    if not out.flags.writeable:
        raise ShapeError("bulk fetch needs a writable output array")
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
        magic, status, nbytes = REPLY.unpack(_recv_exact(sock, REPLY.size))
        if magic != MAGIC:
            raise WorkerLost(f"bulk channel {where} answered with a bad header")
        if status != OK:
            raise WorkerLost(f"bulk channel {where}: ticket unknown or expired (run the task again)")
        if nbytes != out.nbytes:
            raise ShapeError(f"bulk result from {where} has {nbytes} bytes; out {out.shape} has {out.nbytes}")
        _receive_into(sock, out)
        return int(nbytes)
    except (OSError, ConnectionError) as error:
        raise WorkerLost(f"bulk transfer from {where} failed: {error}") from None
    finally:
        if sock is not None:
            sock.close()


def _receive_into(sock: socket.socket, out: np.ndarray) -> None:
    """Fill `out` in C order from the stream: contiguous pieces directly, others via a bounce buffer."""
    bounce: np.ndarray | None = None
    for piece in _pieces(out):
        if piece.flags.c_contiguous:
            _recv_into_exact(sock, piece.data.cast("B"))
            continue
        if bounce is None:
            bounce = np.empty(BOUNCE_BYTES, np.uint8)
        staged = bounce[: piece.nbytes].view(piece.dtype).reshape(piece.shape)
        _recv_into_exact(sock, staged.data.cast("B"))
        piece[...] = staged


def _pieces(view: np.ndarray) -> list[np.ndarray]:
    """`view` cut along its leading axes into pieces that are contiguous or fit the bounce buffer."""
    if view.size == 0:
        return []
    if view.flags.c_contiguous or view.nbytes <= BOUNCE_BYTES:
        return [view]
    if view.ndim == 1:
        step = max(1, BOUNCE_BYTES // view.itemsize)
        return [view[i : i + step] for i in range(0, view.shape[0], step)]
    per = max(1, BOUNCE_BYTES // max(1, view[0].nbytes))
    if view[0].flags.c_contiguous or per == 1:
        return [p for i in range(view.shape[0]) for p in _pieces(view[i])]
    return [view[i : i + per] for i in range(0, view.shape[0], per)]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    _recv_into_exact(sock, memoryview(buffer))
    return bytes(buffer)


def _recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    received, total = 0, view.nbytes
    while received < total:
        n = sock.recv_into(view[received:], min(total - received, RECV_CHUNK))
        if n == 0:
            raise ConnectionError(f"connection closed after {received} of {total} bytes")
        received += n

