"""The data plane end to end: a result's lifetime on shared memory, nothing left behind when processes die,
fallbacks when a data path fails, and every `out=` layout on every path."""

from __future__ import annotations

import gc
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dataplane_child import mapped_blocks
from reference import assert_close, batch_reference, reference
from worker_doubles import ShmRefusingWorker

import rmidl
from rmidl._memory import Recycler, empty
from rmidl.client import Coordinator
from rmidl.client.localcluster import LocalCluster
from rmidl.config import Config

TESTS = str(Path(__file__).parent)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds (workers unmap blocks from a thread, within about a second)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def dev_shm() -> set[str]:
    return set(os.listdir("/dev/shm"))


def leaked(before: set[str], *pids: int) -> set[str]:
    """/dev/shm entries made since `before` by this process or `pids` (rmidl's old block names carried
    their creator's pid; blocks are memfds now). Other users of this machine may add their own entries."""
    ours = {os.getpid(), *pids}
    return {name for name in dev_shm() - before if any(f"_{pid}_" in name for pid in ours)}


def mappers(names: set[str]) -> set[int]:
    """Every process on this host that has one of the blocks `names` mapped."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and mapped_blocks(entry) & names:
            found.add(int(entry))
    return found


def backing(array: np.ndarray) -> str:
    """The path of the mapping that holds `array`'s first byte ("" for anonymous memory)."""
    address = array.ctypes.data
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError("array not in any mapping")


@pytest.fixture
def job(rng):
    image = rng.standard_normal((120, 90)).astype(np.float32)
    kernels = rng.standard_normal((6, 5, 5)).astype(np.float32)
    return image, kernels, reference(image, kernels)


# --- the recycler -----------------------------------------------------------------------------------


def test_recycled_output_comes_back_when_its_last_view_goes():
    from rmidl._memory import AnonymousBuffer

    recycler = Recycler(AnonymousBuffer, max_free=1)
    first, _ = recycler.lease((1024, 1024), "float32")
    first[...] = 1.0
    view = first[10:20]
    del first
    second, _ = recycler.lease((1024, 1024), "float32")
    assert recycler.made == 2  # a view of the first result still holds its buffer
    assert np.all(view == 1.0)
    del view, second
    recycler.lease((1024, 1024), "float32")
    assert recycler.made == 2
    assert recycler.free_bytes <= 4 << 20  # at most max_free=1 buffer kept
    recycler.close()


def test_big_fresh_outputs_reuse_freed_mappings_and_small_ones_are_numpy_arrays():
    from rmidl._memory import outputs

    small = empty((10, 10), "float64")
    assert small.flags.owndata and small.shape == (10, 10)
    big = empty((16, 512, 512), "float32")
    assert big.shape == (16, 512, 512) and big.dtype == np.float32 and big.flags.c_contiguous
    made = outputs().made
    del big
    again = empty((16, 512, 512), "float32")
    assert outputs().made == made and again.flags.writeable


# --- a result's lifetime -----------------------------------------------------------------------------


def test_the_result_is_the_shared_block_and_outlives_the_coordinator(nameserver, start_worker, cluster_config,
                                                                    job):
    image, kernels, expected = job
    start_worker()
    before = dev_shm()
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=4) as coordinator:
        result = coordinator.correlate(image, kernels)
        assert coordinator.last_job()["shared_memory"]
    assert backing(result).startswith("/memfd:rmidl_")  # written by the worker where we read it
    (name,) = {backing(result).split("/memfd:")[1].split()[0]}
    assert_close(result, expected)  # still valid after close()
    assert name in mapped_blocks()
    del result  # the last view: the block is closed, and the worker unmaps it
    gc.collect()
    wait_for(lambda: name not in mapped_blocks())
    assert leaked(before) == set()


def test_a_dropped_result_gives_its_block_to_the_next_job_and_a_held_one_is_kept(nameserver, start_worker,
                                                                                 cluster_config, job):
    image, kernels, expected = job
    start_worker()
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=4) as coordinator:
        coordinator.correlate(image, kernels)  # dropped at once
        made = coordinator._shared.blocks_made
        held = coordinator.correlate(image, kernels)
        assert coordinator._shared.blocks_made == made  # the same two blocks again
        other = coordinator.correlate(image[::-1].copy(), kernels)
        assert coordinator._shared.blocks_made == made + 1  # `held` keeps its block: a new output
        assert_close(held, expected)  # not overwritten by the next job
        assert_close(other, reference(image[::-1], kernels))
    assert_close(held, expected)


