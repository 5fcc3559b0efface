"""Faults in a job: killed, hanging and joining workers, failing tasks, no registry; results stay exact."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from reference import assert_close, batch_reference, reference
from worker_doubles import failing

import rmidl
from rmidl.client import Coordinator
from rmidl.client.localcluster import LocalCluster
from rmidl.config import Config
from rmidl.errors import RegistryError, ShapeError, TaskFailed, WorkerLost

SCHEDULER_LOG = "rmidl.client.discovery"  # where worker health is judged and logged


@pytest.fixture
def job(rng):
    image = rng.standard_normal((160, 200)).astype(np.float32)
    kernels = rng.standard_normal((12, 5, 5)).astype(np.float32)
    return image, kernels, reference(image, kernels)


def fault_config(**overrides) -> Config:
    return Config(environ={}, **overrides)


def on_progress(at: int, action):
    """A progress callback that runs `action` once, when `at` tasks are done."""
    fired = threading.Event()

    def progress(done: int, total: int) -> None:
        if done >= at and not fired.is_set():
            fired.set()
            action()

    progress.fired = fired  # type: ignore[attr-defined]
    return progress


def kill_mid_job(cluster: LocalCluster, victim: str, at: int):
    """A progress callback that SIGKILLs `victim` once `at` units are done, then holds every other
    worker's runner at its next progress report until the scheduler has logged the victim lost.

    Without the hold the survivors may drain the queue while the victim's runner is still reaping the
    kill (the callback runs on whichever runner finished a task), and the loss goes unnoticed: the
    result is still exact, but the test would not have shown a loss mid-job.
    """
    noticed = threading.Event()

    class Notice(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if f"{victim} lost" in record.getMessage():
                noticed.set()

    handler = Notice(logging.WARNING)
    logging.getLogger(SCHEDULER_LOG).addHandler(handler)
    victims_runner = f"rmidl-{victim}-"

    def hold() -> None:
        if not threading.current_thread().name.startswith(victims_runner):
            assert noticed.wait(30), f"{victim} was killed but never reported lost"

    progress = on_progress(at, lambda: cluster.kill(victim))

    def report(done: int, total: int) -> None:
        progress(done, total)
        if progress.fired.is_set():
            hold()

    report.fired = progress.fired  # type: ignore[attr-defined]
    report.noticed = noticed  # type: ignore[attr-defined]
    report.close = lambda: logging.getLogger(SCHEDULER_LOG).removeHandler(handler)  # type: ignore[attr-defined]
    return report


def registered(address: str) -> set[str]:
    from rmidl.remote.naming import list_workers
    from rmidl.remote.transport import connect_ns

    with connect_ns(address, fault_config()) as ns:
        return set(list_workers(ns))


def test_killed_worker_tasks_run_elsewhere(job, caplog):
    image, kernels, ref = job
    with LocalCluster(workers=3) as cluster, Coordinator(
        cluster.ns_address, local_threads=0, config=fault_config(), min_tasks=120
    ) as coordinator:
        progress = kill_mid_job(cluster, "w2", at=10)
        with caplog.at_level(logging.WARNING, logger=SCHEDULER_LOG):
            try:
                result = coordinator.correlate(image, kernels, progress=progress)
            finally:
                progress.close()
        assert progress.fired.is_set()
        assert_close(result, ref)
        lost = [r for r in caplog.records if r.name == SCHEDULER_LOG and "w2 lost" in r.getMessage()]
        assert len(lost) == 1
        assert "w2" not in registered(cluster.ns_address)
        assert {w["name"]: w["state"] for w in coordinator.workers()}["w2"] == "dead"
        # The next job runs on the survivors.
        assert_close(coordinator.correlate(image, kernels), ref)
        assert set(coordinator.stats()) <= {"w1", "w3"}


def test_a_worker_killed_mid_batch_loses_no_work(rng):
    images = rng.standard_normal((30, 40, 36, 4)).astype(np.float32)
    bank = rng.standard_normal((8, 5, 6, 4)).astype(np.float32)
    in_process = rmidl.correlate(images, bank, batch=True, engine="direct")
    config = fault_config()
    killed = threading.Event()
    with LocalCluster(workers=3) as cluster, Coordinator(
        cluster.ns_address, local_threads=0, shared_memory=False, config=config, min_tasks=60
    ) as coordinator:
        victim = coordinator._scheduler.workers["w2"]

        def kill_while_w2_works(done: int, total: int) -> None:
            # Killed while it holds a task (its busy count says so), not between two.
            if done >= 6 and not killed.is_set() and victim.remote(lambda proxy: proxy.info())["busy"] > 0:
                killed.set()
                cluster.kill("w2")

        result = coordinator.correlate(images, bank, batch=True, engine="direct",
                                       progress=kill_while_w2_works)
        assert killed.is_set()
        assert coordinator.last_job()["requeued"] >= 1 and coordinator.last_job()["images"] == 1
        assert np.array_equal(result, in_process)
        assert_close(result, batch_reference(images, bank, "valid"))
        assert {w["name"]: w["state"] for w in coordinator.workers()}["w2"] == "dead"


def test_hanging_worker_is_quarantined_and_its_task_requeued(job, caplog, children):
    image, kernels, ref = job
    with LocalCluster(workers=1) as cluster:
        # A real worker process whose first task hangs (tests/worker_doubles.py).
        hanging = children("worker_doubles", "--ns", cluster.ns_address, "--name", "hang", "--hang", "1",
                           env={"PYTHONPATH": str(Path(__file__).parent)})
        hanging.read_until("ready")
        config = fault_config(task_deadline_floor=3.0)  # a healthy worker on a loaded machine stays within it
        with Coordinator(cluster.ns_address, local_threads=0, config=config, min_tasks=12) as coordinator:
            with caplog.at_level(logging.WARNING, logger=SCHEDULER_LOG):
                result = coordinator.correlate(image, kernels)
            assert_close(result, ref)
            assert coordinator.last_job()["requeued"] >= 1
            # Quarantined once, "hang" alone (after a back-off it is tried again: no state to assert here).
            assert coordinator._scheduler.discovery.quarantines == 1
            assert any("hang did not finish" in r.getMessage() for r in caplog.records)
            assert coordinator._scheduler.workers["w1"].state == "ok"


def test_task_failing_on_every_worker_fails_the_job(nameserver, start_worker, job):
    image, kernels, _ = job
    handles = [start_worker(worker_class=failing(RuntimeError("engine fell over"))) for _ in range(3)]
    config = fault_config(max_task_attempts=3)
    with Coordinator(nameserver, local_threads=0, config=config) as coordinator:
        expected = r"task \d+ \(rows \d+:\d+, kernels \d+:\d+\) failed on 3 worker"
        with pytest.raises(TaskFailed, match=expected) as info:
            coordinator.correlate(image, kernels)
        assert all(f"w{i}" in str(info.value) for i in range(3))
    # The workers are still serving.
    assert all(h.worker.ping() == "pong" for h in handles)


def test_bad_input_from_the_worker_is_not_retried(nameserver, start_worker, rng):
    # Small enough to be one task, so "not retried" means exactly one call.
    image = rng.standard_normal((20, 20)).astype(np.float32)
    kernels = rng.standard_normal((2, 3, 3)).astype(np.float32)
    handles = [start_worker(worker_class=failing(ShapeError("band 3x4 is too small"))) for _ in range(2)]
    with Coordinator(nameserver, local_threads=0, config=fault_config()) as coordinator:
        with pytest.raises(ShapeError, match="band 3x4"):
            coordinator.correlate(image, kernels)
        assert coordinator.last_job()["tasks"] == 1
    assert sum(handle.worker.calls for handle in handles) == 1


def test_worker_joining_mid_job_takes_tasks(nameserver, start_worker, job):
    image, kernels, ref = job
    start_worker(name="early")
    joined: list = []
    release = threading.Event()

    def progress(done: int, total: int) -> None:
        # The early worker's threads park here, so the rest of the job is left to whoever joins.
        release.wait(30)

    results: list = []
    with Coordinator(nameserver, local_threads=0, config=fault_config(), min_tasks=20) as coordinator:

        def correlate() -> None:
            try:
                results.append(coordinator.correlate(image, kernels, progress=progress))
            except Exception as error:  # reported by the assertion below, not as a thread warning
                results.append(error)

        runner = threading.Thread(target=correlate)
        runner.start()
        joined.append(start_worker(name="late"))
        deadline = time.monotonic() + 30
        while joined[0].worker.info()["tasks_done"] == 0 and time.monotonic() < deadline:
            runner.join(0.05)
        release.set()
        runner.join(60)
        assert not runner.is_alive()
        assert isinstance(results[0], np.ndarray), results[0]
        assert_close(results[0], ref)
        assert coordinator.stats().get("late", 0) > 0


def test_registry_down_is_a_clear_error_within_seconds():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(RegistryError, match=f"127.0.0.1:{port}"):
        Coordinator(f"127.0.0.1:{port}", config=fault_config(connect_timeout=2.0))
    assert time.monotonic() - start < 5


def test_all_workers_gone_local_pool_finishes(job):
    image, kernels, ref = job
    with LocalCluster(workers=2) as cluster, Coordinator(
        cluster.ns_address, local_threads=1, config=fault_config(), min_tasks=60
    ) as coordinator:
        kill = on_progress(3, lambda: [cluster.kill(name) for name in ("w1", "w2")])

        def progress(done: int, total: int) -> None:
            kill(done, total)
            # The local thread alone finishes these tiny tasks in milliseconds: hold it until the remote
            # threads have met their dead workers, or the job may end before they notice.
            if kill.fired.is_set() and threading.current_thread().name.startswith("rmidl-local"):
                deadline = time.monotonic() + 30
                while registered(cluster.ns_address) and time.monotonic() < deadline:
                    time.sleep(0.02)  # polling the registry with a deadline, not synchronising by sleep

        assert_close(coordinator.correlate(image, kernels, progress=progress), ref)
        assert kill.fired.is_set()
        assert coordinator.stats()["local"] > 0
        assert registered(cluster.ns_address) == set()


def test_all_workers_gone_without_local_pool_is_worker_lost(job):
    image, kernels, _ = job
    with LocalCluster(workers=1) as cluster, Coordinator(
        cluster.ns_address, local_threads=0, config=fault_config(), min_tasks=60
    ) as coordinator:
        progress = on_progress(2, lambda: cluster.kill("w1"))
        with pytest.raises(WorkerLost, match="every worker is gone"):
            coordinator.correlate(image, kernels, progress=progress)


def test_no_worker_at_all_is_worker_lost(nameserver, job):
    image, kernels, _ = job
    with Coordinator(nameserver, local_threads=0, config=fault_config()) as coordinator, pytest.raises(
        WorkerLost, match="no worker"
    ):
        coordinator.correlate(image, kernels)


# -- the features job ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    """48 PNGs in 2 classes, and a network whose batches take a few milliseconds each."""
    from conftest import write_image_folder

    from rmidl.network import Network

    root = write_image_folder(tmp_path_factory.mktemp("faults"), per_class=24, shape=(40, 36))
    return root, Network.from_spec("6x5x5:relu:max2,4x3x3:relu:max2", seed=2)


def uninterrupted(root, net, batch: int = 2) -> np.ndarray:
    """The features of one undisturbed run in this process, in the same batches (the same bits)."""
    with Coordinator(local_threads=1, config=fault_config()) as coordinator:
        return coordinator.features(root, net, batch=batch, progress=False).X


def test_a_worker_killed_half_way_loses_no_image(textures, caplog):
    root, net = textures
    expected = uninterrupted(root, net)
    with LocalCluster(workers=3) as cluster, Coordinator(
        cluster.ns_address, local_threads=0, config=fault_config()
    ) as coordinator:
        progress = kill_mid_job(cluster, "w2", at=24)
        with caplog.at_level(logging.WARNING, logger=SCHEDULER_LOG):
            try:
                result = coordinator.features(root, net, batch=2, progress=progress)
            finally:
                progress.close()
        assert progress.fired.is_set()
        np.testing.assert_array_equal(result.X, expected)  # identical, not merely close
        assert result.labels.tolist() == [0] * 24 + [1] * 24
        assert any("w2 lost" in r.getMessage() for r in caplog.records if r.name == SCHEDULER_LOG)
        assert "w2" not in registered(cluster.ns_address)


def test_every_image_is_written_exactly_once_after_faults(textures):
    from rmidl.client.jobs.features import FeaturesJob
    from rmidl.client.scheduler import Scheduler
    from rmidl.datasets import open_dataset
    from rmidl.remote.naming import list_workers
    from rmidl.remote.transport import connect_ns

    root, net = textures
    config = fault_config()
    with LocalCluster(workers=2) as cluster, connect_ns(cluster.ns_address, config) as ns:
        job = FeaturesJob(open_dataset(root), net, config=config, batch=2,
                          progress=on_progress(16, lambda: cluster.kill("w1")))
        scheduler = Scheduler(config, local_threads=1, registry=lambda: list_workers(ns))
        try:
            scheduler.discover()
            job.plan_for(scheduler.capacities(1), scheduler.usable_workers())
            queue = scheduler.queue(job)
            with job.running():
                scheduler.run(job, queue)
        finally:
            scheduler.close()
    assert job.writes.tolist() == [1] * 48
    np.testing.assert_array_equal(job.out, uninterrupted(root, net))


def test_a_hanging_worker_is_quarantined_and_its_batch_runs_elsewhere(textures, children):
    root, net = textures
    expected = uninterrupted(root, net, batch=4)
    with LocalCluster(workers=1) as cluster:
        hanging = children("worker_doubles", "--ns", cluster.ns_address, "--name", "hang", "--hang", "1",
                           env={"PYTHONPATH": str(Path(__file__).parent)})
        hanging.read_until("ready")
        config = fault_config(task_deadline_floor=3.0)
        with Coordinator(cluster.ns_address, local_threads=0, config=config) as coordinator:
            result = coordinator.features(root, net, batch=4, progress=False)
            np.testing.assert_array_equal(result.X, expected)
            assert coordinator.last_job()["requeued"] >= 1
            states = {w["name"]: w["state"] for w in coordinator.workers()}
            assert states == {"hang": "quarantined", "w1": "ok"}
