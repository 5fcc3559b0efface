"""Prometheus metrics: nothing recorded without a port, endpoints on loopback, and series that move as a
real job runs on in-process daemons (scraped over HTTP during and after the job)."""

from __future__ import annotations

import logging
import ssl
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from worker_doubles import GatedWorker, failing

from rmidl import metrics
from rmidl.client import Coordinator
from rmidl.config import Config
from rmidl.errors import OptionError
from rmidl.server.nameserver import start_ns


def value(samples, name: str, **labels: str) -> float:
    """The sample `name` with exactly these labels (0 if absent: a counter not yet incremented)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples, name: str, **labels: str) -> float:
    """The sum of every sample `name` whose labels include these."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


def test_nothing_is_recorded_until_a_port_opens_and_after_the_last_closes() -> None:
    assert metrics.recorder() is metrics.NULL
    metrics.images_done(5)  # dropped, at no cost
    with metrics.serve_metrics(0) as first, metrics.serve_metrics(0) as second:
        assert first.port != second.port and first.host == "127.0.0.1"
        assert isinstance(metrics.recorder(), metrics.Metrics)
        first.close()
        assert metrics.recorder().enabled  # the other one still serves
    assert metrics.recorder() is metrics.NULL
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(second.url, timeout=5)


def test_job_counters_images_and_training_steps_are_served(scrape) -> None:
    with metrics.serve_metrics(0) as server:
        before = scrape(server.url)
        metrics.images_done(32)
        metrics.images_done(8, kind="features")
        metrics.training_step(0.2, loss=1.5)
        metrics.training_step(0.4, loss=1.25)
        after = scrape(server.url)
    assert value(after, "rmidl_images_total", kind="features") - value(
        before, "rmidl_images_total", kind="features") == 40
    steps = value(after, "rmidl_training_step_seconds_count", kind="gradient") - value(
        before, "rmidl_training_step_seconds_count", kind="gradient")
    assert steps == 2
    assert value(after, "rmidl_training_loss", kind="gradient") == 1.25
    assert value(after, "process_resident_memory_bytes") > 0  # the standard process series come along


def test_bad_ports_and_busy_ports_are_one_line_option_errors() -> None:
    for port in (-1, 65536, True, "9100"):
        with pytest.raises(OptionError, match="metrics port"):
            metrics.serve_metrics(port)  # type: ignore[arg-type]
    with metrics.serve_metrics(0) as taken, pytest.raises(OptionError, match=f"127.0.0.1:{taken.port}"):
        metrics.serve_metrics(taken.port)
    assert metrics.recorder() is metrics.NULL  # the refused one did not start recording


def test_past_loopback_metrics_use_2way_tls_or_warn(tls_config, monkeypatch, caplog) -> None:
    # The decision is the host's; 127.0.0.1 stands in for a routable address (tests never open one).
    from rmidl.remote import security

    monkeypatch.setattr(security, "is_loopback", lambda host: False)
    with caplog.at_level(logging.WARNING, logger="rmidl.metrics"), metrics.serve_metrics(0) as open_one:
        assert "without TLS" in caplog.text and open_one.url.startswith("http://")
    with metrics.serve_metrics(0, config=tls_config) as server:
        assert server.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=tls_config.tls_ca)
        trusted.load_cert_chain(tls_config.tls_cert, tls_config.tls_key)
        with urllib.request.urlopen(server.url, context=trusted, timeout=10) as reply:
            assert b"rmidl_jobs_running" in reply.read()
        stranger = ssl.create_default_context(cafile=tls_config.tls_ca)  # no client certificate
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            urllib.request.urlopen(server.url, context=stranger, timeout=10).read()


@pytest.fixture
def metered_ns(cluster_config):
    """A name server with a metrics port; yields (address, daemon)."""
    from rmidl.server.nameserver import address_of

    _, daemon = start_ns("127.0.0.1", 0, config=cluster_config, metrics_port=0)
    thread = daemon.serve_in_thread()
    try:
        yield address_of(daemon), daemon
    finally:
        daemon.shutdown()
        thread.join(5.0)