def test_closing_a_coordinator_unmaps_its_unused_blocks_on_workers(nameserver, start_worker, cluster_config,
                                                                   job):
    image, kernels, _ = job
    handle = start_worker()
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=4) as coordinator:
        coordinator.correlate(image, kernels)
        coordinator.correlate(image[:60], kernels)
        assert len(mapped_blocks()) >= 2
    assert mapped_blocks() == set()  # release_shm unmapped them at once
    assert handle.worker.info()["shm_blocks"] == 0


def test_a_killed_coordinator_leaves_nothing_mapped_or_in_dev_shm(nameserver, start_worker, children):
    start_worker()
    before = dev_shm()
    child = children("dataplane_child", "--ns", nameserver, env={"PYTHONPATH": TESTS})
    lines = child.read_until("ready", timeout=60)
    names = {line.split()[1] for line in lines if line.startswith("block ")}
    assert len(names) == 2 and names <= mapped_blocks()  # the worker (in this process) maps both
    os.kill(child.process.pid, signal.SIGKILL)  # as `timeout -s KILL` or a batch scheduler does
    child.stop()
    wait_for(lambda: not mapped_blocks() & names)  # the worker lets go within a second
    assert mappers(names) == set()
    assert leaked(before, child.process.pid) == set()


def test_coordinator_and_worker_both_killed_leave_nothing(children):
    before = dev_shm()
    with LocalCluster(workers=1, die_with_parent=True) as cluster:
        child = children("dataplane_child", "--ns", cluster.ns_address, env={"PYTHONPATH": TESTS})
        lines = child.read_until("ready", timeout=60)
        names = {line.split()[1] for line in lines if line.startswith("block ")}
        (worker_pid,) = [p for p in cluster.pids() if mapped_blocks(p) & names]
        os.kill(child.process.pid, signal.SIGKILL)
        cluster.kill("w1")
        child.stop()
        wait_for(lambda: not os.path.exists(f"/proc/{worker_pid}/maps") or not mapped_blocks(worker_pid))
        assert mappers(names) == set()
    assert leaked(before, child.process.pid, worker_pid) == set()


def test_a_worker_killed_mid_write_loses_nothing_and_leaks_nothing(nameserver, job, children):
    image, kernels, expected = job
    before = dev_shm()
    dying = children("worker_doubles", "--ns", nameserver, "--name", "dying", "--die-mid-write",
                     env={"PYTHONPATH": TESTS})
    dying.read_until("ready")
    dying_pid = dying.process.pid
    with Coordinator(nameserver, local_threads=1, config=Config(environ={}), min_tasks=8) as coordinator:

        def progress(done: int, total: int) -> None:
            # The local pool waits at its first task until the worker has died under one of its own.
            wait_for(lambda: coordinator._scheduler.workers["dying"].state == "dead")

        result = coordinator.correlate(image, kernels, progress=progress)
        assert_close(result, expected)  # no NaN left of the half-written slot
        # A call ended without its reply: the result is a copy, the blocks are never reused.
        assert not backing(result).startswith("/memfd:")
    assert mapped_blocks() == set()
    assert leaked(before, dying_pid) == set()


def test_a_worker_killed_mid_write_of_a_batch_loses_nothing(nameserver, start_worker, rng, children):
    images = rng.standard_normal((12, 30, 26, 3)).astype(np.float32)
    bank = rng.standard_normal((5, 4, 3, 3)).astype(np.float32)
    before = dev_shm()
    dying = children("worker_doubles", "--ns", nameserver, "--name", "dying", "--die-mid-write",
                     env={"PYTHONPATH": TESTS})
    dying.read_until("ready")
    start_worker(name="healthy")
    with Coordinator(nameserver, local_threads=1, config=Config(environ={}), min_tasks=24) as coordinator:

        def progress(done: int, total: int) -> None:
            wait_for(lambda: coordinator._scheduler.workers["dying"].state == "dead")

        result = coordinator.correlate(images, bank, batch=True, mode="same", engine="direct",
                                       progress=progress)
        assert coordinator.last_job()["requeued"] >= 1
    # No NaN left of the half-written slot: bit for bit the in-process result.
    assert np.array_equal(result, rmidl.correlate(images, bank, batch=True, mode="same", engine="direct"))
    assert_close(result, batch_reference(images, bank, "same"))
    assert not backing(result).startswith("/memfd:")
    assert leaked(before, dying.process.pid) == set()


