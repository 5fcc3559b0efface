"""What every registered worker says about itself: one row per worker, for `rmidl status` and the
dashboard (a worker that does not answer is a row too, "unreachable", with the reason)."""

from __future__ import annotations

from typing import Any

from rmidl.config import Config
from rmidl.errors import WorkerNotFound

__all__ = ["COLUMNS", "census"]

COLUMNS = ("name", "host", "state", "cores", "threads", "gflops", "tasks_done", "busy", "banks", "blobs",
           "error")
"""The keys of every row, in `rmidl status`'s order and in its `--json` (missing values are None): `banks`
counts the kernel banks a worker holds, `blobs` everything it holds (banks, networks, training shards,
weights)."""


def _row(name: str, uri: str, info: dict[str, Any] | None, error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(name=name, host=uri.rsplit("@", 1)[-1].rsplit(":", 1)[0])
    if info is None:
        row.update(state="unreachable", error=error)
        return row
    busy = info.get("busy")
    row.update(
        host=info.get("host") or row["host"],
        state="busy" if busy else "idle",
        cores=info.get("cores"),
        threads=info.get("threads"),
        gflops=info.get("gflops"),
        tasks_done=info.get("tasks_done"),
        busy=busy,
        banks=len(info.get("banks") or ()),
        blobs=len(info.get("blobs") or ()),
    )
    return row


def census(ns: str | None, config: Config, name: str | None = None) -> list[dict[str, Any]]:
    """One row (a dict with the COLUMNS keys) per worker registered at `ns` (or only `name`: a
    WorkerNotFound if it is not registered); one that does not answer is "unreachable", with the reason
    under "error"."""
    from rmidl.remote.naming import list_workers
    from rmidl.remote.transport import configure_pyro, connect_ns, worker_proxy

    configure_pyro(config)
    with connect_ns(ns, config) as registry:
        found = list_workers(registry)
    if name is not None:
        if name not in found:
            known = ", ".join(sorted(found)) or "none"
            raise WorkerNotFound(f"no worker named {name!r} is registered (registered: {known})")
        found = {name: found[name]}
    rows = []
    for worker, uri in found.items():
        try:
            with worker_proxy(uri, config, timeout=config.connect_timeout) as proxy:
                info = proxy.info()
        except Exception as error:  # whatever it is, the row says it and the others still show
            rows.append(_row(worker, uri, None, " ".join(str(error).split()) or type(error).__name__))
            continue
        rows.append(_row(worker, uri, info, None))
    return rows
