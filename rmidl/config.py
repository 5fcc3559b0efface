"""rmidl's settings: one typed object with defaults, overridable by RMIDL_* environment variables."""

from __future__ import annotations

import os
from typing import Any

from rmidl.errors import ConfigError

__all__ = ["Config", "DEFAULTS"]

MiB = 1 << 20
GiB = 1 << 30

# name -> (type, default, what it is for)
DEFAULTS: dict[str, tuple[type, Any, str]] = {
    "host": (str, "127.0.0.1", "address daemons bind to; anything else needs a secret or TLS"),
    "ns_host": (str, "127.0.0.1", "name server host"),
    "ns_port": (int, 9090, "name server port"),
    "serializer": (str, "msgpack", "Pyro5 serializer of rmidl proxies and daemons (never serpent or pickle)"),
    "max_message_size": (int, 256 * MiB, "largest Pyro5 message a daemon or proxy accepts"),
    "memory_budget": (int, 8 * GiB, "largest output (bytes) a job or worker task may allocate"),
    "bank_cache_size": (int, 64, "blobs of every kind (kernel banks, networks, training shards, weights) a "
                        "worker keeps, least recently used out first; their bytes: memory_budget / 4"),
    "image_max_pixels": (int, 89_478_485, "largest image (W x H) load_image decodes; Pillow's bomb limit"),
    "task_deadline_floor": (float, 10.0, "seconds a task may take at the least before it is re-queued"),
    "max_task_attempts": (int, 3, "workers a task may fail on before the job fails"),
    "tasks_in_flight": (int, 2, "tasks the coordinator keeps in flight per remote worker"),
    "connect_timeout": (float, 5.0, "seconds to reach the name server or a worker"),
    "secret": (str, "", "cluster secret checked in the Pyro5 handshake (RMIDL_SECRET)"),
    "tls_cert": (str, "", "PEM certificate of this process (2-way TLS)"),
    "tls_key": (str, "", "PEM private key of this process"),
    "tls_ca": (str, "", "PEM CA bundle the peer's certificate must chain to"),
    "cluster_dir": (str, "", "where cluster files go and are looked for (default $XDG_RUNTIME_DIR/rmidl "
                    "if that is private, else ~/.cache/rmidl)"),
    # Daemons: what one connection may cost them, and how workers keep their registration.
    "max_connections": (int, 512, "connections a daemon keeps at once (the quietest make room for new ones)"),
    "handshake_timeout": (float, 10.0, "seconds a new connection has for its TLS and Pyro5 handshakes"),
    "io_timeout": (float, 20.0, "seconds a message may go without progress before its connection is dropped"),
    "idle_timeout": (float, 600.0, "seconds an idle connection is kept before the daemon closes it"),
    "worker_max_tasks": (int, 16, "tasks a worker holds at once (running and queued); more are refused busy"),
    "heartbeat_interval": (float, 3.0, "seconds between a worker's checks that it is still registered"),
    "worker_grace": (float, 30.0, "seconds a silent worker keeps its registration (no sign it is dead)"),
    "discovery_interval": (float, 1.0, "seconds between a coordinator's background looks at the registry"),
}

# Ranges a setting must lie in (inclusive); a value outside is refused when the Config is made.
LIMITS: dict[str, tuple[float, float]] = {
    "ns_port": (0, 65535),
    "max_message_size": (4096, 1 << 40),
    "memory_budget": (1, 1 << 50),
    "bank_cache_size": (1, 1 << 20),
    "image_max_pixels": (1, 1 << 40),
    "task_deadline_floor": (0.001, 1e6),
    "max_task_attempts": (1, 1000),
    "tasks_in_flight": (1, 64),
    "connect_timeout": (0.001, 1e6),
    "max_connections": (4, 1 << 20),
    "handshake_timeout": (0.001, 1e6),
    "io_timeout": (0.001, 1e6),
    "idle_timeout": (0.001, 1e9),
    "worker_max_tasks": (1, 1 << 16),
    "heartbeat_interval": (0.001, 1e6),
    "worker_grace": (0.0, 1e9),
    "discovery_interval": (0.001, 1e6),
}
SERIALIZERS = ("msgpack", "marshal")  # both carry bytes natively; serpent would base64 arrays


class Config:
    """Typed settings; `Config(name=value)` overrides, then RMIDL_<NAME> env vars, then defaults."""

    __slots__ = tuple(DEFAULTS)

    # Declared for type checkers; values are set from DEFAULTS in __init__.
    host: str
    ns_host: str
    ns_port: int
    serializer: str
    max_message_size: int
    memory_budget: int
    bank_cache_size: int
    image_max_pixels: int
    task_deadline_floor: float
    max_task_attempts: int
    tasks_in_flight: int
    connect_timeout: float
    secret: str
    tls_cert: str
    tls_key: str
    tls_ca: str
    cluster_dir: str
    max_connections: int
    handshake_timeout: float
    io_timeout: float
    idle_timeout: float
    worker_max_tasks: int
    heartbeat_interval: float
    worker_grace: float
    discovery_interval: float

    def __init__(self, *, environ: dict[str, str] | None = None, **overrides: Any) -> None:
        unknown = set(overrides) - set(DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        env = os.environ if environ is None else environ
        for name, (kind, default, _) in DEFAULTS.items():
            if name in overrides and overrides[name] is not None:
                value = overrides[name]
            elif f"RMIDL_{name.upper()}" in env:
                value = env[f"RMIDL_{name.upper()}"]
            else:
                value = default
            setattr(self, name, _coerce(name, kind, value))

    def replace(self, **overrides: Any) -> Config:
        """A copy with some settings changed (None leaves a setting as it is)."""
        current = {name: getattr(self, name) for name in DEFAULTS}
        current.update({k: v for k, v in overrides.items() if v is not None})
        return Config(environ={}, **current)

    def dump(self) -> str:
        """Every setting and its value, one per line, for inspection (the secret is masked)."""
        lines = []
        for name in DEFAULTS:
            value = getattr(self, name)
            if name == "secret" and value:
                value = "***"
            lines.append(f"{name} = {value!r}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Config({self.dump()!s})".replace("\n", ", ")


def _coerce(name: str, kind: type, value: Any) -> Any:
    try:
        coerced = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting {name}={value!r} is not a valid {kind.__name__}") from None
    if name in LIMITS:
        low, high = LIMITS[name]
        if not low <= coerced <= high:
            raise ConfigError(f"setting {name}={value!r} is out of range [{low:g}, {high:g}]")
    if name == "serializer" and coerced not in SERIALIZERS:
        raise ConfigError(f"setting serializer={value!r} must be one of {', '.join(SERIALIZERS)}")
    return coerced