def test_a_hung_worker_cannot_write_into_a_returned_result(nameserver, start_worker, job):
    from worker_doubles import HangingWorker

    image, kernels, expected = job
    hanging = start_worker(worker_class=HangingWorker)
    config = Config(environ={}, task_deadline_floor=0.5)

    def progress(done: int, total: int) -> None:
        # The local pool waits at its first task until the worker holds one (or the pool could finish
        # the whole job first on a busy machine).
        hanging.worker.hung.wait(10)

    with Coordinator(nameserver, local_threads=1, config=config, min_tasks=8) as coordinator:
        result = coordinator.correlate(image, kernels, progress=progress)
        assert {w["state"] for w in coordinator.workers()} == {"quarantined"}
    assert_close(result, expected)
    assert not backing(result).startswith("/memfd:")


# --- fallbacks -----------------------------------------------------------------------------------------


def test_a_worker_that_cannot_map_our_blocks_gets_its_data_over_tcp(nameserver, start_worker, cluster_config,
                                                                   job):
    image, kernels, expected = job
    start_worker(worker_class=ShmRefusingWorker, name="other-user")
    with Coordinator(nameserver, local_threads=0, config=cluster_config, min_tasks=4) as coordinator:
        assert_close(coordinator.correlate(image, kernels), expected)
        assert coordinator.stats() == {"other-user": coordinator.last_job()["tasks"]}
        assert coordinator._scheduler.workers["other-user"].shm_refused
        assert_close(coordinator.correlate(image, kernels), expected)
        assert not coordinator.last_job()["shared_memory"]


def test_idle_connections_to_the_bulk_port_do_not_fail_tcp_jobs(nameserver, start_worker, cluster_config,
                                                                 job):
    # 32 idle connections to a worker's bulk port used to fail every shared_memory=False job.
    image, kernels, expected = job
    handle = start_worker()
    idle = [socket.create_connection(("127.0.0.1", handle.bulk.port), timeout=10) for _ in range(48)]
    try:
        with Coordinator(nameserver, local_threads=0, shared_memory=False, config=cluster_config,
                         min_tasks=6) as coordinator:
            for _ in range(2):
                assert_close(coordinator.correlate(image, kernels), expected)
            assert coordinator.last_job()["moved_bytes"] == expected.size * 4
            assert coordinator._scheduler.workers[handle.name].bulk_usable  # never fell back to inline
    finally:
        for sock in idle:
            sock.close()


def test_a_broken_bulk_channel_falls_back_to_inline_results(nameserver, start_worker, cluster_config, job):
    image, kernels, expected = job
    handle = start_worker()
    handle.bulk.close()  # the port is advertised but nobody answers there
    with Coordinator(nameserver, local_threads=0, shared_memory=False, config=cluster_config,
                     min_tasks=4) as coordinator:
        assert_close(coordinator.correlate(image, kernels), expected)
        stub = coordinator._scheduler.workers[handle.name]
        assert not stub.bulk_usable and stub.usable
        assert coordinator.last_job()["requeued"] == 0  # the same worker ran it again, inline


# --- out= on every path ----------------------------------------------------------------------------


@pytest.mark.parametrize("shared_memory", [True, False])
@pytest.mark.parametrize("layout", ["fortran", "strided", "c"])
def test_every_out_layout_on_every_path(nameserver, start_worker, cluster_config, job, shared_memory, layout):
    image, kernels, expected = job
    start_worker()
    shape = expected.shape
    if layout == "fortran":
        out = np.zeros(shape, np.float32, order="F")
    elif layout == "strided":
        out = np.zeros((shape[0], shape[1] * 2, shape[2] + 3), np.float32)[:, ::2, 1:-2]
    else:
        out = np.zeros(shape, np.float32)
    with Coordinator(nameserver, local_threads=0, shared_memory=shared_memory, config=cluster_config,
                     min_tasks=4) as coordinator:
        result = coordinator.correlate(image, kernels, out=out)
    assert result is out
    assert_close(out, expected)
