"""Every `rmidl` command as a real subprocess: output, exit codes, and no process left behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from reference import assert_close, reference

import rmidl
from rmidl.client.localcluster import Process


def env() -> dict[str, str]:
    """This test's environment (its private cluster directory included) for a child command."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def rmidl_cli(*argv: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rmidl.client.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env(), check=False)


def gone(pid: int, timeout: float = 10.0) -> bool:
    """True once no process has `pid` (children of `rmidl up` are reaped by it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)  # polling a condition with a deadline, not synchronising on time
    return False


@pytest.fixture
def up():
    """`rmidl up --workers 2` in the foreground for one test (which may stop it); yields (process,
    ns address, child pids); stopped after the test if it still runs."""
    process = Process("up", ["up", "--workers", "2"], env())
    try:
        lines = process.wait_ready(90)
        text = "\n".join(lines)
        address = re.search(r"name server (\S+) pid (\d+)", text)
        assert address, text
        pids = [int(address.group(2))] + [int(p) for p in re.findall(r"worker \w+ pid (\d+)", text)]
        assert len(pids) == 3
        yield process, address.group(1), pids
    finally:
        process.stop(15)


@pytest.fixture
def picture(tmp_path, rng):
    path = tmp_path / "picture.png"
    pixels = rng.integers(0, 256, (40, 60), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path, pixels


def test_ns_and_worker_commands():
    ns = Process("ns", ["ns", "--port", "0"], env())
    try:
        lines = ns.wait_ready(60)
        address = re.search(r"(127\.0\.0\.1:\d+)", "\n".join(lines)).group(1)
        worker = Process("worker", ["worker", "--ns", address, "--name", "solo", "--threads", "1"], env())
        try:
            assert any(line.startswith("PYRO:rmidl.worker.solo@") for line in worker.wait_ready(60))
            listed = subprocess.run(
                [sys.executable, "-m", "Pyro5.nsc", "-n", "127.0.0.1", "-p", address.split(":")[1], "list"],
                capture_output=True, text=True, timeout=60, env=env(), check=False,
            )
            assert "rmidl.worker.solo" in listed.stdout
        finally:
            assert worker.stop(15) == 0
        assert "solo" not in rmidl_cli("status", "--ns", address).stdout
    finally:
        assert ns.stop(15) == 0


def test_ns_and_worker_modules_run_the_command_line(capsys):
    """cli.ns.main / cli.worker.main (once rmidl.server.*.main) are `rmidl ns` / `rmidl worker`."""
    from rmidl.client.cli import ns, worker

    assert ns.main(["--port", "99999"]) == 2
    assert worker.main(["--ns", "127.0.0.1:1", "--threads", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "rmidl: error: port 99999 is outside 0-65535", "rmidl: error: --threads 0 must be at least 1"
    ]
    done = subprocess.run([sys.executable, "-m", "rmidl.client.cli.ns", "--port", "99999"],
                          capture_output=True, text=True, timeout=60, env=env(), check=False)
    assert (done.returncode, done.stderr) == (2, "rmidl: error: port 99999 is outside 0-65535\n")


def test_run_on_chosen_workers(nameserver, start_worker, picture, tmp_path, capsys):
    """`rmidl run --workers w1` gives every task to w1 (in-process, on in-process workers w1 and w2)."""
    from rmidl.client.cli import main

    for name in ("w1", "w2"):
        start_worker(name=name)
    path, pixels = picture
    out = tmp_path / "maps.npy"
    assert main(["run", str(path), "--kernels", "random:3x3x3", "--ns", nameserver, "--workers", " w1",
                 "--out", str(out)]) == 0
    assert re.search(r"tasks per worker: w1=\d+;", capsys.readouterr().out)
    assert_close(np.load(out), reference(pixels, rmidl.load_kernels("random:3x3x3")))


def test_demo_quick():
    done = rmidl_cli("demo", "--quick", "--workers", "1", timeout=110)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every configuration equals the single-thread result" in done.stdout
    for row in ("local pool, 1 thread", "workers, shared memory", "workers, TCP (bulk)", "paper (Java RMI)"):
        assert row in done.stdout
    # a smaller job than the paper's is compared by rate, never as "N x faster" in seconds
    assert "faster than the paper" not in done.stdout and "GFLOP/s" in done.stdout.splitlines()[-2]


def test_up_run_status_and_clean_stop(up, picture, tmp_path, private_cluster_files):
    """`rmidl up` writes a cluster file; status and run find the cluster through it, without --ns."""
    process, address, pids = up
    path, pixels = picture
    (cluster_file,) = private_cluster_files.iterdir()
    assert cluster_file.stat().st_mode & 0o777 == 0o600
    assert private_cluster_files.stat().st_mode & 0o777 == 0o700

    status = rmidl_cli("status")
    assert status.returncode == 0, status.stderr
    used = f"rmidl: using local cluster {address} (2 workers, pid {process.pid}, {cluster_file})\n"
    assert status.stderr == used
    assert re.search(r"^w1\s+127\.0\.0\.1\s+idle\s+\d+", status.stdout, re.MULTILINE)
    assert "2 worker(s)" in status.stdout
    # the cluster's own address works too: the same user's cluster file lends it the secret
    assert rmidl_cli("status", "--ns", address).returncode == 0

    out = tmp_path / "maps.npy"
    done = rmidl_cli("run", str(path), "--kernels", "random:5x3x4", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"rmidl: using local cluster {address} ")
    # sizes are W x H: the 60x40 picture gives 57x38 maps with 3x4 (kh x kw) kernels
    assert re.search(r"5 maps of 57x38 \(valid\): [\d.]+ s, [\d.]+ GFLOP/s, tasks per worker: w", done.stdout)
    assert_close(np.load(out), reference(pixels, rmidl.load_kernels("random:5x3x4")))

    folder = tmp_path / "pngs"
    done = rmidl_cli("run", str(path), "--kernels", "sobel", "--mode", "same", "--ns", "local",
                     "--no-shared-memory", "--out", str(folder))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["map_000.png", "map_001.png", "montage.png"]

    local = rmidl_cli("run", str(path), "--kernels", "sobel", "--no-cluster")
    assert local.returncode == 0 and local.stderr == "" and "tasks per worker: local=" in local.stdout

    process.signal(signal.SIGTERM)
    assert process.popen.wait(30) == 0
    assert all(gone(pid) for pid in pids)
    assert not cluster_file.exists(), "rmidl up left its cluster file behind"
    stopped = rmidl_cli("status")
    assert stopped.returncode == 3 and stopped.stderr.startswith("rmidl: error: no local cluster is running")


def test_up_secures_its_workers_with_a_generated_secret(up, tmp_path):
    """Without the cluster file (another local user cannot read it) the workers refuse the connection."""
    _, address, _ = up
    stranger = tmp_path / "stranger"
    stranger.mkdir(mode=0o700)
    as_stranger = {**env(), "RMIDL_CLUSTER_DIR": str(stranger)}
    for argv in (["status", "--ns", address], ["run", "default", "--kernels", "sobel", "--ns", address]):
        refused = subprocess.run([sys.executable, "-m", "rmidl", *argv], capture_output=True, text=True,
                                 timeout=60, env=as_stranger, check=False)
        assert refused.returncode == 3, refused.stderr
        assert refused.stderr.startswith("rmidl: error: ") and "refused" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_run_without_a_cluster_computes_here_and_says_so(picture):
    path, _ = picture
    done = rmidl_cli("run", str(path), "--kernels", "sobel")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ("rmidl: no local cluster is running (`rmidl up` starts one): compute in this "
                           "process\n")
    assert "tasks per worker: local=" in done.stdout
    refused = rmidl_cli("status")
    assert refused.returncode == 3
    assert refused.stderr.count("\n") == 1 and "no local cluster is running" in refused.stderr
    assert "give --ns HOST:PORT" in refused.stderr


def test_secured_cluster_needs_the_secret(tmp_path, picture, private_cluster_files):
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    process = Process("up", ["up", "--workers", "1", "--secret-file", str(secret)], env())
    try:
        text = "\n".join(process.wait_ready(90))
        address = re.search(r"name server (\S+)", text).group(1)
        (cluster_file,) = private_cluster_files.iterdir()
        assert json.loads(cluster_file.read_text())["secret"] == "correct horse battery staple"
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        refused = subprocess.run([sys.executable, "-m", "rmidl", "status", "--ns", address],
                                 capture_output=True, text=True, timeout=60,
                                 env={**env(), "RMIDL_CLUSTER_DIR": str(elsewhere)}, check=False)
        assert refused.returncode == 3
        assert refused.stderr.startswith("rmidl: error: ") and len(refused.stderr.strip().splitlines()) == 1
        allowed = rmidl_cli("run", str(picture[0]), "--kernels", "sobel", "--ns", address,
                            "--secret-file", str(secret))
        assert allowed.returncode == 0, allowed.stderr
        assert "tasks per worker: w1=" in allowed.stdout
    finally:
        assert process.stop(15) == 0


def test_up_killed_with_sigkill_leaves_no_children():
    process = Process("up", ["up", "--workers", "1"], env())
    try:
        text = "\n".join(process.wait_ready(90))
        pids = [int(p) for p in re.findall(r"pid (\d+)", text)]
        assert len(pids) == 2
        process.signal(signal.SIGKILL)
        process.popen.wait(10)
        # The kernel sends the children SIGTERM when `up` dies; they unregister and exit.
        assert all(gone(pid, timeout=20) for pid in pids)
    finally:
        process.stop(5)


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(p) for p in listing.read().split()]
    except FileNotFoundError:
        return []


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
                    reason="needs /proc/PID/task/TID/children (Linux)")
@pytest.mark.parametrize("argv", [
    ["demo", "--workers", "1"],
    ["bench", "--workers", "1", "--cores", "1", "--runs", "1", "--warmup", "0"],
])
def test_terminated_command_leaves_no_children(argv, tmp_path):
    """SIGTERM (the default action: no Python cleanup) on a command running its own local cluster."""
    process = subprocess.Popen([sys.executable, "-m", "rmidl.client.cli", *argv, *(
        ["--out", str(tmp_path / "out")] if argv[0] == "bench" else [])], env=env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids: list[int] = []
    try:
        end = time.monotonic() + 60
        while len(pids) < 2 and process.poll() is None:  # the name server and the worker are started
            assert time.monotonic() < end, "the command started no cluster in 60 s"
            pids = children_of(process.pid)
            time.sleep(0.02)  # polling a condition with a deadline
        assert len(pids) >= 2, "the command ended before it could be stopped"
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        assert all(gone(pid, timeout=20) for pid in pids), "children outlived their command"
    finally:
        process.kill()
        process.wait(30)
        for pid in pids:  # only if the test failed: leave no orphan behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_child_keeps_only_its_last_output_lines(tmp_path, monkeypatch):
    """A long-lived `rmidl up` reads its children's output for days: it keeps a bounded tail of it."""
    chatty = tmp_path / "chatty"  # stands in for the interpreter: "ready", then many more lines
    script = "print('ready', flush=True)\nfor i in range(5000): print('line', i)"
    chatty.write_text(f"#!/bin/sh\nexec {sys.executable} -c \"{script}\"\n")
    chatty.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(chatty))
    process = Process("chatty", [], env())
    try:
        process.wait_ready(30)  # raises unless it saw "ready" (however many lines followed it)
        assert process.popen.wait(30) == 0
    finally:
        process.stop(15)  # joins the reader once the child is done
    assert len(process.lines) <= 1000, f"kept {len(process.lines)} of 5001 lines"
    assert process.lines[-1] == "line 4999"


