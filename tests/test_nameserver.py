"""The registry: addresses, registration by metadata, Pyro5's own nsc tool, and the `ns`/`worker` commands."""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from rmidl.errors import OptionError, RegistryError
from rmidl.kernels import available_cores
from rmidl.remote.naming import WORKER_PREFIX, list_workers
from rmidl.remote.transport import connect_ns, parse_address, worker_proxy


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, ("127.0.0.1", 9090)),
        ("", ("127.0.0.1", 9090)),
        ("node7", ("node7", 9090)),
        ("node7:1234", ("node7", 1234)),
        ("10.0.0.5:0", ("10.0.0.5", 0)),
        (" lab-host.example.org:65535 ", ("lab-host.example.org", 65535)),
        ("[::1]:9091", ("::1", 9091)),
        ("[fe80::1]", ("fe80::1", 9090)),
    ],
)
def test_parse_address_accepts(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("host:", "empty port"),
        ("host:port", "bad port 'port'"),
        ("host:70000", "bad port '70000'"),
        ("host:-1", "bad port"),
        (":9090", "malformed host ''"),
        ("a b:9090", "malformed host 'a b'"),
        ("::1:9090", "IPv6"),
        ("[::1", "malformed"),
        ("-host:1", "malformed host"),
    ],
)
def test_parse_address_names_what_is_wrong(text, match):
    with pytest.raises(OptionError, match=match) as info:
        parse_address(text)
    assert repr(text) in str(info.value)


def test_workers_register_with_metadata_and_unregister_on_close(nameserver, start_worker, cluster_config):
    first = start_worker(name="alpha")
    second = start_worker(name="beta")
    with connect_ns(nameserver, cluster_config) as ns:
        assert list_workers(ns) == {"alpha": first.uri, "beta": second.uri}
        uri, tags = ns.lookup(WORKER_PREFIX + "alpha", return_metadata=True)
        assert str(uri) == first.uri
        expected = {"rmidl", "role:worker", "host:127.0.0.1", f"cores:{available_cores()}", "version:0.1.0"}
        assert expected <= set(tags)
        # Other registrations (not rmidl workers) are not listed.
        ns.register("someone.else", first.uri, metadata=["role:worker"])
        assert set(list_workers(ns)) == {"alpha", "beta"}
        first.close()
        assert list_workers(ns) == {"beta": second.uri}


def test_a_live_workers_name_cannot_be_taken_but_a_stale_one_can(nameserver, start_worker, cluster_config):
    live = start_worker(name="gamma")
    with pytest.raises(OptionError, match=f"'gamma' is taken by a live worker at {live.uri}"):
        start_worker(name="gamma")
    with connect_ns(nameserver, cluster_config) as ns:
        ns.register(WORKER_PREFIX + "delta", "PYRO:rmidl.worker.delta@127.0.0.1:1", metadata=["rmidl"])
        fresh = start_worker(name="delta")
        assert list_workers(ns)["delta"] == fresh.uri
        assert list_workers(ns)["gamma"] == live.uri


def test_removing_a_dead_workers_entry_spares_a_newer_one_of_the_same_name(nameserver, start_worker,
                                                                          cluster_config):
    from rmidl.remote.naming import unregister_worker

    fresh = start_worker(name="epsilon")  # replaced a dead "epsilon" the coordinator is about to drop
    dead_uri = "PYRO:rmidl.worker.epsilon@127.0.0.1:1"
    with connect_ns(nameserver, cluster_config) as ns:
        assert unregister_worker(ns, "epsilon", dead_uri) is False
        assert list_workers(ns) == {"epsilon": fresh.uri}
        assert unregister_worker(ns, "epsilon", fresh.uri) is True
        assert list_workers(ns) == {}
        assert unregister_worker(ns, "epsilon", fresh.uri) is False  # gone already: nothing to do


def test_unreachable_name_server_is_a_registry_error_within_the_timeout(cluster_config):
    from rmidl.server.nameserver import start_ns

    _, daemon = start_ns("127.0.0.1", 0, config=cluster_config)
    address = daemon.locationStr
    daemon.close()  # the port is now closed
    started = time.monotonic()
    with pytest.raises(RegistryError, match=f"name server {address} is not reachable"):
        connect_ns(address, cluster_config.replace(connect_timeout=2.0))
    assert time.monotonic() - started < 3.0


