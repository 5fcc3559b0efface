"""The rooms import in one direction: rmidl (with rmidl.remote) below server and client, server below client,
and client's coordination below its CLI and study; every import counts, also those inside functions."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest


def _imported(path: Path) -> set[str]:
    """Every module a source file imports anywhere (top level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _sources(package: str, *, skip: tuple[str, ...] = ()) -> list[Path]:
    root = Path(importlib.import_module(package).__file__ or "").parent
    return [p for p in sorted(root.rglob("*.py")) if not set(p.relative_to(root).parts) & set(skip)]


# (package whose sources are read, subpackages (or files) of it not read, module prefixes none may import)
LAYERS = [
    # rmidl/__main__.py is no room but the `python -m rmidl` entry point: it runs the command line on top
    ("rmidl", ("remote", "kernels", "__main__.py"), ("rmidl.server", "rmidl.client")),
    ("rmidl.remote", (), ("rmidl.server", "rmidl.client")),
    ("rmidl.kernels", (), ("rmidl.server", "rmidl.client", "rmidl.remote")),
    ("rmidl.server", (), ("rmidl.client",)),
    ("rmidl.client", ("cli", "bench"), ("rmidl.client.cli", "rmidl.client.bench")),
    ("rmidl.client.bench", (), ("rmidl.client.cli", "rmidl.server")),
]


@pytest.mark.parametrize(("package", "skip", "forbidden"), LAYERS, ids=[layer[0] for layer in LAYERS])
def test_a_room_imports_nothing_from_the_rooms_above_it(package: str, skip: tuple[str, ...],
                                                        forbidden: tuple[str, ...]) -> None:
    sources = _sources(package, skip=skip)
    assert sources, f"no sources found for {package}"
    wrong = {
        f"{path.name}: {name}"
        for path in sources
        for name in _imported(path)
        if name.startswith(forbidden)
    }
    assert not wrong, sorted(wrong)


def test_the_command_line_loads_without_matplotlib() -> None:
    """matplotlib is an optional extra: building every command's parser must not import it."""
    code = ("import sys\nfrom rmidl.client.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in sys.modules if m.startswith('matplotlib')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout
