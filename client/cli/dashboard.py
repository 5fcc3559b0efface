"""`rmidl dashboard`: the web status page of a cluster on 127.0.0.1, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse

from rmidl.client.cli.common import (
    EXIT_OK,
    add_cluster_arguments,
    add_security_arguments,
    choose_cluster,
    config_from_args,
    note,
    stop_on_signals,
)
from rmidl.client.dashboard import serve_dashboard

HELP = "serve a web status page of a cluster: workers, load, running jobs, the last job's task timeline"
DESCRIPTION = HELP + """.

The page (one HTML file, no external resources) polls a JSON endpoint, /api/status, every second.
Workers come from the name server; jobs from every coordinator using it, which publishes its running
and last jobs there (so `rmidl run` in another terminal shows up live)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    add_cluster_arguments(parser)
    parser.add_argument("--port", type=int, default=0, help="port of the page (0: any free port, printed)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address of the page; it has no authentication, so past loopback anyone who "
                        "reaches it sees the cluster (a warning says so)")
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="how often the name server and the workers are asked")
    add_security_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Print the page's URL and "ready", serve until SIGINT/SIGTERM."""
    from rmidl.errors import OptionError

    if not args.interval > 0:
        raise OptionError(f"--interval {args.interval:g} must be a positive number of seconds")
    target = choose_cluster(args, config_from_args(args))
    assert target.ns is not None  # no fallback: choose_cluster raised if no cluster runs
    if target.note:
        note(args, target.note)
    with stop_on_signals() as stop, serve_dashboard(target.ns, port=args.port, host=args.host,
                                                    config=target.config, interval=args.interval) as page:
        print(f"dashboard {page.url} for {target.ns}", flush=True)
        print("ready", flush=True)
        stop.wait()
    return EXIT_OK