def test_bad_worker_names_and_counts_are_refused(start_worker):
    with pytest.raises(OptionError, match="worker name 'a/b'"):
        start_worker(name="a/b", ns=None)
    with pytest.raises(OptionError, match="threads=0"):
        start_worker(threads=0, ns=None)


def test_a_port_in_use_is_an_option_error_naming_it(start_worker, capsys):
    from rmidl.client.cli import main as cli_main
    from rmidl.server.nameserver import start_ns

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OptionError, match=f"cannot bind name server to 127.0.0.1:{port}: Address"):
            start_ns("127.0.0.1", port)
        before = threading.active_count()
        with pytest.raises(OptionError, match=f"cannot bind worker w-taken to 127.0.0.1:{port}: Address"):
            start_worker(name="w-taken", port=port, ns=None)
        assert threading.active_count() == before  # the bulk channel started first is closed again
        assert cli_main(["ns", "--port", str(port)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"rmidl: error: cannot bind name server to 127.0.0.1:{port}: Address already in use"]


def test_a_failed_broadcast_responder_closes_the_name_server(monkeypatch, cluster_config):
    import Pyro5.nameserver

    from rmidl.server.nameserver import start_ns

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(Pyro5.nameserver, "BroadcastServer", refuse)
    _, port = _free_port()
    with pytest.raises(OSError, match="Address already in use"):
        start_ns("127.0.0.1", port, config=cluster_config, broadcast=True)
    with socket.socket() as again:  # the name server's socket was closed, not leaked
        again.bind(("127.0.0.1", port))


# --- subprocesses: Pyro5's nsc and our CLI ------------------------------------------------------------


def test_pyro5_nsc_lists_our_workers(nameserver, start_worker):
    worker = start_worker(name="listed")
    host, port = parse_address(nameserver)
    result = subprocess.run(
        [sys.executable, "-m", "Pyro5.nsc", "-n", host, "-p", str(port), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"{WORKER_PREFIX}listed --> {worker.uri}" in result.stdout
    assert "role:worker" in result.stdout


def test_cli_ns_and_worker_start_register_and_stop_cleanly(children, cluster_config):
    ns = children("rmidl.client.cli", "ns", "--port", "0")
    address = ns.read_until("ready")[0]
    host, port = parse_address(address)
    assert host == "127.0.0.1" and port > 0
    worker = children("rmidl.client.cli", "worker", "--ns", address, "--name", "cli-w", "--threads", "1")
    uri = worker.read_until("ready")[0]
    assert uri.startswith(f"PYRO:{WORKER_PREFIX}cli-w@127.0.0.1:")
    with connect_ns(address, cluster_config) as registry:
        assert list_workers(registry) == {"cli-w": uri}
        with worker_proxy(uri, cluster_config, timeout=10) as proxy:
            assert proxy.ping() == "pong"
        code, stderr = worker.stop(signal.SIGTERM)
        assert code == 0, stderr
        assert list_workers(registry) == {}
    code, stderr = ns.stop(signal.SIGINT)
    assert code == 0, stderr


def test_a_child_with_a_chatty_stderr_still_gets_to_ready(children):
    # `python -v` writes ~140 kB of import lines to stderr before "ready": more than a pipe holds, so a
    # Child that did not drain stderr while waiting would leave the ns blocked in a write.
    ns = children("rmidl.client.cli", "ns", "--port", "0", env={"PYTHONVERBOSE": "1"})
    ns.read_until("ready", timeout=60)
    code, stderr = ns.stop(signal.SIGINT)
    assert code == 0, stderr[-2000:]
    assert "import 'rmidl.server.nameserver'" in stderr


def test_cli_worker_without_name_server_fails_with_one_line(children):
    _, port = _free_port()
    worker = children("rmidl.client.cli", "worker", "--ns", f"127.0.0.1:{port}")
    code, stderr = worker.wait_exit()
    assert code == 3
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"rmidl: error: name server 127.0.0.1:{port} is not reachable")


def _free_port() -> tuple[str, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()
