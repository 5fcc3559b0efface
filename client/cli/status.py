"""`rmidl status`: a table (or JSON) of the workers registered with a name server and what each is doing."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rmidl.client.census import COLUMNS, census
from rmidl.client.cli.common import (
    EXIT_CLUSTER,
    EXIT_FAILED,
    EXIT_OK,
    add_cluster_arguments,
    add_security_arguments,
    choose_cluster,
    config_from_args,
    note,
    table,
)
from rmidl.config import Config
from rmidl.errors import ClusterError, OptionError

HELP = "list the workers of a cluster: name, host, state, cores, tasks done, busy"

_HEADER = {"tasks_done": "tasks done"}
_NUMERIC = {"cores", "threads", "gflops", "tasks_done", "busy", "banks", "blobs"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("--name", metavar="NAME", help="show this worker only (error if not registered)")
    parser.add_argument("--json", action="store_true",
                        help=f"print a JSON list of one object per worker (keys: {', '.join(COLUMNS)})")
    parser.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="SECONDS",
                        help="redraw every SECONDS (2 if not given) until Ctrl-C")
    parser.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N tables")
    add_security_arguments(parser)
    parser.epilog = (f"Exit codes: {EXIT_OK} every registered worker answered; {EXIT_FAILED} one or more are "
                     f"unreachable (their rows say why); {EXIT_CLUSTER} the name server could not be asked.")


def render(rows: list[dict[str, Any]]) -> str:
    """The rows as a terminal table, numbers right-aligned, the error column last."""

    def cell(column: str, value: Any) -> Any:
        if column == "gflops" and value is not None:
            return f"{value:.1f}"
        return "" if value is None else str(value)

    header = [_HEADER.get(column, column) for column in COLUMNS]
    align = ["right" if column in _NUMERIC else "left" for column in COLUMNS]
    cells = [[cell(column, row.get(column)) for column in COLUMNS] for row in rows]
    unreachable = sum(row["state"] == "unreachable" for row in rows)
    summary = f"{len(rows)} worker(s)" + (f", {unreachable} unreachable" if unreachable else "")
    return table(header, cells, align=align) + "\n" + summary


def _report(args: argparse.Namespace, ns: str, config: Config) -> int:
    """Print one table (or JSON list); EXIT_FAILED if a registered worker is unreachable."""
    rows = census(ns, config, args.name)
    print(json.dumps(rows, indent=1) if args.json else render(rows), flush=True)
    return EXIT_FAILED if any(row["state"] == "unreachable" for row in rows) else EXIT_OK


def _watch(args: argparse.Namespace, ns: str, config: Config) -> int:
    """Redraw every --watch seconds (clearing a terminal first) until Ctrl-C or --count tables."""
    clear = "\033[H\033[2J" if sys.stdout.isatty() and not args.json else ""
    code, shown = EXIT_OK, 0
    try:
        while args.count is None or shown < args.count:
            if shown:
                time.sleep(args.watch)  # the refresh period itself, not a synchronisation
            print(f"{clear}{ns} at {time.strftime('%H:%M:%S')} (every {args.watch:g} s; Ctrl-C stops)",
                  flush=True)
            try:
                code = _report(args, ns, config)
            except ClusterError as error:  # the name server may come back: say so and keep watching
                print(f"rmidl: error: {error}", flush=True)
                code = EXIT_CLUSTER
            shown += 1
            if not clear:
                print(flush=True)
    except KeyboardInterrupt:
        pass
    return code


def run(args: argparse.Namespace) -> int:
    if args.watch is not None and args.watch <= 0:
        raise OptionError(f"--watch {args.watch:g} must be a positive number of seconds")
    if args.count is not None and (args.watch is None or args.count < 1):
        raise OptionError(f"--count {args.count} needs --watch and must be at least 1")
    target = choose_cluster(args, config_from_args(args))
    assert target.ns is not None  # status has no fallback: choose_cluster raised if none runs
    if target.note:
        note(args, target.note)
    if args.watch is not None:
        return _watch(args, target.ns, target.config)
    return _report(args, target.ns, target.config)
