"""What every `rmidl` command shares: its exit codes, the security options and the signal waiter."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

from rmidl.config import Config

__all__ = [
    "EXIT_CLUSTER",
    "EXIT_FAILED",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "add_security_arguments",
    "config_from_args",
    "main_of",
    "serve_until_stopped",
    "stop_on_signals",
]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
"""The command ran but did not deliver: a result that differs, a run not counted, every worker gone."""
EXIT_INPUT = 2
"""Bad input or options (an `rmidl.errors.InputError`, or any RmidlError that is not a ClusterError)."""
EXIT_CLUSTER = 3
"""The cluster failed the command (`rmidl.errors.ClusterError`: unreachable, refused, workers lost)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C, as shells report SIGINT."""


def add_security_arguments(
    parser: argparse.ArgumentParser, *, tls: bool = True, insecure: bool = False
) -> None:
    """The cluster-secret option, the 2-way TLS files (`tls`) and, for daemons, `--insecure`.

    RMIDL_SECRET and RMIDL_TLS_* work as well; the command line wins over them (`config_from_args`).
    """
    parser.add_argument("--secret-file", metavar="PATH", help="file holding the cluster secret")
    if tls:
        parser.add_argument("--tls-cert", metavar="PATH", help="PEM certificate of this end (2-way TLS)")
        parser.add_argument("--tls-key", metavar="PATH", help="PEM private key of --tls-cert")
        parser.add_argument("--tls-ca", metavar="PATH", help="PEM CA the peers' certificates chain to")
    if insecure:
        parser.add_argument("--insecure", action="store_true",
                            help="allow binding a non-loopback address without secret or TLS")


def config_from_args(args: argparse.Namespace) -> Config:
    """Config from RMIDL_* variables with the command line's secret and TLS files applied."""
    from rmidl.remote.security import secured_config

    files = {name: getattr(args, name, None) for name in ("tls_cert", "tls_key", "tls_ca")}
    return secured_config(Config(), secret_file=args.secret_file, **files)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event SIGINT/SIGTERM set while the block runs (handlers only in the main thread), then restored."""
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        stop.set()

    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    try:
        yield stop
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def serve_until_stopped(address: str, loop: Callable[[threading.Event], None]) -> int:
    """Print `address` and "ready" (what LocalCluster and tests wait for), then `loop(stop)` until
    SIGINT/SIGTERM sets `stop`; EXIT_OK once the loop has closed what it served."""
    with stop_on_signals() as stop:
        print(address, flush=True)
        print("ready", flush=True)
        loop(stop)
    return EXIT_OK


def main_of(command: str, argv: Sequence[str] | None = None) -> int:
    """`rmidl COMMAND ARGV...` in-process (argv None: this process's arguments): a command module's main."""
    from rmidl.client.cli import main

    return main([command, *(sys.argv[1:] if argv is None else argv)])