def test_up_says_when_a_worker_exits_and_stops_when_all_have():
    process = Process("up", ["up", "--workers", "2"], env())
    try:
        text = "\n".join(process.wait_ready(90))
        workers = {name: int(pid) for name, pid in re.findall(r"worker (\w+) pid (\d+)", text)}
        assert sorted(workers) == ["w1", "w2"]
        os.kill(workers["w1"], signal.SIGKILL)
        end = time.monotonic() + 30
        while "worker w1 exited with code -9" not in process.lines:
            assert time.monotonic() < end and process.alive(), list(process.lines)
            time.sleep(0.05)  # polling a condition with a deadline
        assert process.alive(), "up stopped although w2 still serves"
        os.kill(workers["w2"], signal.SIGKILL)
        assert process.popen.wait(30) == 1
        process.stop(15)  # joins the output reader
        assert list(process.lines)[-2:] == ["worker w2 exited with code -9",
                                            "every worker has exited; stopping"]
    finally:
        process.stop(15)


def test_a_bare_name_server_with_a_cluster_file(private_cluster_files):
    """`rmidl ns --cluster-file` generates a secret and writes the file; `worker --ns local` joins it."""
    ns = Process("ns", ["ns", "--port", "0", "--cluster-file"], env())
    try:
        ns.wait_ready(60)
        (cluster_file,) = private_cluster_files.iterdir()
        assert len(json.loads(cluster_file.read_text())["secret"]) >= 40
        worker = Process("worker", ["worker", "--ns", "local", "--name", "solo", "--threads", "1"], env())
        try:
            worker.wait_ready(60)
            status = rmidl_cli("status", "--json")
            assert status.returncode == 0, status.stderr
            assert [row["name"] for row in json.loads(status.stdout)] == ["solo"]
        finally:
            assert worker.stop(15) == 0
    finally:
        assert ns.stop(15) == 0
    assert not cluster_file.exists()


