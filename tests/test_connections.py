"""What a stranger who can open TCP connections can cost a daemon: bounded connections, deadlines, whole
messages only, exactly the contract (no one-way, batched, compressed or re-serialized calls), bounded
tasks per worker."""

from __future__ import annotations

import os
import socket
import struct
import threading

import numpy as np
import Pyro5.api
import pytest
from Pyro5.errors import CommunicationError
from reference import assert_close, reference
from worker_doubles import BlockingWorker

from rmidl.client import Coordinator
from rmidl.client.stub import WorkerStub
from rmidl.config import Config
from rmidl.errors import WorkerBusy
from rmidl.remote.blobs import Blob
from rmidl.remote.naming import list_workers
from rmidl.remote.transport import connect_ns, parse_address, worker_proxy
from rmidl.remote.wire import pack, unpack
from rmidl.server.nameserver import address_of, start_ns

SECRET = "correct horse battery staple"


def port_of(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1])


def small_job(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    image = rng.standard_normal((12, 10, 1)).astype(np.float32)
    bank = rng.standard_normal((2, 3, 3, 1)).astype(np.float32)
    task = {"task_id": 0, "bank_id": Blob.bank(bank).content_id, "kernels": [0, 2], "rows": [0, 10],
            "input": {"array": pack(image)}, "output": "inline"}
    return image, bank, task


def run_small_job(uri: str, config: Config, rng: np.random.Generator) -> None:
    """One inline task through a fresh connection, checked against the float64 reference."""
    image, bank, task = small_job(rng)
    with worker_proxy(uri, config, timeout=30) as member:
        member.put_blob(task["bank_id"], Blob.bank(bank).to_wire())
        assert_close(unpack(member.correlate(task)["result"]), reference(image, bank))


def process_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


@pytest.fixture
def ns_daemon(cluster_config):
    """An in-process name server (its daemon, to look at its connections); always shut down."""
    _, daemon = start_ns("127.0.0.1", 0, config=cluster_config)
    thread = daemon.serve_in_thread()
    try:
        yield daemon
    finally:
        daemon.shutdown()
        thread.join(5)


# --- idle, silent and stalled connections --------------------------------------------------------------


def test_idle_connections_after_the_handshake_do_not_lock_a_worker_out(start_worker, cluster_config, rng):
    handle = start_worker(ns=None)
    idle = [worker_proxy(handle.uri, cluster_config, timeout=10) for _ in range(120)]
    try:
        for proxy in idle:  # each finishes the (unsecured) handshake, then says nothing
            proxy._pyroBind()
        run_small_job(handle.uri, cluster_config, rng)
    finally:
        for proxy in idle:
            proxy._pyroRelease()


def test_silent_connections_do_not_stop_the_name_server_serving_status(children, start_worker,
                                                                       cluster_config):
    ns = children("rmidl.client.cli", "ns", "--port", "0")
    address = ns.read_until("ready")[0]
    start_worker(name="listed", ns=address)
    silent = [socket.create_connection(parse_address(address), timeout=10) for _ in range(120)]
    try:
        status = children("rmidl.client.cli", "status", "--ns", address, env={"RMIDL_CONNECT_TIMEOUT": "5"})
        code, stderr = status.wait_exit(60)
        assert code == 0, stderr
        with connect_ns(address, cluster_config) as registry:  # lookups keep being served meanwhile
            assert set(list_workers(registry)) == {"listed"}
    finally:
        for sock in silent:
            sock.close()


def test_many_live_coordinators_hold_no_name_server_connection(ns_daemon, start_worker, cluster_config, rng):
    address = address_of(ns_daemon)
    start_worker(name="w0", ns=address)
    coordinators = []
    try:
        for _ in range(90):
            coordinators.append(Coordinator(address, local_threads=0, config=cluster_config))
        # A coordinator looks at the registry on a short connection and lets go of it.
        assert ns_daemon.transportServer.connections <= 4
        with connect_ns(address, cluster_config) as registry:
            assert set(list_workers(registry)) == {"w0"}
        image = rng.standard_normal((30, 20)).astype(np.float32)
        kernels = rng.standard_normal((3, 3, 3)).astype(np.float32)
        assert_close(coordinators[-1].correlate(image, kernels), reference(image, kernels))
    finally:
        for coordinator in coordinators:
            coordinator.close()


def test_a_silent_connection_is_dropped_after_the_handshake_deadline(start_worker, cluster_config):
    config = cluster_config.replace(handshake_timeout=0.3)
    handle = start_worker(ns=None, config=config)
    with socket.create_connection(("127.0.0.1", port_of(handle.uri)), timeout=10) as raw:
        reply = raw.makefile("rb").read()  # the worker answers and hangs up on a peer that never says hello
    assert reply[:4] == b"PYRO" and reply[6] == 3  # MSG_CONNECTFAIL
    assert b"handshake timeout after 0.3 s" in reply
    with worker_proxy(handle.uri, config, timeout=10) as proxy:
        assert proxy.ping() == "pong"


def test_a_peer_that_stalls_mid_message_is_dropped(start_worker, cluster_config):
    config = cluster_config.replace(io_timeout=0.3)
    handle = start_worker(ns=None, config=config)
    proxy = worker_proxy(handle.uri, config, timeout=10)
    proxy._pyroBind()
    sock = proxy._pyroConnection.sock
    # Half a request header, then nothing: it must cost no thread, and go after io_timeout.
    sock.sendall(b"PYRO" + struct.pack("!H", 502) + bytes(10))
    assert sock.recv(1) == b""  # closed by the worker
    proxy._pyroRelease()
    assert handle.daemon.transportServer.dropped["io timeout"] == 1
    with worker_proxy(handle.uri, config, timeout=10) as member:
        assert member.ping() == "pong"


def test_connections_are_bounded_and_the_quietest_make_room(start_worker, cluster_config, rng):
    config = cluster_config.replace(max_connections=16)  # 4 per peer host; all of ours are 127.0.0.1
    handle = start_worker(ns=None, config=config)
    stub = WorkerStub("w", handle.uri, config)
    assert stub.remote(lambda proxy: proxy.ping()) == "pong"  # one pooled connection, now idle
    idle = [worker_proxy(handle.uri, config, timeout=10) for _ in range(12)]
    try:
        for proxy in idle:
            proxy._pyroBind()
        server = handle.daemon.transportServer
        assert server.connections <= 4 and server.dropped["room"] >= 9
        # A client whose pooled connection made room reconnects without noticing; new ones get in.
        assert stub.remote(lambda proxy: proxy.ping()) == "pong"
        run_small_job(handle.uri, config, rng)
    finally:
        stub.close()
        for proxy in idle:
            proxy._pyroRelease()


def test_strangers_make_room_before_members(start_worker, cluster_config):
    config = cluster_config.replace(secret=SECRET, max_connections=16)
    handle = start_worker(ns=None, config=config)
    members = [worker_proxy(handle.uri, config, timeout=10) for _ in range(3)]
    try:
        for member in members:
            member._pyroBind()
        silent = [socket.create_connection(("127.0.0.1", port_of(handle.uri)), timeout=10) for _ in range(30)]
        for member in members:  # the same connections: none was closed to make room for a stranger
            assert member.ping() == "pong"
        for sock in silent:
            sock.close()
    finally:
        for member in members:
            member._pyroRelease()


# --- exactly the contract ------------------------------------------------------------------------------


def test_one_way_calls_of_methods_not_declared_one_way_are_refused(children, nameserver, cluster_config):
    # A real worker process whose correlate calls would hang: Pyro5 runs a one-way call in a new thread
    # each, so a flood of them grew a worker to hundreds of threads.
    worker = children("worker_doubles", "--ns", nameserver, "--name", "w", "--hang", "1000",
                      env={"PYTHONPATH": os.path.dirname(__file__)})
    uri = worker.read_until("ready")[0]
    before = process_threads(worker.process.pid)
    _, _, task = small_job(np.random.default_rng(0))
    for _ in range(60):
        with worker_proxy(uri, cluster_config, timeout=10) as proxy:
            proxy._pyroBind()
            proxy._pyroOneway.add("correlate")
            proxy.correlate(task)  # returns at once: nothing is answered to a one-way call
    with worker_proxy(uri, cluster_config, timeout=10) as member:
        assert member.ping() == "pong"
        assert member.info()["busy"] == 0  # none of them ran
    assert process_threads(worker.process.pid) <= before + 8  # a few request threads, not one per call


@pytest.mark.parametrize("how", ["batch", "serpent after msgpack", "marshal after msgpack",
                                 "kept serialized", "compressed"])
def test_calls_outside_the_contract_are_refused(start_worker, cluster_config, monkeypatch, how):
    handle = start_worker(ns=None)
    proxy = worker_proxy(handle.uri, cluster_config, timeout=10)
    proxy._pyroBind()
    with pytest.raises(CommunicationError):
        if how == "batch":
            with Pyro5.api.BatchProxy(proxy) as batch:
                batch.ping()
                batch.ping()
                list(batch())
        elif how.endswith("after msgpack"):  # one serializer per connection: the handshake's
            proxy._pyroSerializer = how.split()[0]
            proxy.ping()
        elif how == "kept serialized":  # Pyro5 would unpack its annotation with marshal
            proxy.put_blob(Pyro5.api.SerializedBlob("info", {"x": 1}))
        else:  # a compressed message could inflate to any size
            monkeypatch.setattr(Pyro5.api.config, "COMPRESSION", True)
            proxy.put_blob("b", Blob.bank(np.ones((2, 8, 8, 1), np.float32)).to_wire())
    proxy._pyroRelease()
    assert handle.worker.info()["blobs"] == []
    with worker_proxy(handle.uri, cluster_config, timeout=10) as member:
        assert member.ping() == "pong"


def test_the_daemon_object_serves_only_metadata_and_authentication(start_worker, cluster_config):
    handle = start_worker(ns=None)
    location = handle.uri.rsplit("@", 1)[1]
    with worker_proxy(f"PYRO:Pyro.Daemon@{location}", cluster_config, timeout=10) as daemon:
        daemon._pyroBind()
        assert daemon._pyroMethods == {"get_metadata", "authenticate"}
        for name in ("registered", "info", "get_next_stream_item"):
            with pytest.raises(AttributeError, match=name):
                getattr(daemon, name)()
        assert "correlate" in daemon.get_metadata(handle.object_name)["methods"]


# --- tasks a worker holds ----------------------------------------------------------------------------


def test_a_worker_holds_at_most_worker_max_tasks(start_worker, cluster_config, rng):
    config = cluster_config.replace(worker_max_tasks=2)
    handle = start_worker(ns=None, config=config, worker_class=BlockingWorker)
    image, bank, task = small_job(rng)
    with worker_proxy(handle.uri, config, timeout=10) as proxy:
        proxy.put_blob(task["bank_id"], Blob.bank(bank).to_wire())

    def hold(task_id: int) -> None:
        with worker_proxy(handle.uri, config, timeout=30) as proxy:
            proxy.correlate(task | {"task_id": task_id})

    held = [threading.Thread(target=hold, args=(i,)) for i in (1, 2)]
    for thread in held:
        thread.start()
    try:
        assert handle.worker.entered.acquire(timeout=10) and handle.worker.entered.acquire(timeout=10)
        with worker_proxy(handle.uri, config, timeout=10) as proxy:
            for _ in range(20):
                with pytest.raises(WorkerBusy, match=r"busy: 2 tasks held \(worker_max_tasks=2\)"):
                    proxy.correlate(task | {"task_id": 3})
            assert proxy.ping() == "pong" and proxy.info()["busy"] == 2
    finally:
        handle.worker.release.set()
        for thread in held:
            thread.join(30)
    with worker_proxy(handle.uri, config, timeout=10) as proxy:
        assert_close(unpack(proxy.correlate(task)["result"]), reference(image, bank))


def test_a_busy_worker_costs_no_task_attempt(nameserver, start_worker, cluster_config, rng):
    from worker_doubles import BusyWorker

    handle = start_worker(worker_class=type("Busy", (BusyWorker,), {"busy": 10}))
    image = rng.standard_normal((40, 30)).astype(np.float32)
    kernels = rng.standard_normal((4, 3, 3)).astype(np.float32)
    config = cluster_config.replace(max_task_attempts=3)
    with Coordinator(nameserver, local_threads=0, config=config, min_tasks=2) as coordinator:
        assert_close(coordinator.correlate(image, kernels), reference(image, kernels))
    assert handle.worker.refusals >= 10
