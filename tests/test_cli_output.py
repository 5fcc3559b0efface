"""What every `rmidl` command shares on its output: -v/--debug/-q anywhere, rmidl's log lines but not
other libraries', warnings through logging, help that shows defaults, --version, `python -m rmidl`."""

from __future__ import annotations

import argparse
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import rmidl
from rmidl.client.cli import build_parser
from rmidl.client.localcluster import Process


def rmidl_process(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rmidl", *argv], capture_output=True, text=True, timeout=90,
                          check=False)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray(np.arange(48 * 64, dtype=np.uint32).reshape(48, 64).astype(np.uint8)).save(path)
    return path


def test_version_and_python_dash_m_rmidl() -> None:
    done = rmidl_process("--version")
    assert done.returncode == 0
    expected = rf"rmidl {re.escape(rmidl.__version__)} \(Python [\d.]+, Pyro5 [\d.]+, numpy [\d.]+\)\n"
    assert re.fullmatch(expected, done.stdout)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_rmidl_lines_and_not_pillows(picture, where) -> None:
    argv = ["run", str(picture), "--kernels", "sobel", "--no-cluster"]
    done = rmidl_process(*(["--debug", *argv] if where == "before" else [*argv, "--debug"]))
    assert done.returncode == 0, done.stderr
    logged = [line for line in done.stderr.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert any(" rmidl.imaging DEBUG: loaded image" in line for line in logged), done.stderr
    others = [line for line in logged if not line.split()[2].startswith("rmidl")]
    assert others == [], "debug lines of other libraries leaked in"


def test_verbose_and_quiet_after_the_command(picture) -> None:
    quiet = rmidl_process("run", str(picture), "--kernels", "sobel", "-q")
    assert quiet.returncode == 0 and quiet.stderr == ""  # not even the "no local cluster" note
    verbose = rmidl_process("run", str(picture), "--kernels", "sobel", "--no-cluster", "-v")
    assert verbose.returncode == 0 and " DEBUG: " not in verbose.stderr


def test_warnings_go_through_logging(tmp_path) -> None:
    """Pillow's UserWarning about a broken EXIF block is a log line of rmidl's format, not raw stderr."""
    path = tmp_path / "broken-exif.jpg"
    # an EXIF IFD whose one tag claims 100 bytes at offset 1000 of a 26-byte block
    ifd = struct.pack("<2sHIH", b"II", 42, 8, 1) + struct.pack("<HHII", 0x010E, 2, 100, 1000) + b"\0" * 4
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path, exif=b"Exif\0\0" + ifd)
    done = rmidl_process("run", str(path), "--kernels", "sobel", "--no-cluster")
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "UserWarning: Tag data larger than file" in line]
    assert len(warned) == 1, done.stderr
    assert re.match(r"\d{4}-\d\d-\d\d \S+ py\.warnings WARNING: .*UserWarning: Tag data larger", warned[0])


def test_workers_of_up_inherit_the_log_level() -> None:
    """`rmidl up -v`: its workers log at info too, and up shows their lines under their loggers."""
    process = Process("up", ["up", "--workers", "1", "-v"], os.environ)
    try:
        lines = process.wait_ready(90)
    finally:
        process.stop(15)
    wanted = "rmidl.server.daemon INFO: [worker w1] worker w1 serving"
    relayed = [line for line in process.lines if wanted in line]
    assert relayed, lines
    quiet = Process("up", ["up", "--workers", "1"], os.environ)
    try:
        quiet.wait_ready(90)
    finally:
        quiet.stop(15)
    assert not [line for line in quiet.lines if " INFO: " in line], list(quiet.lines)


def _options(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(name, sub, a) for a in sub._actions]
        else:
            found.append(("rmidl", parser, action))
    return found


def test_every_help_shows_its_defaults() -> None:
    missing = []
    for command, parser, action in _options(build_parser()):
        if not action.option_strings or action.default is None or action.default is False or \
                action.default in ("", argparse.SUPPRESS):
            continue
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        if "default" not in text or (str(action.default) not in text and "default:" in text):
            missing.append(f"{command} {action.option_strings[-1]} (default {action.default!r}): {text!r}")
    assert missing == []


def test_sizes_are_width_x_height_in_help() -> None:
    parser = build_parser()
    for command in ("run", "demo", "bench"):
        text = parser._subparsers._group_actions[0].choices[command].format_help()  # type: ignore[union-attr]
        assert re.search(r"width x height|WxH", text), command


def test_terminal_tables_right_align_columns_of_numbers_only() -> None:
    from rmidl.client.cli.common import table

    rows = [["sequential", "0.3864", "100%", "2 workers"], ["pipelined", "12.3", "21%", None],
            ["combined", "not counted", "-", ""]]  # placeholders for missing numbers keep the alignment
    lines = table(["scheme", "median (s)", "share", "note"], rows).splitlines()
    assert lines[2].startswith("sequential") and lines[3].startswith("pipelined ")
    # the numbers' last digits line up; a text column (even one with a number in it) stays left
    assert lines[2].index("0.3864") + 6 == lines[3].index("12.3") + 4
    assert lines[2].index("100%") + 4 == lines[3].index("21%") + 3
    assert lines[2].index("2 workers") == lines[0].index("note")
