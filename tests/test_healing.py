"""The registry heals: no worker is unregistered without evidence of death, a worker re-registers when
it finds itself missing (name server restarted, or a coordinator's mistake), a hung name server holds up
no job, and `rmidl up` restarts a name server that died."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from reference import assert_close, reference

from rmidl.client import Coordinator
from rmidl.client.localcluster import LocalCluster
from rmidl.config import Config
from rmidl.remote.naming import list_workers
from rmidl.remote.transport import connect_ns
from rmidl.server.nameserver import start_ns

QUICK_BEAT = {"RMIDL_HEARTBEAT_INTERVAL": "0.3"}
SECRET = "correct horse battery staple"


def registered(address: str, config: Config | None = None) -> set[str]:
    with connect_ns(address, config or Config(environ={})) as ns:
        return set(list_workers(ns))


def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll `condition` until it holds or `timeout` passes (a deadline on state, not a sleep)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def small_job(coordinator: Coordinator, rng: np.random.Generator) -> dict[str, int]:
    image = rng.standard_normal((60, 40)).astype(np.float32)
    kernels = rng.standard_normal((6, 3, 3)).astype(np.float32)
    assert_close(coordinator.correlate(image, kernels), reference(image, kernels))
    return coordinator.stats()


def states(coordinator: Coordinator) -> dict[str, str]:
    return {w["name"]: w["state"] for w in coordinator.workers()}


def test_a_worker_paused_while_a_coordinator_starts_keeps_its_registration(rng):
    with LocalCluster(workers=2, env=QUICK_BEAT) as cluster:
        cluster.kill("w1", signal.SIGSTOP)
        try:
            config = Config(environ={}, connect_timeout=1.0)
            with Coordinator(cluster.ns_address, local_threads=0, config=config, min_tasks=24) as coordinator:
                assert set(small_job(coordinator, rng)) == {"w2"}
                assert registered(cluster.ns_address) == {"w1", "w2"}  # slow to answer is not dead
                assert states(coordinator)["w1"] == "silent"
                cluster.kill("w1", signal.SIGCONT)
                assert eventually(lambda: states(coordinator)["w1"] == "ok")
                assert eventually(lambda: "w1" in small_job(coordinator, rng))  # back in use
        finally:
            cluster.kill("w1", signal.SIGCONT)


def test_a_silent_worker_loses_its_registration_only_after_the_grace_and_registers_again():
    with LocalCluster(workers=1, env=QUICK_BEAT) as cluster:
        cluster.kill("w1", signal.SIGSTOP)
        try:
            config = Config(environ={}, connect_timeout=0.5, worker_grace=1.0)
            with Coordinator(cluster.ns_address, local_threads=1, config=config) as coordinator:
                assert registered(cluster.ns_address) == {"w1"}  # one failed check is no evidence
                # Each look checks it again when due; after the grace and three failed checks it goes.
                assert eventually(lambda: bool(coordinator.workers()) and not registered(cluster.ns_address))
                assert coordinator._scheduler.workers["w1"].failed_checks >= 3
                cluster.kill("w1", signal.SIGCONT)
                # The worker finds itself missing and registers again (its heartbeat).
                assert eventually(lambda: registered(cluster.ns_address) == {"w1"})
                assert eventually(lambda: states(coordinator)["w1"] == "ok")
        finally:
            cluster.kill("w1", signal.SIGCONT)


def test_workers_register_again_after_a_name_server_restart(start_worker, cluster_config, rng):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = cluster_config.replace(heartbeat_interval=0.2)
    address = f"127.0.0.1:{port}"
    _, first = start_ns("127.0.0.1", port, config=config)
    thread = first.serve_in_thread()
    for name in ("a", "b"):
        start_worker(name=name, ns=address, config=config)
    with Coordinator(address, local_threads=0, config=config, min_tasks=8) as coordinator:
        assert set(small_job(coordinator, rng)) <= {"a", "b"}
        first.shutdown()
        thread.join(5)
        _, second = start_ns("127.0.0.1", port, config=config)
        thread = second.serve_in_thread()
        try:
            assert eventually(lambda: registered(address) == {"a", "b"}, timeout=10)
            assert set(small_job(coordinator, rng)) <= {"a", "b"}  # the coordinator kept on
            with Coordinator(address, local_threads=0, config=config) as newcomer:
                assert set(small_job(newcomer, rng)) <= {"a", "b"}
        finally:
            second.shutdown()
            thread.join(5)


@pytest.mark.timeout(90)
def test_a_hung_name_server_holds_up_no_job(children, start_worker, cluster_config, rng):
    ns = children("rmidl.client.cli", "ns", "--port", "0")
    address = ns.read_until("ready")[0]
    start_worker(name="w0", ns=address)
    # Were a job to wait on the name server, each would take connect_timeout (the test's timeout ends it).
    config = cluster_config.replace(connect_timeout=300.0, discovery_interval=0.001)
    with Coordinator(address, local_threads=0, config=config, min_tasks=4) as coordinator:
        os.kill(ns.process.pid, signal.SIGSTOP)
        try:
            for _ in range(5):
                assert set(small_job(coordinator, rng)) == {"w0"}
        finally:
            os.kill(ns.process.pid, signal.SIGCONT)


def test_up_restarts_its_name_server_and_the_workers_register_again(children, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    up = children("rmidl.client.cli", "up", "--workers", "2", "--secret-file", str(secret), env=QUICK_BEAT)
    lines = up.read_until(re.compile(r"^ready: "), timeout=60)
    match = next(m for line in lines if (m := re.match(r"name server (\S+) pid (\d+)$", line)))
    address, pid = match.group(1), int(match.group(2))
    member = Config(environ={}, secret=SECRET)
    assert registered(address, member) == {"w1", "w2"}
    os.kill(pid, signal.SIGKILL)
    said = up.read_until(re.compile(rf"^name server {re.escape(address)} restarted, pid \d+"), timeout=30)
    assert any(line.startswith(f"name server pid {pid} exited with code -9") for line in said)
    assert eventually(lambda: registered(address, member) == {"w1", "w2"}, timeout=15)
    code, stderr = up.stop(signal.SIGTERM)
    assert code == 0, stderr


def test_discovery_runs_once_at_a_time_off_the_task_path(nameserver, start_worker, cluster_config):
    start_worker(name="w0")
    with Coordinator(nameserver, local_threads=0, config=cluster_config.replace(discovery_interval=0.001)
                     ) as coordinator:
        discovery = coordinator._scheduler.discovery
        entered, release = threading.Event(), threading.Event()
        looks: list[int] = []
        registry = discovery._registry

        def slow() -> dict[str, str]:
            looks.append(1)
            entered.set()
            release.wait(10)
            return registry()

        discovery._registry = slow
        for _ in range(20):
            coordinator._scheduler.refresh()  # returns at once, whatever the name server does
        assert entered.wait(10)
        release.set()
        assert eventually(lambda: discovery._background is not None and not discovery._background.is_alive())
        assert len(looks) == 1
