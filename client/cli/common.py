"""What every `rmidl` command shares: exit codes, help and logging set-up, the security options, the
signal waiter and the one table renderer."""

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

from tabulate import tabulate

from rmidl.client.localcluster import LOG_FORMAT
from rmidl.config import Config
from rmidl.remote.clusterfile import LOCAL, Resolved

__all__ = [
    "EXIT_CLUSTER",
    "EXIT_FAILED",
    "EXIT_INPUT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "HERE",
    "HelpFormatter",
    "add_output_arguments",
    "LOCAL",
    "Target",
    "add_cluster_arguments",
    "add_coordinator_arguments",
    "add_metrics_arguments",
    "add_security_arguments",
    "choose_cluster",
    "config_from_args",
    "log_level",
    "logging_configured",
    "main_of",
    "note",
    "serve_until_stopped",
    "stop_on_signals",
    "table",
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
HERE = "compute in this process"
"""What `run`, `features` and `train` do without a cluster (their --ns help and their one stderr note)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is none;
    descriptions and epilogs keep their line breaks (tables of syntax, exit codes)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default in ("", argparse.SUPPRESS)
        if "default" in text or nothing:
            return text
        return super()._get_help_string(action)


def add_output_arguments(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """-v / --debug / -q, on `rmidl` itself and (`nested`) again on each command, so they work before
    or after the command's name; a command's copy leaves unset what it was not given."""
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if nested else {}
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="store_true", help="log rmidl's progress (info level)",
                       **unset)
    group.add_argument("--debug", action="store_true",
                       help="log rmidl's debug lines (not other libraries') and show tracebacks", **unset)
    group.add_argument("-q", "--quiet", action="store_true", help="only errors on stderr", **unset)


def log_level(args: argparse.Namespace) -> int:
    """The level the output options ask for: --debug over -v over -q; WARNING without any."""
    if getattr(args, "debug", False):
        return logging.DEBUG
    if getattr(args, "verbose", False):
        return logging.INFO
    return logging.ERROR if getattr(args, "quiet", False) else logging.WARNING


@contextmanager
def logging_configured(level: int) -> Iterator[None]:
    """rmidl's loggers at `level` and everyone else's at WARNING (or above) while a command runs, with
    Python warnings (e.g. Pillow's about corrupt EXIF) logged instead of printed raw; restored after,
    so running commands in-process (tests, notebooks) leaves logging as it found it.

    A handler on stderr is added only where the root logger has none (a `rmidl` process).
    """
    root, ours = logging.getLogger(), logging.getLogger("rmidl")
    saved = root.level, ours.level
    handler = None
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    # Others' debug floods (Pillow's chunk reader, Pyro5) stay out of --debug; their warnings still show.
    root.setLevel(max(logging.WARNING, level))
    ours.setLevel(level)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.setLevel(saved[0])
        ours.setLevel(saved[1])
        if handler is not None:
            root.removeHandler(handler)


def note(args: argparse.Namespace, text: str) -> None:
    """One informational line on stderr ("rmidl: ..."), unless --quiet: what a command chose for the user."""
    if not getattr(args, "quiet", False):
        print(f"rmidl: {text}", file=sys.stderr, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[object]], *,
          align: Sequence[str] | None = None) -> str:
    """Rows under a header, aligned in columns with a rule under the header, for a terminal.

    The one renderer of `status`, `demo` and `bench`: cells are shown as given (None as empty, numbers
    not re-formatted); `align` ("left"/"right" per column) defaults to right for a column whose every
    cell is a number (also "21%", "1.8x"), left for the others.
    """
    cells = [["" if cell is None else str(cell) for cell in row] for row in rows]
    if align is None:
        align = ["right" if _numeric_column([row[i] for row in cells if i < len(row)]) else "left"
                 for i in range(len(header))]
    return str(tabulate(cells, headers=list(header), tablefmt="simple", disable_numparse=True, colalign=align,
                        stralign="left", numalign="right"))


PLACEHOLDERS = frozenset({"-", "\N{EN DASH}", "n/a", "not counted"})
"""Cells that stand for a missing number: they leave a column of numbers right-aligned."""


def _numeric_column(cells: Sequence[str]) -> bool:
    filled = [cell.strip().rstrip("%x\N{MULTIPLICATION SIGN}").strip() for cell in cells
              if cell.strip() and cell.strip() not in PLACEHOLDERS]
    if not filled:
        return False
    try:
        for cell in filled:
            float(cell)
    except ValueError:
        return False
    return True


def add_cluster_arguments(parser: argparse.ArgumentParser, *, fallback: str | None = None) -> None:
    """`--ns` (HOST:PORT or `local`) and, for commands that can work without a cluster (`fallback` says
    how), `--no-cluster`."""
    without = f"; none running: {fallback}" if fallback else ""
    parser.add_argument("--ns", metavar="HOST:PORT|local",
                        help="name server of the cluster to use (default: the local cluster `rmidl up` "
                        f"started, found through its cluster file{without})")
    if fallback:
        parser.add_argument("--no-cluster", action="store_true",
                            help=f"ignore any running local cluster: {fallback}")


Target = Resolved
"""The cluster a command uses (`rmidl.remote.clusterfile.Resolved`)."""


def choose_cluster(args: argparse.Namespace, config: Config, *, fallback: str | None = None) -> Target:
    """Which cluster: `--ns HOST:PORT` as given; `--ns local` (or no `--ns`) the newest running local
    cluster from its cluster file, with its secret; none running and no `--ns`: no cluster when the
    command has a `fallback` (say so), else a one-line RegistryError; `--no-cluster`: none. `--workers`
    chooses among a cluster's workers, so with it none running is that RegistryError too. The rule is
    `rmidl.remote.clusterfile.resolve`, which `Coordinator(ns=...)` follows too."""
    from rmidl.remote import clusterfile

    ns = getattr(args, "ns", None)
    if getattr(args, "workers", None):
        fallback = None
    return clusterfile.resolve(ns, config, auto=not getattr(args, "no_cluster", False),
                               explicit_secret=bool(getattr(args, "secret_file", None)),
                               fallback=fallback)


def add_coordinator_arguments(parser: argparse.ArgumentParser, *, moved: str) -> None:
    """--workers, --local-threads and --no-shared-memory: whom a Coordinator uses and how data moves
    (`moved` says what travels over TCP with --no-shared-memory)."""
    parser.add_argument("--workers", metavar="NAME[,NAME...]",
                        help="use only these workers of the cluster (default: every registered one)")
    parser.add_argument("--local-threads", type=int, metavar="N",
                        help="threads of this process's pool (default: all cores without a cluster, 0 with)")
    parser.add_argument("--no-shared-memory", action="store_true",
                        help=f"send {moved} over TCP even with workers on this host")


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


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """`--metrics-port` / `--metrics-host`: serve Prometheus metrics (`rmidl.metrics.serve_metrics`)."""
    parser.add_argument("--metrics-port", type=int, metavar="P",
                        help="serve Prometheus metrics on this port (0: any free one, printed)")
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                        help="address of the metrics port; past loopback it is 2-way TLS with --tls-*, else "
                        "readable by anyone who reaches it (Prometheus has no authentication)")


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
