"""The `rmidl` command line: one module per subcommand, errors as one line and a non-zero exit code.

Each command module offers `HELP`, `add_arguments(parser)` and `run(args) -> int`; `main(argv)` runs
any of them in-process (tests do); `rmidl`, `python -m rmidl` and `python -m rmidl.client.cli` in a process.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Protocol

import rmidl
from rmidl.client.cli.common import (
    EXIT_CLUSTER,
    EXIT_FAILED,
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    HelpFormatter,
    add_output_arguments,
    log_level,
    logging_configured,
)
from rmidl.errors import ClusterError, RmidlError

__all__ = ["COMMANDS", "main"]

# subcommand -> module providing `HELP: str`, `add_arguments(parser)` and `run(args) -> int`
COMMANDS: dict[str, str] = {
    "ns": "rmidl.client.cli.ns",
    "worker": "rmidl.client.cli.worker",
    "up": "rmidl.client.cli.up",
    "run": "rmidl.client.cli.run",
    "features": "rmidl.client.cli.features",
    "status": "rmidl.client.cli.status",
    "dashboard": "rmidl.client.cli.dashboard",
    "demo": "rmidl.client.cli.demo",
    "bench": "rmidl.client.cli.bench",
    "train": "rmidl.client.cli.train",
    "predict": "rmidl.client.cli.predict",
}


class Command(Protocol):
    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def version() -> str:
    """`rmidl --version`: ours, then the versions of what results depend on."""
    import numpy
    import Pyro5

    python = ".".join(map(str, sys.version_info[:3]))
    libraries = f"Pyro5 {Pyro5.__version__}, numpy {numpy.__version__}"
    return f"rmidl {rmidl.__version__} (Python {python}, {libraries})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmidl", description="RMI-style convolution cluster on Pyro5.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=version())
    add_output_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module: Command = importlib.import_module(module_name)  # type: ignore[assignment]
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP,
                                        formatter_class=HelpFormatter)
        module.add_arguments(command_parser)
        add_output_arguments(command_parser, nested=True)
        command_parser.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; RmidlError becomes `rmidl: error: ...` on stderr (traceback only with --debug)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with logging_configured(log_level(args)):
        try:
            code = int(args.handler(args) or 0)
            sys.stdout.flush()  # here, so that a closed pipe is seen by the handler below
            return code
        except RmidlError as error:
            if args.debug:
                raise
            print(f"rmidl: error: {error}", file=sys.stderr)
            return EXIT_CLUSTER if isinstance(error, ClusterError) else EXIT_INPUT
        except KeyboardInterrupt:
            print("rmidl: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            # The reader went away (`rmidl predict ... | head`): stop quietly, as command-line tools do.
            # Python's own flush at exit would fail again, so stdout becomes /dev/null first.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