def test_features_on_the_local_pool_and_through_up(up, image_folder, tmp_path):
    from rmidl.datasets import open_dataset
    from rmidl.featureset import FeatureSet
    from rmidl.network import Network

    _, address, _ = up
    net = Network.from_spec("3x3x3:relu:max2,2x3x3:relu:max2", seed=4)
    images = open_dataset(image_folder).read().images
    expected = np.concatenate([net.forward_batch(images[a : a + 5], threads=1) for a in (0, 5)])
    for where, options in (("here", ["--no-cluster", "--local-threads", "1"]), ("up", ["--ns", address])):
        out = tmp_path / f"{where}.npz"
        done = rmidl_cli("features", str(image_folder), "--net", "3x3x3:relu:max2,2x3x3:relu:max2", "--seed",
                         "4", "--batch", "5", "--out", str(out), *options)
        assert done.returncode == 0, done.stderr
        assert re.search(r"^10 images x 24 features \(2 classes: c0, c1\) in [\d.]+ s, [\d.]+ images/s",
                         done.stdout)
        on_workers = re.search(r"tasks per runner: (w[12]=\d+ ?)+;", done.stdout) is not None
        assert on_workers == (where == "up") and "error" not in done.stderr
        saved = FeatureSet.load(out)
        np.testing.assert_array_equal(saved.X, expected)
        assert saved.labels.tolist() == [0] * 5 + [1] * 5


