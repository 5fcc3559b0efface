"""Pyro5 set-up both sides share: addresses, serializer/size/TLS config, proxies to registry and workers."""

from __future__ import annotations

import logging
import re
import ssl
import threading
from typing import Any

import Pyro5.api
import Pyro5.core
import Pyro5.errors
import Pyro5.socketutil
from Pyro5 import config as pyro_config

from rmidl.config import Config
from rmidl.errors import AuthenticationError, OptionError, RegistryError, register_with_pyro
from rmidl.remote import auth

__all__ = [
    "SECRET_REFUSED",
    "SERIALIZER",
    "ClusterProxy",
    "client_ssl_context",
    "configure_pyro",
    "connect_ns",
    "is_refusal",
    "parse_address",
    "server_ssl_context",
    "tls_enabled",
    "worker_proxy",
]

logger = logging.getLogger(__name__)

SERIALIZER = "msgpack"
"""Carries bytes natively and never runs code on load (serpent is ~10x slower for bytes; pickle is unsafe)."""
SECRET_REFUSED = "cluster secret missing or wrong"
"""How a daemon words a handshake it refuses for the secret; `is_refusal` looks for it."""

_HOST = re.compile(r"^(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?|\d{1,3}(?:\.\d{1,3}){3})$")
_configure_lock = threading.Lock()
_applied: tuple[Any, ...] | None = None


def parse_address(
    address: str | None, default_port: int = 9090, *, default_host: str = "127.0.0.1"
) -> tuple[str, int]:
    """`"HOST:PORT"`, `"HOST"`, `"[v6]:PORT"` or None -> (host, port); OptionError names a bad address."""
    if address is None or not str(address).strip():
        return default_host, default_port
    text = str(address).strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (end + 1 < len(text) and text[end + 1] != ":"):
            raise OptionError(f"address {address!r} is malformed (expected [IPv6]:PORT)")
        host, port_text = text[1:end], text[end + 2 :]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise OptionError(f"address {address!r} is malformed (write IPv6 hosts as [addr]:port)")
    if not host or (not text.startswith("[") and not _HOST.match(host)):
        raise OptionError(f"address {address!r} has a malformed host {host!r}")
    if not port_text and (text.endswith(":") or text.endswith("]:")):
        raise OptionError(f"address {address!r} has an empty port")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise OptionError(f"address {address!r} has a bad port {port_text!r} (expected 0-65535)")
    return host, int(port_text)


def tls_enabled(config: Config) -> bool:
    """True when this process has a certificate, key and CA for 2-way TLS."""
    return bool(config.tls_cert and config.tls_key and config.tls_ca)


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """2-way TLS context for a listening socket (peers must show a certificate signed by tls_ca), or None."""
    if not tls_enabled(config):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=config.tls_ca)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(config: Config) -> ssl.SSLContext | None:
    """2-way TLS context for connecting (checks the server's certificate and host name), or None."""
    if not tls_enabled(config):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls_ca)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def configure_pyro(config: Config) -> None:
    """Apply rmidl's settings to Pyro5's process-wide config (idempotent; a change of TLS files takes effect).

    Pyro5 keeps serializer, message-size cap and SSL settings per process, so one process holds one TLS
    identity: its certificate serves as the server certificate of its daemons and the client
    certificate of its proxies (2-way TLS: every peer must present one signed by `tls_ca`).
    """
    global _applied  # noqa: PLW0603 (mirrors Pyro5's own per-process config)
    if config.serializer != SERIALIZER:
        raise OptionError(f"serializer {config.serializer!r} is not allowed (rmidl uses {SERIALIZER} only)")
    if config.max_message_size < 4096:
        raise OptionError(f"max_message_size={config.max_message_size} is too small (at least 4096 bytes)")
    tls = tls_enabled(config)
    if not tls and (config.tls_cert or config.tls_key or config.tls_ca):
        raise OptionError("TLS needs all three of a certificate, a key and a CA file")
    state = (config.max_message_size, tls, config.tls_cert, config.tls_key, config.tls_ca)
    with _configure_lock:
        register_with_pyro()
        pyro_config.SERIALIZER = SERIALIZER
        pyro_config.MAX_MESSAGE_SIZE = config.max_message_size
        # Per-call deadlines are the caller's (proxy timeouts); a global COMMTIMEOUT would also drop idle
        # connections on the daemon side.
        pyro_config.COMMTIMEOUT = 0.0
        pyro_config.SOCK_NODELAY = True
        pyro_config.SSL = tls
        pyro_config.SSL_REQUIRECLIENTCERT = tls
        pyro_config.SSL_SERVERCERT = pyro_config.SSL_CLIENTCERT = config.tls_cert if tls else ""
        pyro_config.SSL_SERVERKEY = pyro_config.SSL_CLIENTKEY = config.tls_key if tls else ""
        pyro_config.SSL_CACERTS = config.tls_ca if tls else ""
        if _applied is not None and _applied[1:] != state[1:]:
            # Pyro5 caches its SSL contexts per process; drop them so the new files are read.
            setattr(Pyro5.socketutil, "__ssl_server_context", None)
            setattr(Pyro5.socketutil, "__ssl_client_context", None)
        _applied = state


