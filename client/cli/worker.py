"""`rmidl worker`: one ConvolutionWorker daemon registered with a name server, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rmidl.client.cli.common import (
    LOCAL,
    add_metrics_arguments,
    add_security_arguments,
    choose_cluster,
    config_from_args,
    main_of,
    serve_until_stopped,
)
from rmidl.errors import OptionError
from rmidl.remote.transport import parse_address
from rmidl.server.daemon import start_worker, worker_loop

__all__ = ["HELP", "add_arguments", "main", "run"]

HELP = "start a ConvolutionWorker daemon and register it with the name server"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ns", metavar="HOST:PORT|local",
                        help="name server to register with (default RMIDL_NS_HOST:RMIDL_NS_PORT, "
                        "127.0.0.1:9090 if unset; local: the one of this user's cluster file, with its "
                        "secret)")
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: any free port)")
    parser.add_argument("--threads", type=int, default=None, help="engine threads per task (default: cores)")
    parser.add_argument("--name", default=None, help="worker name (default HOSTNAME-PID)")
    add_metrics_arguments(parser)
    add_security_arguments(parser, insecure=True)


def run(args: argparse.Namespace) -> int:
    """Print the URI and "ready", serve until SIGINT/SIGTERM, unregister and exit 0."""
    config = config_from_args(args)
    if args.ns == LOCAL:
        target = choose_cluster(args, config)
        args.ns, config = target.ns, target.config
    ns_host, ns_port = parse_address(args.ns, config.ns_port, default_host=config.ns_host)
    if args.threads is not None and args.threads < 1:
        raise OptionError(f"--threads {args.threads} must be at least 1")
    handle = start_worker(
        ns=f"{ns_host}:{ns_port}",
        host=args.host or config.host,
        port=args.port,
        threads=args.threads,
        name=args.name,
        config=config,
        insecure=args.insecure,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    if handle.metrics is not None:
        print(f"metrics {handle.metrics.url}", flush=True)
    return serve_until_stopped(handle.uri, lambda stop: worker_loop(handle, stop))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rmidl.client.cli.worker ...`: the same as `rmidl worker ...`."""
    return main_of("worker", argv)


if __name__ == "__main__":
    sys.exit(main())
