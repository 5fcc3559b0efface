"""ConvolutionWorker through a real Pyro5 daemon and proxy: every method, every data path, every refusal."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
from Pyro5.errors import CommunicationError
from Pyro5.errors import TimeoutError as PyroTimeoutError
from reference import assert_close, reference

from rmidl.config import Config
from rmidl.errors import (
    BankError,
    BudgetExceeded,
    DTypeError,
    NonFiniteInput,
    ShapeError,
    SharedMemoryUnavailable,
    WorkerBusy,
)
from rmidl.remote.blobs import Blob
from rmidl.remote.bulk import fetch
from rmidl.remote.shm import SharedArray, host_id
from rmidl.remote.transport import worker_proxy
from rmidl.remote.wire import pack, unpack


def task(task_id, rows, kernels, source, *, output="inline", bank_id="bank"):
    return {"task_id": task_id, "bank_id": bank_id, "kernels": list(kernels), "rows": list(rows),
            "input": source, "output": output}


def band(image, rows, kh):
    return {"array": pack(image[rows[0] : rows[1] + kh - 1])}


def bank_blob(bank):
    """The wire form of a bank blob, as put_blob takes it."""
    return Blob.bank(bank).to_wire()


def test_ping_and_info_describe_the_worker(worker, proxy):
    assert proxy.ping() == "pong"
    info = proxy.info()
    assert info["name"] == worker.name
    assert info["host_id"] == host_id()
    assert info["threads"] == 1 and info["cores"] >= 1
    assert info["tasks_done"] == 0 and info["busy"] == 0 and info["banks"] == []
    assert info["gflops"] > 0 and isinstance(info["bulk_port"], int)
    assert info["max_message_size"] == worker.config.max_message_size and info["shm_blocks"] == 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "case",
    [
        ((24, 19, 1), (6, 3, 3, 1), (0, 22), (0, 6)),
        ((24, 19, 3), (5, 5, 2, 3), (4, 13), (1, 4)),
        ((9, 40, 2), (4, 9, 7, 2), (0, 1), (3, 4)),
    ],
)
def test_inline_task_equals_scipy(proxy, rng, dtype, case):
    image_shape, bank_shape, rows, kernels = case
    image = rng.standard_normal(image_shape).astype(dtype)
    bank = rng.standard_normal(bank_shape).astype(dtype)
    proxy.put_blob("bank", bank_blob(bank))
    start = time.perf_counter()
    reply = proxy.correlate(task(7, rows, kernels, band(image, rows, bank_shape[1])))
    round_trip = time.perf_counter() - start
    # the worker's own compute time: measured (not left at 0), and within the call that carried it
    assert reply["task_id"] == 7 and 0 < reply["seconds"] < round_trip
    result = unpack(reply["result"])
    assert result.dtype == np.dtype(dtype)
    assert_close(result, reference(image, bank)[kernels[0] : kernels[1], rows[0] : rows[1]])


def test_bulk_task_streams_into_the_output_slice(worker, proxy, rng):
    image = rng.standard_normal((30, 25, 2)).astype(np.float32)
    bank = rng.standard_normal((6, 4, 3, 2)).astype(np.float32)
    proxy.put_blob("bank", bank_blob(bank))
    expected = reference(image, bank)
    out = np.zeros(expected.shape, np.float32)
    for task_id, (rows, ks) in enumerate([((0, 14), (0, 3)), ((14, 27), (0, 3)), ((0, 27), (3, 6))]):
        reply = proxy.correlate(task(task_id, rows, ks, band(image, rows, 4), output="bulk"))
        assert reply["shape"] == [ks[1] - ks[0], rows[1] - rows[0], 23] and reply["dtype"] == "float32"
        view = out[ks[0] : ks[1], rows[0] : rows[1], :]
        port = proxy.info()["bulk_port"]
        assert fetch(worker.host, port, reply["ticket"], view, timeout=10) == reply["nbytes"]
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shm_tasks_write_in_place(proxy, rng, dtype):
    image = rng.standard_normal((33, 21, 3)).astype(dtype)
    bank = rng.standard_normal((5, 3, 4, 3)).astype(dtype)
    proxy.put_blob("bank", bank_blob(bank))
    expected = reference(image, bank)
    tiles = [((r0, min(r0 + 8, 31)), (k0, min(k0 + 2, 5))) for r0 in range(0, 31, 8) for k0 in range(0, 5, 2)]
    with SharedArray.create(image.shape, dtype) as shared_in, SharedArray.create(expected.shape, dtype) as o:
        shared_in.array[:] = image
        for task_id, (rows, ks) in enumerate(tiles):
            source = {"shm": shared_in.descriptor()}
            reply = proxy.correlate(task(task_id, rows, ks, source, output={"shm": o.descriptor()}))
            assert set(reply) == {"task_id", "seconds", "engine"}
        assert_close(o.array, expected)
    assert proxy.info()["tasks_done"] == len(tiles)


def test_put_blob_replaces_and_drop_blob_forgets(proxy, rng):
    image = rng.standard_normal((10, 10, 1)).astype(np.float32)
    first, second = (rng.standard_normal((2, 3, 3, 1)).astype(np.float32) for _ in range(2))
    proxy.put_blob("bank", bank_blob(first))
    proxy.put_blob("bank", bank_blob(second))
    result = unpack(proxy.correlate(task(0, (0, 8), (0, 2), band(image, (0, 8), 3)))["result"])
    assert_close(result, reference(image, second))
    assert proxy.drop_blob("bank") is True
    assert proxy.drop_blob("bank") is False
    with pytest.raises(BankError, match="'bank' is not cached"):
        proxy.correlate(task(1, (0, 8), (0, 2), band(image, (0, 8), 3)))


def test_bank_cache_is_lru_by_count(start_worker, rng):
    config = Config(environ={}, bank_cache_size=2)
    handle = start_worker(config=config)
    image = rng.standard_normal((8, 8, 1)).astype(np.float32)
    with worker_proxy(handle.uri, config, timeout=30) as proxy:
        for name in ("a", "b"):
            proxy.put_blob(name, bank_blob(np.ones((1, 2, 2, 1), np.float32)))
        proxy.correlate(task(0, (0, 7), (0, 1), band(image, (0, 7), 2), bank_id="a"))  # a is now newest
        proxy.put_blob("c", bank_blob(np.ones((1, 2, 2, 1), np.float32)))
        assert proxy.info()["banks"] == ["a", "c"]
        with pytest.raises(BankError, match="'b'"):
            proxy.correlate(task(1, (0, 7), (0, 1), band(image, (0, 7), 2), bank_id="b"))


def test_bank_cache_is_bounded_by_bytes(start_worker):
    config = Config(environ={}, memory_budget=4 * 4000)  # banks get a quarter: 4000 bytes
    handle = start_worker(config=config)
    with worker_proxy(handle.uri, config, timeout=30) as proxy:
        proxy.put_blob("a", bank_blob(np.ones((10, 5, 5, 1), np.float32)))  # 1000 bytes
        proxy.put_blob("b", bank_blob(np.ones((20, 5, 5, 1), np.float32)))  # 2000 bytes
        proxy.put_blob("c", bank_blob(np.ones((15, 5, 5, 1), np.float32)))  # 1500: 4500 > 4000, a goes
        assert proxy.info()["banks"] == ["b", "c"]
        with pytest.raises(BudgetExceeded, match="bank 'd' of 4100 bytes exceeds"):
            proxy.put_blob("d", bank_blob(np.ones((41, 5, 5, 1), np.float32)))
        assert proxy.info()["banks"] == ["b", "c"]


def test_task_output_above_the_memory_budget_is_refused_before_work(start_worker, rng):
    config = Config(environ={}, memory_budget=40_000)
    handle = start_worker(config=config)
    image = rng.standard_normal((60, 60, 1)).astype(np.float32)
    with worker_proxy(handle.uri, config, timeout=30) as proxy:
        proxy.put_blob("bank", bank_blob(rng.standard_normal((4, 3, 3, 1)).astype(np.float32)))
        with pytest.raises(BudgetExceeded, match=r"task 3: output of 53824 bytes exceeds the worker's"):
            proxy.correlate(task(3, (0, 58), (0, 4), band(image, (0, 58), 3)))
        # A smaller task of the same job fits, and the refused one left no reservation behind.
        for _ in range(3):
            proxy.correlate(task(4, (0, 20), (0, 4), band(image, (0, 20), 3)))
        assert proxy.info()["tasks_done"] == 3


def test_inline_result_above_the_message_size_is_refused_before_work(start_worker, rng):
    # The band (20x100, 8 kB) fits a 64 KiB message; 16 maps of 18x98 (113 kB) do not. Pyro5 would
    # refuse the reply after the work and drop the connection (a CommunicationError the caller retries).
    config = Config(environ={}, max_message_size=64 << 10)
    handle = start_worker(config=config)
    image = rng.standard_normal((20, 100, 1)).astype(np.float32)
    bank = rng.standard_normal((16, 3, 3, 1)).astype(np.float32)
    with worker_proxy(handle.uri, config, timeout=30) as proxy:
        proxy.put_blob("bank", bank_blob(bank))
        with pytest.raises(BudgetExceeded, match=r"task 5: inline result of 112896 bytes does not fit"):
            proxy.correlate(task(5, (0, 18), (0, 16), band(image, (0, 18), 3)))
        # Half the kernels fit inline; all of them fit in bulk.
        half = unpack(proxy.correlate(task(6, (0, 18), (0, 8), band(image, (0, 18), 3)))["result"])
        assert_close(half, reference(image, bank[:8]))
        reply = proxy.correlate(task(7, (0, 18), (0, 16), band(image, (0, 18), 3), output="bulk"))
        out = np.empty((16, 18, 98), np.float32)
        fetch(handle.host, proxy.info()["bulk_port"], reply["ticket"], out, timeout=10)
        assert_close(out, reference(image, bank))
        assert proxy.info()["tasks_done"] == 2


def test_a_budget_full_of_other_tasks_is_a_cluster_error_not_the_inputs_fault(start_worker, rng):
    from rmidl.errors import ClusterError, InputError

    # 6 maps of 23x20 float32: 11040 bytes. The budget holds one result, not two.
    config = Config(environ={}, memory_budget=20_000)
    handle = start_worker(config=config)
    image = rng.standard_normal((25, 22, 1)).astype(np.float32)
    bank = rng.standard_normal((6, 3, 3, 1)).astype(np.float32)
    expected = reference(image, bank)
    one = task(0, (0, 23), (0, 6), band(image, (0, 23), 3))
    with worker_proxy(handle.uri, config, timeout=30) as proxy:
        proxy.put_blob("bank", bank_blob(bank))
        port = proxy.info()["bulk_port"]
        # An unfetched bulk result holds the bulk budget; a second one must wait, not fail its job.
        first = proxy.correlate(one | {"output": "bulk"})
        with pytest.raises(WorkerBusy, match="11040 waiting to be fetched") as info:
            proxy.correlate(one | {"task_id": 1, "output": "bulk"})
        assert not isinstance(info.value, InputError)
        out = np.empty(expected.shape, np.float32)
        fetch(handle.host, port, first["ticket"], out, timeout=10)
        assert_close(out, expected)
        second = proxy.correlate(one | {"task_id": 2, "output": "bulk"})
        fetch(handle.host, port, second["ticket"], out, timeout=10)
        assert_close(out, expected)
        # The same for the memory another task's output holds while it computes.
        with handle.worker._reservation(11_040, task_id=99):
            with pytest.raises(ClusterError, match="11040 in use") as info:
                proxy.correlate(one | {"task_id": 3})
            assert not isinstance(info.value, InputError)
        assert_close(unpack(proxy.correlate(one | {"task_id": 4})["result"]), expected)


def test_remote_errors_arrive_as_rmidl_classes_and_the_worker_keeps_serving(proxy, rng):
    image = rng.standard_normal((12, 12, 2)).astype(np.float32)
    bank = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    proxy.put_blob("bank", bank_blob(bank))
    good = task(0, (0, 10), (0, 3), band(image, (0, 10), 3))
    nan_bank = bank.copy()
    nan_bank[1, 2, 0, 1] = np.nan
    with SharedArray.create((12, 12, 2), "float32") as closed:
        gone = closed.descriptor()
    bad_calls = [
        (lambda: proxy.correlate(task(1, (0, 10), (0, 3), band(image, (0, 10), 3), bank_id="nope")),
         BankError, "'nope' is not cached"),
        (lambda: proxy.correlate(task(1, (0, 10), (0, 4), band(image, (0, 10), 3))), ShapeError,
         r"kernels \[0, 4\) outside bank"),
        (lambda: proxy.correlate(task(1, (5, 5), (0, 3), band(image, (0, 10), 3))), ShapeError, "empty"),
        (lambda: proxy.correlate(task(1, (0, 10), (0, 3), band(image, (0, 9), 3))), ShapeError,
         "expected 12 rows"),
        (lambda: proxy.correlate(task(1, (0, 10), (0, 3), band(image[:, :, :1], (0, 10), 3))), ShapeError,
         "1 channel"),
        (lambda: proxy.correlate(task(1, (0, 10), (0, 3), band(image.astype(np.float64), (0, 10), 3))),
         DTypeError, "float64 but bank is float32"),
        (lambda: proxy.correlate({"task_id": 1}), ShapeError, "missing"),
        (lambda: proxy.correlate(task(1, (0, 10), (0, 3), {"file": "x"})), ShapeError, "input must be"),
        (lambda: proxy.correlate(task(1, (0, 10), (0, 3), band(image, (0, 10), 3), output="disk")),
         ShapeError, "'disk'"),
        (lambda: proxy.correlate(task(1, (0, 10), (0, 3), {"shm": gone})), SharedMemoryUnavailable,
         "is not open in process"),
        (lambda: proxy.correlate(task(1, (0, 10), (0, 3), {"shm": gone | {"token": "0" * 64}})),
         SharedMemoryUnavailable, "token does not open it"),
        (lambda: proxy.put_blob("bank2", bank_blob(nan_bank)), NonFiniteInput, "NaN or Inf"),
        (lambda: proxy.put_blob("bank2", bank_blob(bank[0])), ShapeError, r"\(K, kh, kw, C\)"),
        (lambda: proxy.put_blob("", bank_blob(bank)), BankError, "non-empty string"),
        (lambda: proxy.put_blob("bank2", {"kind": "bank", "settings": {},
                                          "arrays": {"bank": {"dtype": "int8", "shape": [1], "data": b"x"}}}),
         DTypeError, "int8"),
    ]
    for call, error, match in bad_calls:
        with pytest.raises(error, match=match):
            call()
        assert_close(unpack(proxy.correlate(good)["result"]), reference(image, bank))
    info = proxy.info()
    assert info["tasks_done"] == len(bad_calls) and info["busy"] == 0 and info["banks"] == ["bank"]


def test_concurrent_calls_from_many_proxies(worker, cluster_config, rng):
    image = rng.standard_normal((40, 30, 1)).astype(np.float32)
    bank = rng.standard_normal((8, 3, 3, 1)).astype(np.float32)
    expected = reference(image, bank)
    out = np.zeros(expected.shape, np.float32)
    errors: list[BaseException] = []
    with worker_proxy(worker.uri, cluster_config, timeout=30) as proxy:
        proxy.put_blob("bank", bank_blob(bank))

    def client(k: int) -> None:
        try:
            with worker_proxy(worker.uri, cluster_config, timeout=30) as p:
                for r0 in range(0, 38, 10):
                    rows = (r0, min(r0 + 10, 38))
                    reply = p.correlate(task(k * 10 + r0, rows, (k, k + 1), band(image, rows, 3)))
                    out[k, rows[0] : rows[1]] = unpack(reply["result"])[0]
        except BaseException as error:  # collected for the main thread
            errors.append(error)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert_close(out, expected)


def test_a_hung_call_blocks_neither_other_calls_nor_shutdown(start_worker, cluster_config, rng):
    from worker_doubles import HangingWorker

    handle = start_worker(worker_class=HangingWorker)
    image = rng.standard_normal((8, 8, 1)).astype(np.float32)
    good = task(0, (0, 6), (0, 1), band(image, (0, 6), 3))
    with worker_proxy(handle.uri, cluster_config, timeout=30) as proxy:
        proxy.put_blob("bank", bank_blob(np.ones((1, 3, 3, 1), np.float32)))
    with worker_proxy(handle.uri, cluster_config, timeout=0.5) as hung, pytest.raises(PyroTimeoutError):
        hung.correlate(good)
    assert handle.worker.hung.wait(10)
    with worker_proxy(handle.uri, cluster_config, timeout=30) as proxy:
        # Only the first call hangs; the worker keeps answering others.
        assert_close(unpack(proxy.correlate(good)["result"]), reference(image, np.ones((1, 3, 3, 1))))
    handle.close()  # releases the hung call; close() must not block on it
    with pytest.raises(CommunicationError), worker_proxy(handle.uri, cluster_config, timeout=2) as proxy:
        proxy.ping()


def _process_resources() -> tuple[int, int]:
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def test_many_jobs_leave_no_threads_descriptors_or_mappings_behind(worker, cluster_config, rng):
    image = rng.standard_normal((20, 16, 1)).astype(np.float32)
    bank = rng.standard_normal((3, 3, 3, 1)).astype(np.float32)
    expected = reference(image, bank)

    def one_job(task_id: int) -> None:
        with worker_proxy(worker.uri, cluster_config, timeout=30) as proxy:
            proxy.put_blob("bank", bank_blob(bank))
            source = band(image, (0, 18), 3)
            inline = unpack(proxy.correlate(task(task_id, (0, 18), (0, 3), source))["result"])
            reply = proxy.correlate(task(task_id, (0, 18), (0, 3), source, output="bulk"))
            bulk = np.empty(expected.shape, np.float32)
            fetch(worker.host, worker.bulk.port, reply["ticket"], bulk, timeout=10)
            src, o = SharedArray.create(image.shape, "float32"), SharedArray.create(expected.shape, "float32")
            with src, o:
                src.array[:] = image
                proxy.correlate(task(task_id, (0, 18), (0, 3), {"shm": src.descriptor()},
                                     output={"shm": o.descriptor()}))
                shared = o.array.copy()
        for result in (inline, bulk, shared):
            assert_close(result, expected)

    one_job(0)  # warm-up: Pyro5's pool threads, the resource tracker
    before = _process_resources()
    for task_id in range(1, 31):
        one_job(task_id)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # connection threads return to the pool asynchronously
        threads, fds = _process_resources()
        if threads <= before[0] + 2 and fds <= before[1] + 2:
            break
        time.sleep(0.02)
    assert threads <= before[0] + 2 and fds <= before[1] + 2, (before, (threads, fds))
    with worker_proxy(worker.uri, cluster_config, timeout=30) as proxy:
        assert proxy.info()["shm_blocks"] == 0  # blocks of finished jobs are unmapped, not kept
    assert worker.bulk.pending_bytes == 0


def test_reported_rate_is_the_engines_measured_rate(worker, proxy):
    from rmidl.kernels import measure_gflops

    # A cold, tiny calibration once reported ~0.2 GFLOP/s for a worker doing ~40: coordinators then
    # starved it of tasks and stretched its deadlines. Within 4x of a fresh measurement (a busy machine).
    measured = measure_gflops(threads=1)
    assert proxy.info()["gflops"] >= measured / 4, (proxy.info()["gflops"], measured)


def test_a_task_queued_at_shutdown_is_a_cluster_error(start_worker, cluster_config, rng):
    from rmidl.errors import ClusterError, InputError, WorkerLost

    handle = start_worker()
    image = rng.standard_normal((8, 8, 1)).astype(np.float32)
    with worker_proxy(handle.uri, cluster_config, timeout=30) as proxy:
        proxy.put_blob("bank", bank_blob(np.ones((1, 3, 3, 1), np.float32)))
    errors: list[BaseException] = []

    def queued_call() -> None:
        with worker_proxy(handle.uri, cluster_config, timeout=30) as queued:
            try:
                queued.correlate(task(0, (0, 6), (0, 1), band(image, (0, 6), 3)))
            except BaseException as error:  # examined by the main thread
                errors.append(error)

    caller = threading.Thread(target=queued_call)
    with handle.worker._compute:  # the engine is busy with another task: this one waits for it
        caller.start()
        deadline = time.monotonic() + 10
        while handle.worker.info()["busy"] != 1 and time.monotonic() < deadline:
            caller.join(0.01)
        assert handle.worker.info()["busy"] == 1
        handle.worker.close()  # what the daemon's shutdown does first; the daemon still answers
        caller.join(30)
    assert len(errors) == 1
    # A coordinator re-queues a ClusterError; an InputError would fail its whole job.
    assert isinstance(errors[0], WorkerLost) and isinstance(errors[0], ClusterError)
    assert not isinstance(errors[0], InputError)
    with worker_proxy(handle.uri, cluster_config, timeout=30) as proxy, pytest.raises(WorkerLost):
        proxy.correlate(task(1, (0, 6), (0, 1), band(image, (0, 6), 3)))  # and so is every later one


def _shm_task(proxy, task_id: int, image: np.ndarray, shared_in: SharedArray, out: SharedArray) -> None:
    rows = (0, image.shape[0] - 2)
    proxy.correlate(task(task_id, rows, (0, 2), {"shm": shared_in.descriptor()},
                         output={"shm": out.descriptor()}))


def test_release_shm_unmaps_blocks_their_owner_still_holds(proxy, rng):
    image = rng.standard_normal((12, 10, 1)).astype(np.float32)
    bank = rng.standard_normal((2, 3, 3, 1)).astype(np.float32)
    proxy.put_blob("bank", bank_blob(bank))
    with SharedArray.create(image.shape, "float32") as src, SharedArray.create((2, 10, 8), "float32") as o:
        src.array[:] = image
        _shm_task(proxy, 0, image, src, o)
        assert proxy.info()["shm_blocks"] == 2
        assert proxy.release_shm([src.name, "rmidl_unknown"]) == 1
        assert proxy.info()["shm_blocks"] == 1
        assert proxy.release_shm([o.name]) == 1 and proxy.release_shm([o.name]) == 0
        assert proxy.info()["shm_blocks"] == 0
        o.array[:] = np.nan
        _shm_task(proxy, 1, image, src, o)  # a released block is mapped again when a task needs it
        assert_close(o.array, reference(image, bank))
        with pytest.raises(ShapeError, match="list of block names"):
            proxy.release_shm("rmidl_x")


def test_mapped_blocks_are_bounded_by_bytes(start_worker, rng):
    # Each job below maps an input of 4800 bytes and an output of 2560; a budget of 16000 holds two jobs.
    config = Config(environ={}, memory_budget=16_000)
    handle = start_worker(config=config)
    image = rng.standard_normal((40, 30, 1)).astype(np.float32)
    bank = rng.standard_normal((2, 3, 3, 1)).astype(np.float32)
    expected = reference(image, bank)[:, :38]
    with worker_proxy(handle.uri, config, timeout=30) as proxy:
        proxy.put_blob("bank", bank_blob(bank))
        blocks = []
        try:
            for task_id in range(4):
                src = SharedArray.create(image.shape, "float32")
                out = SharedArray.create(expected.shape, "float32")
                blocks += [src, out]
                src.array[:] = image
                _shm_task(proxy, task_id, image, src, out)
                assert_close(out.array, expected)
                mapped = proxy.info()["shm_blocks"]
                assert mapped <= 4, mapped  # by count alone (8) all 8 blocks would stay mapped
        finally:
            for block in blocks:
                block.close()


def test_short_engine_calls_do_not_drag_the_reported_rate_down(proxy, rng):
    # A 1x1 kernel on a 1000x1000 image takes a few ms at well under 1 GFLOP/s (memory bound): a job of
    # such tasks says nothing about the worker's rate and must not drag it 100x down for the next plan.
    image = rng.standard_normal((1000, 1000, 1)).astype(np.float32)
    proxy.put_blob("bank", bank_blob(np.ones((1, 1, 1, 1), np.float32)))
    before = proxy.info()["gflops"]
    out_shape = (1, 1000, 1000)
    with SharedArray.create(image.shape, "float32") as src, SharedArray.create(out_shape, "float32") as o:
        src.array[:] = image
        for task_id in range(20):
            proxy.correlate(task(task_id, (0, 1000), (0, 1), {"shm": src.descriptor()},
                                 output={"shm": o.descriptor()}))
        assert_close(o.array, image.transpose(2, 0, 1))
    assert proxy.info()["gflops"] >= before / 3, (before, proxy.info()["gflops"])


def test_the_worker_serves_exactly_the_contract(worker, proxy):
    import inspect

    from rmidl.remote.contract import ConvolutionWorkerAPI
    from rmidl.server.worker import ConvolutionWorker

    methods = {name for name, value in vars(ConvolutionWorkerAPI).items()
               if inspect.isfunction(value) and not name.startswith("_")}
    assert methods == {"ping", "info", "put_blob", "drop_blob", "correlate", "features", "gradient",
                       "release_shm"}
    assert isinstance(worker.worker, ConvolutionWorkerAPI)
    for name in methods:  # same parameters, kinds, defaults and annotations
        assert inspect.signature(getattr(ConvolutionWorker, name)) == inspect.signature(
            getattr(ConvolutionWorkerAPI, name)), name
    # What a remote caller sees: those methods and nothing else (close() is the daemon's, not theirs).
    proxy._pyroBind()
    assert proxy._pyroMethods == methods and proxy._pyroAttrs == set() and proxy._pyroOneway == set()
    with pytest.raises(AttributeError, match="close"):
        proxy.close()
    assert proxy.ping() == "pong"


def test_info_is_a_worker_info_record(worker, proxy):
    from rmidl.remote.contract import WorkerInfo

    wire = proxy.info()
    info = WorkerInfo.from_wire(wire)
    assert info.to_wire() == wire
    assert info.name == worker.name and info.bulk_port == worker.bulk.port and info.blobs == ()
    with pytest.raises(ShapeError, match=r"threads='2' has the wrong type \(expected int\)"):
        WorkerInfo.from_wire(wire | {"threads": "2"})
    assert WorkerInfo.from_wire({"name": "old", "future_field": 1}).threads == 0  # neighbours' versions