def test_a_job_moves_the_series_as_it_runs(metered_ns, start_worker, cluster_config, rng, scrape) -> None:
    ns, daemon = metered_ns
    config = cluster_config.replace(task_deadline_floor=120.0)  # the held task must not be quarantined
    # w1 alone when the job starts, so it takes the first tasks, which it holds until the test looked;
    # w2 joins mid-job. Every daemon has a metrics port (in-process: one registry, several URLs).
    workers = [start_worker(name="w1", ns=ns, metrics_port=0, worker_class=GatedWorker, config=config)]
    image = rng.standard_normal((160, 120)).astype(np.float32)
    bank = rng.standard_normal((8, 5, 5)).astype(np.float32)
    with Coordinator(ns, config=config, local_threads=0, min_tasks=12, metrics_port=0) as co:
        url = co.metrics_url
        before = scrape(url)
        job = threading.Thread(target=co.correlate, args=(image, bank), daemon=True)
        job.start()
        try:
            assert workers[0].worker.waiting.wait(30), "w1 never got a task"
            workers.append(start_worker(name="w2", ns=ns, metrics_port=0, config=config))
            mid_job = scrape(url)  # over HTTP while the job runs: its first task is still held
        finally:
            workers[0].worker.gate.set()
            job.join(60)
        after = scrape(url)
        tasks_by = co.stats()
        tasks = co.last_job()["tasks"]
    assert value(mid_job, "rmidl_jobs_running", kind="correlate") == 1
    assert value(mid_job, "rmidl_tasks_in_flight", kind="correlate", worker="w1") >= 1
    assert total(mid_job, "rmidl_tasks_done_total", kind="correlate") - total(
        before, "rmidl_tasks_done_total", kind="correlate") < tasks
    assert sum(tasks_by.values()) == tasks
    assert value(after, "rmidl_jobs_running", kind="correlate") == 0
    assert value(after, "rmidl_queue_depth", kind="correlate") == 0
    assert total(after, "rmidl_tasks_in_flight") == 0
    assert value(after, "rmidl_jobs_total", kind="correlate", outcome="done") - value(
        before, "rmidl_jobs_total", kind="correlate", outcome="done") == 1
    for runner, count in tasks_by.items():
        assert value(after, "rmidl_tasks_done_total", kind="correlate", worker=runner) - value(
            before, "rmidl_tasks_done_total", kind="correlate", worker=runner) == count
    remote = {name: n for name, n in tasks_by.items() if name != "local"}
    assert remote, tasks_by
    for name, count in remote.items():
        moved = value(after, "rmidl_bytes_moved_total", kind="correlate", worker=name, path="shm") - value(
            before, "rmidl_bytes_moved_total", kind="correlate", worker=name, path="shm")
        assert moved > 0  # same host: results came back through shared memory
        # the worker's own series, from its endpoint (one registry in this process, so any URL has them)
        served = scrape(workers[0].metrics.url)
        assert value(served, "rmidl_worker_tasks_total", worker=name, method="correlate",
                     outcome="done") - value(before, "rmidl_worker_tasks_total", worker=name,
                                             method="correlate", outcome="done") == count
        busy = value(served, "rmidl_worker_busy_seconds_total", worker=name) - value(
            before, "rmidl_worker_busy_seconds_total", worker=name)
        assert 0 < busy <= value(served, "rmidl_worker_task_seconds_total", worker=name, method="correlate")
        assert value(served, "rmidl_worker_threads", worker=name) == 1
        assert value(served, "rmidl_worker_blobs", worker=name) >= 1
    assert value(after, "rmidl_coordinator_workers", state="ok") >= 1
    ns_samples = scrape(daemon.metrics.url)
    assert value(ns_samples, "rmidl_ns_registrations", role="worker") == 2
    assert value(ns_samples, "rmidl_ns_registrations", role="coordinator") >= 1  # its job feed


