"""Daemon-side security: the cluster secret in Pyro5's handshake, 2-way TLS contexts, and the bind rule."""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import Pyro5.errors
import Pyro5.serializers

from rmidl._files import read_small, shown
from rmidl.config import Config
from rmidl.errors import AuthenticationError, OptionError
from rmidl.remote.transport import SECRET_REFUSED, client_ssl_context, server_ssl_context, tls_enabled

__all__ = [
    "HANDSHAKE_MAX_BYTES",
    "SecretHandshake",
    "check_bind",
    "client_ssl_context",
    "is_loopback",
    "probe_bind",
    "read_secret",
    "secured_config",
    "server_ssl_context",
]

logger = logging.getLogger(__name__)

MIN_SECRET_LENGTH = 8
MAX_SECRET_BYTES = 4096
"""A secret file is a line or a key: anything larger is refused unread."""
HANDSHAKE_MAX_BYTES = 64 * 1024
"""A handshake carries the secret and an object name: anything larger is refused unread."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds a new connection has for its TLS and Pyro5 handshakes: a silent one must not hold a thread."""
DENIED_HANDSHAKE_TIMEOUT = 0.5
"""Pyro5 reads the handshake it denies (pool full) in its accept loop; a silent peer stalls it this long."""


def read_secret(path: str | Path) -> str:
    """The cluster secret stored in `path` (stripped); OptionError names a special, large, unreadable or
    short file. Only a small regular file is read: a FIFO or /dev/zero must not hang or fill memory."""
    where = f"secret file {shown(path)}"
    data = read_small(path, where, MAX_SECRET_BYTES, OptionError)
    try:
        secret = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise OptionError(f"{where} is not UTF-8 text") from None
    if len(secret) < MIN_SECRET_LENGTH:
        raise OptionError(f"secret in {shown(path)} is shorter than {MIN_SECRET_LENGTH} characters")
    return secret


def secured_config(
    config: Config,
    *,
    secret_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
) -> Config:
    """`config` with the command line's secret file and TLS files applied (they win over RMIDL_* vars)."""
    secret = read_secret(secret_file) if secret_file else None
    files = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca}
    for what, path in files.items():
        if path and not Path(path).is_file():
            raise OptionError(f"{what.replace('_', '-')} file {path!r} does not exist")
    config = config.replace(secret=secret, **files)
    if config.secret and len(config.secret) < MIN_SECRET_LENGTH:
        raise OptionError(f"cluster secret is shorter than {MIN_SECRET_LENGTH} characters")
    return config


def is_loopback(host: str) -> bool:
    """True for localhost and 127.x / ::1 addresses (names other than localhost count as exposed)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, config: Config, *, insecure: bool = False, what: str = "daemon") -> None:
    """Refuse to expose a daemon past loopback without secret or TLS unless `insecure` (then warn loudly)."""
    if is_loopback(host) or config.secret or tls_enabled(config):
        return
    if not insecure:
        raise OptionError(
            f"refusing to bind {what} to {host}: anyone who can reach it could drive it; set a cluster "
            "secret (--secret-file or RMIDL_SECRET) or 2-way TLS (--tls-cert/--tls-key/--tls-ca), "
            "or pass --insecure to run it open"
        )
    logger.warning(
        "!!! INSECURE: %s bound to %s without cluster secret or TLS: ANYONE on the network can use it !!!",
        what,
        host,
    )


def probe_bind(what: str, host: str, port: int, kind: socket.SocketKind = socket.SOCK_STREAM) -> None:
    """OptionError naming host:port if a daemon could not bind it (in use, not a local address, privileged).

    Probed with a socket of our own, bound as Pyro5 binds (SO_REUSEADDR) and closed again: Pyro5 leaves the
    socket of a failed bind open, and its OSError would reach the user as a traceback.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                raise
            raise OptionError(f"cannot bind {what} to {host}:{port}: {error.strerror}") from None


