"""Which cluster and which of its workers a Coordinator uses: its `ns` argument (an address, "local", a
LocalCluster, None or AUTO) and its `workers` selection (None, a count or names), checked and resolved."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from rmidl.config import Config
from rmidl.errors import OptionError, WorkerNotFound

__all__ = ["AUTO", "Auto", "check_selection", "choose", "where"]

log = logging.getLogger("rmidl.client.coordinator")  # its lines read as the Coordinator's


class Auto:
    """The default `ns`: the running local cluster of this user if there is one, else this process."""

    def __repr__(self) -> str:
        return "AUTO"


AUTO = Auto()


def where(ns: object, config: Config | None) -> tuple[str | None, Config]:
    """The name server (None: none) and settings `ns` means (see the class docstring)."""
    from rmidl.remote import clusterfile

    from .localcluster import LocalCluster

    if isinstance(ns, LocalCluster):
        base = config or ns.config
        if not base.secret and ns.config.secret:
            base = base.replace(secret=ns.config.secret)
        return ns.address, base
    auto = isinstance(ns, Auto)
    if auto or ns is None:
        address = None
    elif isinstance(ns, str):
        address = ns
    else:
        raise OptionError(f"ns={ns!r} must be 'HOST:PORT', 'local', a LocalCluster or None")
    resolved = clusterfile.resolve(address, config or Config(), auto=auto,
                                   explicit_secret=bool(config and config.secret),
                                   fallback="this process's pool runs the jobs")
    if auto and resolved.ns is not None:
        log.info("Coordinator: %s", resolved.note)
    return resolved.ns, resolved.config


def check_selection(workers: object) -> list[str] | int | None:
    """The `workers` argument as None, a count or a list of names; OptionError for anything else."""
    if workers is None:
        return None
    if isinstance(workers, int) and not isinstance(workers, bool):
        if workers < 0:
            raise OptionError(f"workers={workers!r} must be a non-negative count or a list of names")
        return workers
    # A bare string is a Sequence too: refuse it, or "w1" would mean the workers "w" and "1".
    if isinstance(workers, (str, bytes)) or not isinstance(workers, Sequence):
        raise OptionError(f"workers={workers!r} must be a list of worker names, a count or None")
    names = list(workers)
    if not names:
        raise OptionError("workers=[] names no worker (None means all of them)")
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise OptionError(f"workers={workers!r}: {bad[0]!r} is not a worker name")
    return names


def choose(selection: list[str] | int, registered: list[str], ns: str) -> list[str]:
    """The names `selection` picks out of the sorted `registered` ones; WorkerNotFound if it cannot."""
    known = ", ".join(registered) or "none"
    if isinstance(selection, int):
        if selection > len(registered):
            raise WorkerNotFound(f"workers={selection} but {len(registered)} registered at {ns}: {known}")
        return registered[:selection]
    missing = [name for name in selection if name not in registered]
    if missing:
        which = ", ".join(map(repr, missing))
        raise WorkerNotFound(f"no worker{'s' if len(missing) > 1 else ''} {which} registered at {ns} "
                             f"(registered: {known})")
    return selection