def test_failed_attempts_are_counted_and_requeued_on_others(nameserver, start_worker, cluster_config, rng,
                                                              scrape) -> None:
    broken = start_worker(name="broken", worker_class=failing(RuntimeError("engine fell over")))
    good = start_worker(name="good", worker_class=GatedWorker)
    # The good worker's tasks wait until the broken one has failed one: it must take some.
    opener = threading.Thread(target=lambda: broken.worker.called.wait(30) and good.worker.gate.set())
    image = rng.standard_normal((96, 64)).astype(np.float32)
    bank = rng.standard_normal((4, 3, 3)).astype(np.float32)
    with Coordinator(nameserver, config=cluster_config, local_threads=0, min_tasks=6, metrics_port=0) as co:
        before = scrape(co.metrics_url)
        opener.start()
        co.correlate(image, bank)
        opener.join(30)
        after = scrape(co.metrics_url)
        job = co.last_job()
    failed = value(after, "rmidl_tasks_failed_total", kind="correlate", worker="broken") - value(
        before, "rmidl_tasks_failed_total", kind="correlate", worker="broken")
    requeued = value(after, "rmidl_tasks_requeued_total", kind="correlate", worker="broken") - value(
        before, "rmidl_tasks_requeued_total", kind="correlate", worker="broken")
    assert failed == requeued == job["requeued"] >= 1
    assert value(after, "rmidl_tasks_done_total", kind="correlate", worker="broken") == 0
    assert value(after, "rmidl_tasks_done_total", kind="correlate", worker="good") - value(
        before, "rmidl_tasks_done_total", kind="correlate", worker="good") == job["tasks"]


def test_worker_and_ns_commands_print_their_metrics_url(children, scrape) -> None:
    ns = children("rmidl", "ns", "--port", "0", "--metrics-port", "0")
    ns_lines = ns.read_until("ready")
    ns_metrics = next(line.split()[1] for line in ns_lines if line.startswith("metrics "))
    address = ns_lines[-2]
    worker = children("rmidl", "worker", "--ns", address, "--name", "solo", "--threads", "1",
                      "--metrics-port", "0")
    worker_lines = worker.read_until("ready")
    worker_metrics = next(line.split()[1] for line in worker_lines if line.startswith("metrics "))
    assert worker_metrics.startswith("http://127.0.0.1:") and worker_metrics.endswith("/metrics")
    assert value(scrape(worker_metrics), "rmidl_worker_threads", worker="solo") == 1
    assert value(scrape(ns_metrics), "rmidl_ns_registrations", role="worker") == 1
    assert worker.stop()[0] == 0 and ns.stop()[0] == 0


def test_metrics_stay_on_loopback_whatever_host_the_daemons_bind(cluster_config: Config) -> None:
    """The metrics host is its own option: a daemon bound past loopback still serves metrics on loopback."""
    with metrics.serve_metrics(0, config=cluster_config.replace(host="0.0.0.0")) as server:
        assert server.host == "127.0.0.1"


def test_features_and_training_jobs_count_images_steps_and_worker_calls(nameserver, start_worker,
                                                                         cluster_config, tmp_path,
                                                                         scrape) -> None:
    from conftest import gaussian_blobs, write_image_folder

    import rmidl

    start_worker(name="w1", ns=nameserver, config=cluster_config)
    folder = write_image_folder(tmp_path / "images", per_class=6)
    net = rmidl.Network.from_spec("3x3x3:relu:max2", seed=0)
    x, y = gaussian_blobs(240, 6, 3)
    with metrics.serve_metrics(0) as server, Coordinator(nameserver, config=cluster_config,
                                                          local_threads=1) as co:
        before = scrape(server.url)
        features = co.features(folder, net, batch=3, progress=False)
        _model, history = rmidl.train(x, y, epochs=2, batch=60, validation=0.25, coordinator=co)
        after = scrape(server.url)
    assert features.X.shape[0] == 12
    assert value(after, "rmidl_images_total", kind="features") - value(
        before, "rmidl_images_total", kind="features") == 12
    steps = value(after, "rmidl_training_step_seconds_count", kind="gradient") - value(
        before, "rmidl_training_step_seconds_count", kind="gradient")
    assert steps == len(history.steps) > 0
    assert value(after, "rmidl_training_loss", kind="gradient") > 0
    methods = {dict(labels)["method"] for (name, labels), count in after.items()
               if name == "rmidl_worker_tasks_total" and dict(labels).get("worker") == "w1" and count > 0
               and count > value(before, name, **dict(labels))}
    assert methods and methods <= {"features", "gradient"}  # metered under their own names
