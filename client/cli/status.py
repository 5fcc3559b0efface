"""`rmidl status`: a table of the workers registered with a name server and what each is doing."""

from __future__ import annotations

import argparse
from typing import Any

from rmidl.client.cli.common import EXIT_OK, add_security_arguments, config_from_args
from rmidl.config import Config
from rmidl.errors import WorkerNotFound

HELP = "list the workers of a cluster: name, host, cores, tasks done, busy"

COLUMNS = ("name", "host", "cores", "threads", "gflops", "tasks done", "busy", "banks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ns", metavar="HOST:PORT", help="name server (default 127.0.0.1:9090)")
    parser.add_argument("--name", metavar="NAME", help="show this worker only (error if not registered)")
    add_security_arguments(parser)


def collect(ns: str | None, config: Config, name: str | None = None) -> list[dict[str, Any]]:
    """One row per registered worker; a worker that does not answer shows as unreachable."""
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
        except Exception as error:
            rows.append({"name": worker, "host": uri.rsplit("@", 1)[-1], "busy": f"unreachable ({error})"})
            continue
        row: dict[str, Any] = {
            "name": worker,
            "host": info.get("host"),
            "cores": info.get("cores"),
            "threads": info.get("threads"),
            "gflops": f"{info['gflops']:.1f}" if info.get("gflops") is not None else "",
            "tasks done": info.get("tasks_done"),
            "busy": info.get("busy"),
            "banks": len(info.get("banks") or ()),
        }
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    """Rows as a plain aligned text table."""
    cells = [[str(col) for col in columns]]
    cells += [["" if row.get(col) is None else str(row.get(col, "")) for col in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells)
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    rows = collect(args.ns, config_from_args(args), args.name)
    print(table(rows))
    print(f"{len(rows)} worker(s)")
    return EXIT_OK
