"""The README is accurate for a reader who has only the repository: its Python example runs, the
files it names exist, its bank specs load (without aliasing), and it points outside the repo nowhere."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import rmidl

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def test_the_python_example_runs(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # it writes a dataset ("textures/") where it runs, as a user's would
    (example,) = blocks("python")
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"<LocalCluster 127\.0\.0\.1:\d+: 2 workers, secret, running>", out), out


def test_the_files_it_names_exist() -> None:
    named = set(re.findall(r"`((?:scripts|tests|client|server|rmidl|\.ci)/[\w./-]*\w)`", README))
    named |= {name for name in re.findall(r"`([A-Z][A-Za-z]+\.md|LICENSE)`", README)}
    assert named, "the README names no files?"
    missing = sorted(name for name in named if not (ROOT / name).exists())
    assert missing == []
    assert "../" not in README and "street.png" not in README


def test_its_bank_specs_load_without_aliasing(caplog) -> None:
    specs = set(re.findall(r"--kernels (\S+)", "".join(blocks("bash"))))
    specs |= set(re.findall(r'load_kernels\("([^"]+)"\)', README))
    assert {"gabor:8x11", "sobel", "random:128x11x11"} <= specs
    with caplog.at_level(logging.WARNING, logger="rmidl.banks"):
        for spec in sorted(specs):
            assert rmidl.load_kernels(spec).ndim in (3, 4), spec  # (K, kh, kw[, C])
    assert caplog.records == []


@pytest.mark.parametrize("command", ["up", "status", "run", "demo", "bench", "ns", "worker", "dashboard"])
def test_every_command_it_shows_exists(command) -> None:
    from rmidl.client.cli import COMMANDS

    assert f"rmidl {command}" in README and command in COMMANDS
