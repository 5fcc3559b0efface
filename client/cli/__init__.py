"""The `rmidl` command line: one module per subcommand, errors as one line and a non-zero exit code.

Each command module offers `HELP`, `add_arguments(parser)` and `run(args) -> int`; `main(argv)` runs
any of them in-process (tests do), `python -m rmidl.client.cli` and the `rmidl` entry point in a process.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Protocol

from rmidl.client.cli.common import EXIT_CLUSTER, EXIT_INPUT, EXIT_INTERRUPTED
from rmidl.errors import ClusterError, RmidlError

__all__ = ["COMMANDS", "main"]

# subcommand -> module providing `HELP: str`, `add_arguments(parser)` and `run(args) -> int`
COMMANDS: dict[str, str] = {
    "ns": "rmidl.client.cli.ns",
    "worker": "rmidl.client.cli.worker",
    "up": "rmidl.client.cli.up",
    "run": "rmidl.client.cli.run",
    "status": "rmidl.client.cli.status",
    "demo": "rmidl.client.cli.demo",
    "bench": "rmidl.client.cli.bench",
    "train": "rmidl.client.cli.train",
    "predict": "rmidl.client.cli.predict",
}


class Command(Protocol):
    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmidl", description="RMI-style convolution cluster on Pyro5.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at info level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module: Command = importlib.import_module(module_name)  # type: ignore[assignment]
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; RmidlError becomes `rmidl: error: ...` on stderr (traceback only with --debug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except RmidlError as error:
        if args.debug:
            raise
        print(f"rmidl: error: {error}", file=sys.stderr)
        return EXIT_CLUSTER if isinstance(error, ClusterError) else EXIT_INPUT
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
