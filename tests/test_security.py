"""Locked-down daemons: the cluster secret, 2-way TLS, message-size caps and the bind rule."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
from pathlib import Path

import numpy as np
import Pyro5.api
import Pyro5.core
import pytest
from pki import make_pki
from Pyro5.errors import CommunicationError
from reference import assert_close, reference

from rmidl.client import Coordinator
from rmidl.client.cli import main as cli_main
from rmidl.config import Config
from rmidl.errors import AuthenticationError, OptionError
from rmidl.remote.blobs import Blob
from rmidl.remote.bulk import fetch
from rmidl.remote.naming import list_workers
from rmidl.remote.security import read_secret, secured_config
from rmidl.remote.transport import client_ssl_context, configure_pyro, connect_ns, worker_proxy
from rmidl.remote.wire import pack, unpack
from rmidl.server.nameserver import start_ns

SECRET = "correct horse battery staple"


def bank_blob(bank: np.ndarray) -> dict:
    return Blob.bank(bank).to_wire()


def _small_task(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    image = rng.standard_normal((12, 10, 1)).astype(np.float32)
    bank = rng.standard_normal((2, 3, 3, 1)).astype(np.float32)
    task = {"task_id": 0, "bank_id": "b", "kernels": [0, 2], "rows": [0, 10], "input": {"array": pack(image)},
            "output": "inline"}
    return image, bank, task


# --- cluster secret ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("offered", "error", "match"), [
    ("", CommunicationError, r"rejected: .*cluster secret missing or wrong"),
    ("wrong secret, same length!!", AuthenticationError, "does not know our cluster secret"),
])
def test_client_without_the_secret_is_refused_in_the_handshake(start_worker, rng, offered, error, match):
    secured = Config(environ={}, secret=SECRET)
    handle = start_worker(config=secured, ns=None)
    with worker_proxy(handle.uri, Config(environ={}, secret=offered), timeout=5) as intruder:
        with pytest.raises(error, match=match):
            intruder._pyroBind()
        with pytest.raises(error, match=match):
            intruder.put_blob("b", bank_blob(np.ones((1, 2, 2, 1), np.float32)))
    # The worker keeps serving clients that know the secret, and never ran the intruder's call.
    image, bank, task = _small_task(rng)
    with worker_proxy(handle.uri, secured, timeout=30) as member:
        assert member.info()["banks"] == []
        member.put_blob("b", bank_blob(bank))
        result = unpack(member.correlate(task)["result"])
    expected = reference(image, bank)
    assert_close(result, expected)


def test_a_fake_worker_that_does_not_know_the_secret_gets_no_work(nameserver, start_worker, children, rng):
    # Anyone who can reach a name server without a secret can register a "worker" of their own.
    secured = Config(environ={}, secret=SECRET)
    start_worker(name="member", config=secured)
    fake = children("worker_doubles", "--ns", nameserver, "--name", "0-fake", "--fake",
                    env={"PYTHONPATH": str(Path(__file__).parent)})
    fake_uri = fake.read_until("ready")[0]
    image = rng.standard_normal((40, 30)).astype(np.float32)
    kernels = rng.standard_normal((4, 3, 3)).astype(np.float32)
    with Coordinator(nameserver, local_threads=0, shared_memory=False, config=secured,
                     min_tasks=8) as coordinator:
        for _ in range(3):
            assert_close(coordinator.correlate(image, kernels), reference(image, kernels))
            assert set(coordinator.stats()) == {"member"}
        states = {w["name"]: w["state"] for w in coordinator.workers()}
    assert states == {"member": "ok", "0-fake": "untrusted"}
    with worker_proxy(fake_uri, Config(environ={}), timeout=10) as stranger:
        seen = stranger.seen()
    assert seen["correlate_calls"] == 0
    assert seen["handshakes"] and not any(SECRET in handshake for handshake in seen["handshakes"])
    # Without a secret nobody can tell the fake from a worker: that is what the secret is for.
    with Coordinator(nameserver, local_threads=0, shared_memory=False, config=Config(environ={}),
                     min_tasks=8, workers=["0-fake"]) as open_coordinator:
        assert not open_coordinator.correlate(image, kernels).any()


def test_a_connection_is_served_only_once_the_client_proved_it_knows_the_secret(start_worker):
    from Pyro5.errors import ConnectionClosedError

    from rmidl.remote import auth

    secured = Config(environ={}, secret=SECRET)
    handle = start_worker(config=secured, ns=None)
    configure_pyro(secured)
    # A client that takes the daemon's answer but skips proving itself: nothing but authenticate is served.
    with Pyro5.api.Proxy(handle.uri) as skipper:
        skipper._pyroSerializer = "msgpack"
        skipper._pyroHandshake = auth.challenge(auth.new_nonce())
        skipper._pyroBind()
        with pytest.raises(ConnectionClosedError):
            skipper.ping()
    # A proof is good for the one connection whose challenge it answers.
    with worker_proxy(handle.uri, secured, timeout=10) as member:
        member._pyroBind()
        old_nonce = member._rmidl_nonce
    with Pyro5.api.Proxy(f"PYRO:{Pyro5.core.DAEMON_NAME}@{handle.uri.rsplit('@', 1)[1]}") as replayer:
        replayer._pyroSerializer = "msgpack"
        replayer._pyroHandshake = auth.challenge(old_nonce)
        replayer._pyroBind()
        with pytest.raises(AuthenticationError, match="cluster secret missing or wrong"):
            replayer.authenticate(auth.proof(SECRET, "client", old_nonce, auth.new_nonce()))
    with worker_proxy(handle.uri, secured, timeout=10) as member:
        assert member.ping() == "pong"


def test_name_server_with_a_secret_refuses_strangers_and_admits_workers(start_worker):
    secured = Config(environ={}, secret=SECRET)
    _, daemon = start_ns("127.0.0.1", 0, config=secured)
    thread = daemon.serve_in_thread()
    try:
        address = daemon.locationStr
        handle = start_worker(config=secured, ns=address, name="member")
        with pytest.raises(AuthenticationError, match=f"name server {address} refused"):
            connect_ns(address, Config(environ={}))
        with connect_ns(address, secured) as registry:
            assert list_workers(registry) == {"member": handle.uri}
        handle.close()
    finally:
        daemon.shutdown()
        thread.join(5)


def test_secret_files_are_read_and_checked(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    assert read_secret(path) == SECRET
    assert secured_config(Config(environ={}), secret_file=str(path)).secret == SECRET
    path.write_text("short")
    with pytest.raises(OptionError, match="shorter than 8"):
        read_secret(path)
    with pytest.raises(OptionError, match=r"secret file .*missing. does not exist"):
        read_secret(tmp_path / "missing")
    with pytest.raises(OptionError, match=r"tls-ca file .*nope\.pem.* does not exist"):
        secured_config(Config(environ={}), tls_ca=str(tmp_path / "nope.pem"))


# --- bind rule ----------------------------------------------------------------------------------------


def test_non_loopback_bind_needs_a_secret_or_tls_or_insecure(start_worker, caplog):
    with pytest.raises(OptionError, match=r"refusing to bind worker .* to 0\.0\.0\.0: .*--insecure"):
        start_worker(host="0.0.0.0", ns=None)
    with pytest.raises(OptionError, match=r"refusing to bind name server to 0\.0\.0\.0"):
        start_ns("0.0.0.0", 0, config=Config(environ={}))
    with caplog.at_level(logging.WARNING, logger="rmidl.remote.security"):
        open_worker = start_worker(host="0.0.0.0", ns=None, insecure=True)
    assert "INSECURE" in caplog.text and "ANYONE" in caplog.text
    # The URI names a reachable address, never the wildcard.
    assert "@0.0.0.0:" not in open_worker.uri
    secured = start_worker(host="0.0.0.0", ns=None, config=Config(environ={}, secret=SECRET))
    with worker_proxy(secured.uri, Config(environ={}, secret=SECRET), timeout=10) as proxy:
        assert proxy.ping() == "pong"


def test_cli_refuses_an_open_bind_with_one_line(capsys):
    assert cli_main(["worker", "--host", "0.0.0.0", "--ns", "127.0.0.1:1"]) == 2
    assert cli_main(["ns", "--host", "0.0.0.0", "--port", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("rmidl: error: refusing to bind") for line in lines)


# --- message-size cap -------------------------------------------------------------------------------


def test_oversized_message_is_refused_and_the_worker_keeps_serving(nameserver, children, cluster_config, rng):
    limit = 1 << 20
    worker = children(
        "rmidl.client.cli", "worker", "--ns", nameserver, "--name", "capped", "--threads", "1",
        env={"RMIDL_MAX_MESSAGE_SIZE": str(limit)},
    )
    uri = worker.read_until("ready")[0]
    too_big = np.ones((1, 512, 512, 1), np.float32)  # 1 MiB of data plus framing: over the cap
    with worker_proxy(uri, cluster_config, timeout=30) as proxy:
        assert proxy.info()["max_message_size"] == limit
        with pytest.raises(CommunicationError):
            proxy.put_blob("big", bank_blob(too_big))
    assert worker.process.poll() is None
    image, bank, task = _small_task(rng)
    with worker_proxy(uri, cluster_config, timeout=30) as proxy:
        proxy.put_blob("b", bank_blob(bank))
        assert proxy.info()["banks"] == ["b"]
        expected = reference(image, bank)
        result = unpack(proxy.correlate(task)["result"])
        assert_close(result, expected)
    code, stderr = worker.stop()
    assert code == 0, stderr


def _pyro_header(msgtype: int, data_size: int, serializer: int = 4) -> bytes:
    """A Pyro5 wire header (protocol 502) announcing `data_size` payload bytes (serializer 4: msgpack)."""
    return struct.pack(
        "!4sHBBHHII16sHH", b"PYRO", 502, msgtype, serializer, 0, 0, data_size, 0, bytes(16), 0, 0x4DC5
    )


@pytest.mark.parametrize("secret", ["", SECRET])
def test_an_oversized_handshake_is_refused_before_its_payload_is_read(start_worker, cluster_config, secret):
    config = cluster_config.replace(secret=secret or None)
    handle = start_worker(config=config, ns=None)
    port = int(handle.uri.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(_pyro_header(msgtype=1, data_size=200 << 20))  # claims a 200 MB CONNECT, sends none
        reply = raw.makefile("rb").read()  # the worker answers at once and hangs up
    assert reply[:4] == b"PYRO" and reply[6] == 3  # MSG_CONNECTFAIL
    assert b"exceeds the limit of 65536" in reply
    with worker_proxy(handle.uri, config, timeout=10) as proxy:
        assert proxy.ping() == "pong"


@pytest.mark.parametrize("secret", ["", SECRET])
def test_a_handshake_in_marshal_is_refused_unread(start_worker, cluster_config, secret):
    import marshal

    config = cluster_config.replace(secret=secret or None)
    handle = start_worker(config=config, ns=None)
    port = int(handle.uri.rsplit(":", 1)[1])
    payload = marshal.dumps({"handshake": secret or "hello", "object": handle.object_name})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(_pyro_header(msgtype=1, data_size=len(payload), serializer=2) + payload)
        reply = raw.makefile("rb").read()
    assert reply[:4] == b"PYRO" and reply[6] == 3  # MSG_CONNECTFAIL
    assert b"handshake in marshal refused" in reply
    with worker_proxy(handle.uri, config, timeout=10) as proxy:
        assert proxy.ping() == "pong"


# --- 2-way TLS ------------------------------------------------------------------------------------


def test_tls_round_trip_and_bulk_channel(start_worker, tls_config, rng):
    handle = start_worker(config=tls_config, ns=None)
    image, bank, task = _small_task(rng)
    expected = reference(image, bank)
    with worker_proxy(handle.uri, tls_config, timeout=30) as proxy:
        proxy.put_blob("b", bank_blob(bank))
        result = unpack(proxy.correlate(task)["result"])
        assert_close(result, expected)
        reply = proxy.correlate(task | {"output": "bulk"})
        out = np.zeros(expected.shape, np.float32)
        port = proxy.info()["bulk_port"]
    fetch("127.0.0.1", port, reply["ticket"], out, timeout=10, ssl_context=client_ssl_context(tls_config))
    assert_close(out, expected)


def test_tls_refuses_clients_without_a_trusted_certificate(start_worker, tls_config, tmp_path):
    handle = start_worker(config=tls_config, ns=None)
    port = int(handle.uri.rsplit(":", 1)[1])
    stranger = make_pki(tmp_path, "stranger")
    attempts = {
        "no certificate": ssl.create_default_context(cafile=tls_config.tls_ca),
        "certificate from another CA": ssl.create_default_context(cafile=tls_config.tls_ca),
    }
    attempts["certificate from another CA"].load_cert_chain(stranger["tls_cert"], stranger["tls_key"])
    for what, context in attempts.items():
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            pytest.raises((ssl.SSLError, ConnectionError)),
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            # TLS 1.3 reports the server's refusal of our certificate on the first read.
            tls.sendall(b"PYRO")
            if not tls.recv(1):
                raise ConnectionError(f"{what}: closed by the worker")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        plain.sendall(b"PYRO" + bytes(40))  # a plaintext Pyro5 client gets nowhere either
        with pytest.raises((ConnectionError, OSError)):
            if not plain.recv(1024):
                raise ConnectionError("closed")
    with worker_proxy(handle.uri, tls_config, timeout=10) as proxy:
        assert proxy.ping() == "pong"


def test_a_silent_tcp_peer_does_not_lock_clients_out_of_a_tls_worker(start_worker, tls_config):
    handle = start_worker(config=tls_config, ns=None)
    port = int(handle.uri.rsplit(":", 1)[1])
    # Pyro5's TLS accept() would wait for this peer's TLS handshake, blocking every later connection.
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10),
        worker_proxy(handle.uri, tls_config, timeout=5) as proxy,
    ):
        assert proxy.ping() == "pong"


def test_tls_name_server_registers_and_lists_workers(start_worker, tls_config):
    _, daemon = start_ns("127.0.0.1", 0, config=tls_config)
    thread = daemon.serve_in_thread()
    try:
        handle = start_worker(config=tls_config, ns=daemon.locationStr, name="tls-member")
        with connect_ns(daemon.locationStr, tls_config) as registry:
            assert list_workers(registry) == {"tls-member": handle.uri}
        handle.close()
    finally:
        daemon.shutdown()
        thread.join(5)


def test_coordinator_over_tls_fetches_bulk_results_with_its_certificate(start_worker, tls_config, rng):
    from rmidl.client import Coordinator

    _, daemon = start_ns("127.0.0.1", 0, config=tls_config)
    thread = daemon.serve_in_thread()
    try:
        handle = start_worker(config=tls_config, ns=daemon.locationStr, name="tls-bulk")
        image = rng.standard_normal((40, 50, 2)).astype(np.float32)
        bank = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
        # No shared memory: every result crosses the worker's TLS-wrapped bulk channel.
        with Coordinator(daemon.locationStr, local_threads=0, shared_memory=False, config=tls_config,
                         min_tasks=4) as coordinator:
            result = coordinator.correlate(image, bank)
            job = coordinator.last_job()
        assert_close(result, reference(image, bank))
        assert job["tasks_by"] == {"tls-bulk": job["tasks"]} and job["tasks"] >= 4
        assert job["moved_bytes"] == result.nbytes  # over the bulk channel, not inline
        handle.close()
    finally:
        daemon.shutdown()
        thread.join(5)
