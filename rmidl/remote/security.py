"""Daemon-side security: mutual authentication by the cluster secret, bounded connections, 2-way TLS
contexts, and the bind rule."""

from __future__ import annotations

import errno
import hmac
import ipaddress
import logging
import socket
import threading
from pathlib import Path
from typing import Any

import Pyro5.core
import Pyro5.server
from Pyro5 import config as pyro_config
from Pyro5.callcontext import current_context

from rmidl._files import read_small, shown
from rmidl.config import Config
from rmidl.errors import AuthenticationError, OptionError
from rmidl.remote import auth
from rmidl.remote.connections import HANDSHAKE_MAX_BYTES, ConnectionServer, Limits
from rmidl.remote.transport import SECRET_REFUSED, client_ssl_context, server_ssl_context, tls_enabled

__all__ = [
    "HANDSHAKE_MAX_BYTES",
    "DaemonInterface",
    "Limits",
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


_SERVERTYPE_LOCK = threading.Lock()


class SecretHandshake:
    """Daemon mixin (the first base, before a Pyro5 daemon class): how every rmidl daemon meets clients.

    - Its connections go through `ConnectionServer` (bounded in number and per peer, deadlines on
      handshakes, stalled messages and idle connections, whole messages only, header checks; see
      rmidl/remote/connections.py) instead of a Pyro5 server.
    - Its own Pyro5 object ("Pyro.Daemon") serves only `get_metadata` and `authenticate`: Pyro5's
      `registered()`, `info()` and stream methods are no part of any contract here.
    - With a cluster secret, a connection is served only once client and daemon have proved to each
      other that they know it (challenge and response, `rmidl.remote.auth`: the secret never travels);
      without one, any handshake is accepted.
    """

    def __init__(self, *args: Any, secret: str = "", limits: Limits | None = None, **kwargs: Any) -> None:
        self._secret = secret
        with _SERVERTYPE_LOCK:
            # The multiplex server binds the socket and starts nothing else; it is replaced just below.
            saved, pyro_config.SERVERTYPE = pyro_config.SERVERTYPE, "multiplex"
            try:
                super().__init__(*args, **kwargs)
            finally:
                pyro_config.SERVERTYPE = saved
        transport: Any = self.transportServer  # type: ignore[has-type]
        self.transportServer = ConnectionServer.adopting(transport, self, limits or Limits())
        interface = DaemonInterface(self)
        interface._pyroId = Pyro5.core.DAEMON_NAME  # type: ignore[attr-defined]
        self.objectsById[Pyro5.core.DAEMON_NAME] = interface  # type: ignore[attr-defined]

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 (Pyro5's name)
        if not self._secret:
            conn.authenticated = True
            return super().validateHandshake(conn, data)  # type: ignore[misc]
        try:
            client_nonce = auth.check_challenge(data)
        except AuthenticationError:
            logger.warning("refused connection from %s: %s", conn.peer, SECRET_REFUSED)
            raise AuthenticationError(f"connection from {conn.peer} refused: {SECRET_REFUSED}") from None
        daemon_nonce = auth.new_nonce()
        conn.expected_proof = auth.proof(self._secret, "client", client_nonce, daemon_nonce)
        return auth.answer(self._secret, client_nonce, daemon_nonce)

    def authenticate_connection(self, conn: Any, offered: object) -> bool:
        """The second step: the client's proof for this connection's challenge (one try)."""
        expected, conn.expected_proof = conn.expected_proof, ""
        if conn.authenticated:
            return True
        if not (expected and isinstance(offered, str) and hmac.compare_digest(offered, expected)):
            logger.warning("refused connection from %s: %s", conn.peer, SECRET_REFUSED)
            raise AuthenticationError(f"connection from {conn.peer} refused: {SECRET_REFUSED}")
        conn.authenticated = True
        return True


@Pyro5.server.expose
class DaemonInterface:
    """The daemon's own object as rmidl serves it: metadata of the objects it holds (Pyro5 proxies may
    ask for it) and the second step of mutual authentication, nothing else."""

    def __init__(self, daemon: SecretHandshake) -> None:
        self._daemon = daemon
        self._pyro = Pyro5.server.DaemonObject(daemon)

    def get_metadata(self, objectId: str) -> dict:  # noqa: N803 (Pyro5's name)
        return dict(self._pyro.get_metadata(objectId))

    def authenticate(self, proof: str) -> bool:
        return self._daemon.authenticate_connection(current_context.client, proof)