_SERIALIZER_AT = 7
"""Offset of the serializer id in Pyro5's message header ("!4sHBB...": tag, version, type, serializer)."""
_MARSHAL_ID = Pyro5.serializers.serializers["marshal"].serializer_id


class SecretHandshake:
    """Daemon mixin: refuse a connection in Pyro5's handshake unless it carries the cluster secret.

    Pyro5 calls `validateHandshake` before the client may invoke anything, and answers a raised error
    with a CONNECTFAIL, so unauthenticated clients never reach an object. Pyro5 would first read a
    handshake of up to MAX_MESSAGE_SIZE (hundreds of MB on a worker) from anyone, and wait for it (and,
    with TLS, for the TLS handshake in its accept loop) without a deadline; the mixin caps it at
    HANDSHAKE_MAX_BYTES before a byte of the payload is read and gives both HANDSHAKE_TIMEOUT seconds.
    """

    def __init__(self, *args: Any, secret: str = "", **kwargs: Any) -> None:
        self._secret = secret.encode("utf-8")
        super().__init__(*args, **kwargs)
        listening = getattr(getattr(self, "transportServer", None), "sock", None)
        if isinstance(listening, ssl.SSLSocket):
            # Otherwise accept() runs the TLS handshake in the accept loop without a deadline: one silent
            # TCP connection would lock every client out. `_handshake` runs it in the connection's thread.
            listening.do_handshake_on_connect = False  # type: ignore[attr-defined]

    def _handshake(self, conn: Any, denied_reason: str | None = None) -> bool:
        # Daemons run without a socket timeout (calls may take long), so the handshake gets its own.
        previous = conn.sock.gettimeout()
        conn.sock.settimeout(DENIED_HANDSHAKE_TIMEOUT if denied_reason else HANDSHAKE_TIMEOUT)
        try:
            if isinstance(conn.sock, ssl.SSLSocket):
                conn.sock.do_handshake()
            accepted = super()._handshake(  # type: ignore[misc]
                _CappedConnection(conn, HANDSHAKE_MAX_BYTES), denied_reason
            )
        except (OSError, ValueError) as error:  # ssl.SSLError and socket timeouts are OSErrors
            logger.info("handshake with %s failed: %s", _peer(conn), error)
            return False
        conn.sock.settimeout(previous)
        return bool(accepted)

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 (Pyro5's name)
        if self._secret:
            offered = data.encode("utf-8") if isinstance(data, str) else b""
            if not hmac.compare_digest(offered, self._secret):
                peer = _peer(conn)
                logger.warning("refused connection from %s: %s", peer, SECRET_REFUSED)
                raise AuthenticationError(f"connection from {peer} refused: {SECRET_REFUSED}")
        return super().validateHandshake(conn, data)  # type: ignore[misc]


class _CappedConnection:
    """A Pyro5 SocketConnection whose reads are refused above a size (Pyro5 reads a payload in one call),
    and whose handshake may not be in marshal: Python documents marshal as unsafe on untrusted data, and
    Pyro5 would decode a stranger's handshake in whatever serializer its header names."""

    def __init__(self, conn: Any, limit: int) -> None:
        self._conn = conn
        self._limit = limit
        self._header = b""

    def recv(self, size: int) -> Any:
        if size > self._limit:
            raise Pyro5.errors.ProtocolError(f"handshake of {size} bytes exceeds the limit of {self._limit}")
        data = self._conn.recv(size)
        if len(self._header) <= _SERIALIZER_AT:
            self._header += data
            if len(self._header) > _SERIALIZER_AT and self._header[_SERIALIZER_AT] == _MARSHAL_ID:
                raise Pyro5.errors.ProtocolError("handshake in marshal refused (unsafe on untrusted data)")
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _peer(conn: Any) -> str:
    try:
        host, port = conn.sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError, ValueError):
        return "unknown peer"