class ClusterProxy(Pyro5.api.Proxy):
    """A Pyro5 proxy that, given the cluster secret, authenticates the daemon and itself by challenge and
    response on every connection it makes (`rmidl.remote.auth`: the secret itself never travels).

    `require_proof`: a daemon that cannot prove it knows the secret is refused (AuthenticationError);
    off for the name server, whose entries nobody trusts anyway (every worker is authenticated itself).
    """

    _rmidl_secret = ""
    _rmidl_nonce = ""
    _rmidl_require = True

    def __init__(self, uri: Any, *, secret: str = "", require_proof: bool = True) -> None:
        super().__init__(uri)
        object.__setattr__(self, "_rmidl_secret", secret)
        object.__setattr__(self, "_rmidl_require", require_proof)

    @property  # type: ignore[override]
    def _pyroHandshake(self) -> Any:  # noqa: N802 (Pyro5's name; read once per connection it makes)
        if not self._rmidl_secret:
            return "hello"
        object.__setattr__(self, "_rmidl_nonce", auth.new_nonce())
        return auth.challenge(self._rmidl_nonce)

    @_pyroHandshake.setter
    def _pyroHandshake(self, value: Any) -> None:  # noqa: N802
        pass  # Pyro5's constructor sets "hello"; the handshake is ours to make

    def _pyroValidateHandshake(self, response: Any) -> None:  # noqa: N802 (Pyro5's hook)
        if not self._rmidl_secret:
            return
        where = f"daemon at {self._pyroUri.location}"
        try:
            if not self._rmidl_require and not isinstance(response, dict):
                return  # a name server without a secret: nothing to prove either way
            daemon_nonce = auth.check_answer(self._rmidl_secret, self._rmidl_nonce, response, where)
            offered = auth.proof(self._rmidl_secret, "client", self._rmidl_nonce, daemon_nonce)
            self._pyroInvoke(auth.AUTHENTICATE, (offered,), {}, objectId=Pyro5.core.DAEMON_NAME)
        except BaseException:
            self._pyroRelease()
            raise


def _prepare_proxy(proxy: Pyro5.api.Proxy, timeout: float | None) -> Pyro5.api.Proxy:
    proxy._pyroSerializer = SERIALIZER
    proxy._pyroTimeout = timeout
    return proxy


def connect_ns(address: str | tuple[str, int] | None, config: Config | None = None) -> Pyro5.api.Proxy:
    """A connected proxy to the name server; RegistryError within `config.connect_timeout` if it is down."""
    config = config or Config()
    configure_pyro(config)
    if isinstance(address, tuple):
        host, port = address
    else:
        host, port = parse_address(address, config.ns_port, default_host=config.ns_host)
    uri = f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{host}:{port}"
    # Entries of the registry are not trusted (every worker is authenticated itself): a name server
    # without a secret is used as it is; one with a secret must prove it.
    proxy = _prepare_proxy(ClusterProxy(uri, secret=config.secret, require_proof=False),
                           config.connect_timeout)
    try:
        proxy._pyroBind()
    except Pyro5.errors.CommunicationError as error:
        proxy._pyroRelease()
        if is_refusal(error):
            raise AuthenticationError(f"name server {host}:{port} refused the connection: {error}") from None
        raise RegistryError(f"name server {host}:{port} is not reachable: {error}") from None
    except AuthenticationError as error:
        raise AuthenticationError(f"name server {host}:{port} refused the connection: {error}") from None
    return proxy


def is_refusal(error: BaseException) -> bool:
    """True when a Pyro5 error means the daemon refused us in the handshake for the secret (we offered
    none, or no challenge of our scheme), not that it is down or refused us for another reason."""
    text = str(error)
    refused = " rejected: " in text and SECRET_REFUSED in text
    return isinstance(error, Pyro5.errors.CommunicationError) and refused


def worker_proxy(uri: str, config: Config | None = None, *, timeout: float | None = None) -> Pyro5.api.Proxy:
    """An unconnected proxy to a worker with msgpack, the cluster secret and TLS applied: with a secret,
    a worker that cannot prove it knows it is refused before it sees any call.

    `timeout` bounds connecting and every call (None: wait as long as a task takes).
    """
    config = config or Config()
    configure_pyro(config)
    return _prepare_proxy(ClusterProxy(uri, secret=config.secret), timeout)