def test_ctrl_c_in_a_job_says_interrupted_and_exits_130(monkeypatch, capsys):
    from rmidl.client import cli
    from rmidl.client.cli import run as run_command

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_command, "run", interrupted)
    assert cli.main(["run", "default", "--kernels", "sobel", "--no-cluster"]) == 130
    assert capsys.readouterr().err.strip() == "rmidl: interrupted"


def test_a_closed_pipe_ends_a_command_quietly(tmp_path):
    from conftest import gaussian_blobs

    x, y = gaussian_blobs(300, 6, 3)
    np.savez(tmp_path / "feat.npz", X=x, y=y)
    model = rmidl.MLP((6, 4, 3)).save(tmp_path / "model.npz")
    process = subprocess.Popen([sys.executable, "-m", "rmidl.client.cli", "predict", str(model),
                                str(tmp_path / "feat.npz")], env=env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before the command writes a line (`| head -0`)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_the_demo_drops_each_result_before_its_next_run() -> None:
    """Held, the last result would make every timed run take a fresh (page-faulting) output block."""
    import weakref

    from rmidl.client.cli.demo import _best

    alive: list[weakref.ref] = []

    def call() -> tuple[np.ndarray, dict[str, int]]:
        assert all(ref() is None for ref in alive), "the previous result is still held"
        result = np.zeros(4)
        alive.append(weakref.ref(result))
        return result, {"local": 1}

    seconds, result, tasks_by = _best(3, call)
    assert len(alive) == 4 and alive[-1]() is result and seconds >= 0 and tasks_by == {"local": 1}
