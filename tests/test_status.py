"""`rmidl status`: aligned rows for live and dead workers, exit codes, --json and --watch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from rmidl.client.cli import main
from rmidl.client.cli.status import COLUMNS


@pytest.fixture
def one_dead(nameserver, start_worker):
    """w1 serving, w2 registered but gone (its daemon stopped without unregistering, as after SIGKILL)."""
    start_worker(name="w1")
    dead = start_worker(name="w2")
    dead.daemon.shutdown()
    dead.serve_in_thread().join(10)
    return nameserver


def test_a_dead_worker_is_an_unreachable_row_and_exit_1(one_dead, capsys) -> None:
    assert main(["status", "--ns", one_dead]) == 1
    out = capsys.readouterr().out.splitlines()
    header, rule, live, dead, summary = out
    assert header.split() == ["name", "host", "state", "cores", "threads", "gflops", "tasks", "done", "busy",
                              "banks", "blobs", "error"]
    assert re.match(r"w1\s+127\.0\.0\.1\s+idle\s+\d+\s+1\s+[\d.]+\s+0\s+0\s+0\s+0$", live)
    assert re.match(r"w2\s+127\.0\.0\.1\s+unreachable\s+\S", dead)
    # the reason sits in the last column, where the header says "error"; every other column keeps its place
    assert dead.index("unreachable") == header.index("state") and len(dead) > header.index("error")
    assert "busy" not in dead[header.index("busy"):header.index("error")]
    assert set(rule) == {"-", " "} and len(rule.split()) == len(COLUMNS)
    assert summary == "2 worker(s), 1 unreachable"


def test_json_is_a_list_of_objects_with_stable_keys(one_dead, capsys) -> None:
    assert main(["status", "--ns", one_dead, "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [list(row) for row in rows] == [list(COLUMNS)] * 2
    live, dead = rows
    assert (live["name"], live["state"], live["error"], live["threads"]) == ("w1", "idle", None, 1)
    assert isinstance(live["gflops"], float) and isinstance(live["tasks_done"], int)
    assert (dead["name"], dead["state"], dead["cores"]) == ("w2", "unreachable", None)
    assert dead["error"]


def test_every_worker_answering_is_exit_0(nameserver, start_worker, capsys) -> None:
    start_worker(name="w1")
    assert main(["status", "--ns", nameserver, "--name", "w1", "--json"]) == 0
    assert [row["name"] for row in json.loads(capsys.readouterr().out)] == ["w1"]


def test_watch_redraws_until_its_count(nameserver, start_worker) -> None:
    start_worker(name="w1")
    done = subprocess.run([sys.executable, "-m", "rmidl", "status", "--ns", nameserver, "--watch", "0.05",
                           "--count", "3"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    frames = [frame for frame in done.stdout.split("\n\n") if frame.strip()]
    assert len(frames) == 3
    for frame in frames:
        title, header, _rule, row, summary = frame.splitlines()
        assert re.fullmatch(rf"{nameserver} at \d\d:\d\d:\d\d \(every 0.05 s; Ctrl-C stops\)", title)
        assert header.startswith("name") and row.startswith("w1 ") and summary == "1 worker(s)"


@pytest.mark.parametrize(("argv", "message"), [
    (["--watch", "0"], "--watch 0 must be a positive number"),
    (["--count", "2"], "--count 2 needs --watch"),
])
def test_bad_watch_options(nameserver, capsys, argv, message) -> None:
    assert main(["status", "--ns", nameserver, *argv]) == 2
    assert capsys.readouterr().err == f"rmidl: error: {message}" + (
        " of seconds\n" if "watch 0" in message else " and must be at least 1\n")
