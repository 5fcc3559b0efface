"""Registry naming: how workers are named, tagged, listed, registered and removed on the name server.

A worker registers as `WORKER_PREFIX + name` with the tags WORKER_TAGS plus `host:`, `cores:` and
`version:`; coordinators and `rmidl status` find workers by all of WORKER_TAGS (a stray entry with the
prefix but not the tags, or the tags but not the prefix, is not a worker). A worker keeps its entry
(`ensure_registered`, from its heartbeat); coordinators look through a `Registry`, which holds no
connection between looks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import Pyro5.errors

from rmidl.config import Config
from rmidl.errors import OptionError

__all__ = [
    "WORKER_PREFIX",
    "WORKER_TAGS",
    "Registry",
    "check_worker_name",
    "ensure_registered",
    "list_workers",
    "object_name",
    "register_worker",
    "unregister_worker",
    "worker_tags",
]

logger = logging.getLogger(__name__)

WORKER_PREFIX = "rmidl.worker."
"""Workers register as WORKER_PREFIX + name (also their Pyro5 object id)."""
WORKER_TAGS = frozenset({"rmidl", "role:worker"})
"""Every worker registers with these tags (plus host:, cores:, version:); discovery asks for all of them."""

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")


def check_worker_name(name: str) -> str:
    """A worker name: letters, digits, '_', '.', '-' (at most 100, not starting with '.' or '-')."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise OptionError(f"worker name {name!r} must be letters, digits, '_', '.' or '-' (at most 100)")
    return name


def object_name(name: str) -> str:
    """The registry (and Pyro5 object) name of worker `name`."""
    return WORKER_PREFIX + name


def worker_tags(*, host: str, cores: int, version: str) -> list[str]:
    """The sorted registry tags of a worker on `host` with `cores` cores running rmidl `version`."""
    return sorted(WORKER_TAGS | {f"host:{host}", f"cores:{cores}", f"version:{version}"})


def list_workers(ns_proxy: Any) -> dict[str, str]:
    """name -> URI of every registered rmidl worker, in name order."""
    found = ns_proxy.yplookup(meta_all=sorted(WORKER_TAGS), return_metadata=False)
    return {
        name[len(WORKER_PREFIX) :]: str(uri)
        for name, uri in sorted(found.items())
        if name.startswith(WORKER_PREFIX)
    }


def register_worker(ns_proxy: Any, name: str, uri: str, tags: list[str], *,
                    alive: Callable[[str], bool]) -> None:
    """Register worker `name` at `uri`; a stale entry of the same name (`alive(its uri)` False) is replaced,
    a live one is an OptionError."""
    try:
        ns_proxy.register(object_name(name), uri, safe=True, metadata=tags)
        return
    except Pyro5.errors.NamingError:
        previous = str(ns_proxy.lookup(object_name(name)))
    if alive(previous):
        raise OptionError(f"worker name {name!r} is taken by a live worker at {previous}")
    logger.info("replacing stale registration of %s (%s)", name, previous)
    ns_proxy.register(object_name(name), uri, safe=False, metadata=tags)


def unregister_worker(ns_proxy: Any, name: str, uri: str | None = None) -> bool:
    """Remove worker `name`'s entry (only if it still names `uri`, when given: a newer worker may have
    taken the name over); True if an entry was removed."""
    if uri is not None:
        try:
            if str(ns_proxy.lookup(object_name(name))) != uri:
                return False
        except Pyro5.errors.NamingError:
            return False
    return bool(ns_proxy.remove(object_name(name)))


def ensure_registered(ns_proxy: Any, name: str, uri: str, tags: list[str], *,
                      alive: Callable[[str], bool]) -> bool:
    """Register worker `name` at `uri` unless the registry already says so (a restarted name server, or
    a coordinator that took it for dead); True if it registered. OptionError as `register_worker`."""
    try:
        if str(ns_proxy.lookup(object_name(name))) == uri:
            return False
    except Pyro5.errors.NamingError:
        pass
    register_worker(ns_proxy, name, uri, tags, alive=alive)
    return True


class Registry:
    """The name server as a coordinator uses it: a short connection per look, none held in between, so a
    restarted name server is simply found again and idle coordinators cost it nothing."""

    def __init__(self, address: str, config: Config) -> None:
        self.address = address
        self.config = config

    def workers(self) -> dict[str, str]:
        """name -> URI of every registered worker (RegistryError within connect_timeout if unreachable)."""
        from rmidl.remote.transport import connect_ns

        with connect_ns(self.address, self.config) as ns:
            return list_workers(ns)

    def remove(self, name: str, uri: str) -> bool:
        """`unregister_worker(name, uri)` on the name server."""
        from rmidl.remote.transport import connect_ns

        with connect_ns(self.address, self.config) as ns:
            return unregister_worker(ns, name, uri)
