"""`rmidl ns`: the name server (the RMI registry) in the foreground, until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rmidl.client.cli.common import (
    add_metrics_arguments,
    add_security_arguments,
    config_from_args,
    main_of,
    serve_until_stopped,
)
from rmidl.remote import clusterfile
from rmidl.server.nameserver import NS_MAX_MESSAGE_SIZE, address_of, ns_loop, start_ns

__all__ = ["HELP", "add_arguments", "main", "run"]

HELP = "start the name server (the registry workers join and coordinators look up)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None,
                        help="port to bind (default RMIDL_NS_PORT or 9090; 0: any free port)")
    parser.add_argument("--broadcast", action="store_true", help="answer Pyro5 broadcast lookups")
    parser.add_argument("--cluster-file", action="store_true",
                        help="write a cluster file (address and secret, generated if none is given) so that "
                        "`rmidl worker --ns local`, `rmidl status` and `rmidl run` find this name server; "
                        "removed on exit")
    add_metrics_arguments(parser)
    add_security_arguments(parser, insecure=True)


def run(args: argparse.Namespace) -> int:
    """Print the address and "ready", serve until SIGINT/SIGTERM, exit 0."""
    config = config_from_args(args)
    config = config.replace(max_message_size=min(config.max_message_size, NS_MAX_MESSAGE_SIZE))
    if args.cluster_file and not config.secret:
        config = config.replace(secret=clusterfile.new_secret())
    port = config.ns_port if args.port is None else args.port
    host = args.host or config.ns_host
    _, daemon = start_ns(host, port, config=config, broadcast=args.broadcast, insecure=args.insecure,
                         metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    address = address_of(daemon)
    if daemon.metrics is not None:
        print(f"metrics {daemon.metrics.url}", flush=True)
    written = clusterfile.write(address, config.secret, config=config) if args.cluster_file else None
    try:
        return serve_until_stopped(address, lambda stop: ns_loop(daemon, stop))
    finally:
        if written is not None:
            clusterfile.remove(written)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rmidl.client.cli.ns ...`: the same as `rmidl ns ...`."""
    return main_of("ns", argv)


if __name__ == "__main__":
    sys.exit(main())
