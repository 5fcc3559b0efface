"""Batch tasks on a ConvolutionWorker (images [n0, n1) of a batch) through a real daemon: every data path,
the refusals, and the bank's kernel spectra cached with it (made once, bounded by the blob budget, dropped
with the bank)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from reference import assert_close, batch_reference

import rmidl
from rmidl.config import Config
from rmidl.errors import ShapeError
from rmidl.remote.blobs import Blob
from rmidl.remote.bulk import fetch
from rmidl.remote.shm import SharedArray
from rmidl.remote.transport import worker_proxy
from rmidl.remote.wire import pack, unpack


def batch_task(task_id, images, rows, kernels, source, *, output="inline", engine="auto"):
    return {"task_id": task_id, "bank_id": "bank", "kernels": list(kernels), "rows": list(rows),
            "images": list(images), "input": source, "output": output, "engine": engine}


def bands(batch, images, rows, kh):
    return {"array": pack(batch[images[0] : images[1], rows[0] : rows[1] + kh - 1])}


@pytest.mark.parametrize("engine", ["lowering", "direct", "fft"])
@pytest.mark.parametrize("output", ["inline", "bulk"])
def test_batch_tasks_over_tcp_equal_the_reference(worker, proxy, rng, engine, output):
    batch = rng.standard_normal((5, 17, 14, 3)).astype(np.float32)
    bank = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    proxy.put_blob("bank", Blob.bank(bank).to_wire())
    expected = batch_reference(batch, bank)
    out = np.zeros(expected.shape, np.float32)
    tiles = [((0, 2), (0, 14), (0, 6)), ((2, 5), (0, 7), (0, 4)), ((2, 5), (7, 14), (0, 4)),
             ((2, 5), (0, 14), (4, 6))]
    for task_id, (images, rows, ks) in enumerate(tiles):
        reply = proxy.correlate(batch_task(task_id, images, rows, ks, bands(batch, images, rows, 4),
                                           output=output, engine=engine))
        assert reply["engine"] == engine
        view = out[slice(*images), slice(*ks), slice(*rows)]
        if output == "bulk":
            assert reply["shape"] == list(view.shape)
            fetch(worker.host, proxy.info()["bulk_port"], reply["ticket"], view, timeout=10)
        else:
            view[...] = unpack(reply["result"])
        # The very values rmidl.correlate gives for the task's inputs and engine (cached spectra or not).
        task_images = batch[slice(*images), rows[0] : rows[1] + 3]
        in_process = rmidl.correlate(task_images, bank[slice(*ks)], batch=True, engine=engine, threads=1)
        assert np.array_equal(view, in_process)
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_batch_tasks_in_shared_memory_write_in_place(proxy, rng, dtype):
    batch = rng.standard_normal((4, 12, 11, 2)).astype(dtype)
    bank = rng.standard_normal((5, 3, 2, 2)).astype(dtype)
    proxy.put_blob("bank", Blob.bank(bank).to_wire())
    expected = batch_reference(batch, bank)
    tiles = [((n, n + 1), (r0, min(r0 + 4, 10)), (0, 5)) for n in range(4) for r0 in range(0, 10, 4)]
    with SharedArray.create(batch.shape, dtype) as shared_in, SharedArray.create(expected.shape, dtype) as o:
        shared_in.array[:] = batch
        for task_id, (images, rows, ks) in enumerate(tiles):
            reply = proxy.correlate(batch_task(task_id, images, rows, ks, {"shm": shared_in.descriptor()},
                                               output={"shm": o.descriptor()}))
            assert set(reply) == {"task_id", "seconds", "engine"}
        assert_close(o.array, expected)


def test_bad_batch_tasks_are_refused_and_the_worker_keeps_serving(proxy, rng):
    batch = rng.standard_normal((3, 10, 9, 1)).astype(np.float32)
    bank = rng.standard_normal((2, 3, 3, 1)).astype(np.float32)
    proxy.put_blob("bank", Blob.bank(bank).to_wire())
    good = batch_task(0, (0, 3), (0, 8), (0, 2), bands(batch, (0, 3), (0, 8), 3))
    with SharedArray.create(batch.shape, "float32") as shared_in, \
            SharedArray.create((3, 2, 8, 7), "float32") as shared_out:
        bad = [
            (batch_task(1, (2, 2), (0, 8), (0, 2), bands(batch, (0, 3), (0, 8), 3)), "images .* empty"),
            (batch_task(1, (0, 3), (0, 8), (0, 2), bands(batch, (0, 2), (0, 8), 3)), "expected 3 images"),
            (batch_task(1, (0, 1), (0, 8), (0, 2), {"array": pack(batch[0, :10])}), "expected 1 images"),
            (batch_task(1, (2, 4), (0, 8), (0, 2), {"shm": shared_in.descriptor()}), r"images \[2, 4\)"),
            (batch_task(1, (0, 3), (0, 8), (0, 2), {"shm": shared_in.descriptor()},
                        output={"shm": shared_out.descriptor() | {"shape": [2, 8, 7]}}),
             "cannot hold images"),
            (good | {"images": [0, "x"]}, "images"),
        ]
        for record, match in bad:
            with pytest.raises(ShapeError, match=match):
                proxy.correlate(record)
            assert_close(unpack(proxy.correlate(good)["result"]), batch_reference(batch, bank))


def test_kernel_spectra_are_made_once_per_bank_and_dropped_with_it(worker, proxy, rng, spectra_made):
    batch = rng.standard_normal((4, 20, 20, 3)).astype(np.float32)
    bank = rng.standard_normal((5, 5, 5, 3)).astype(np.float32)
    proxy.put_blob("bank", Blob.bank(bank).to_wire())
    record = batch_task(0, (0, 4), (0, 16), (0, 5), bands(batch, (0, 4), (0, 16), 5), engine="fft")
    first = unpack(proxy.correlate(record)["result"])
    made = len(spectra_made)
    assert made >= 1
    # Again, and for a kernel group of the same bank: its spectra come from the cache.
    assert np.array_equal(unpack(proxy.correlate(record)["result"]), first)
    group = unpack(proxy.correlate(record | {"kernels": [1, 3]})["result"])
    assert_close(group, batch_reference(batch, bank[1:3]))
    assert len(spectra_made) == made
    assert len(worker.worker._spectra) == 1
    # Counted in the blob cache's bytes, within its budget.
    assert worker.worker._blobs.nbytes > bank.nbytes
    assert proxy.drop_blob("bank") is True
    gc.collect()
    assert len(worker.worker._spectra) == 0
    proxy.put_blob("bank", Blob.bank(bank).to_wire())
    assert np.array_equal(unpack(proxy.correlate(record)["result"]), first)
    assert len(spectra_made) == 2 * made  # a bank put again starts with no spectra


def test_spectra_never_push_the_blob_cache_over_its_budget(start_worker, rng, spectra_made):
    config = Config(environ={}, memory_budget=4 * 60_000)  # blobs get 60 kB
    handle = start_worker(config=config)
    batch = rng.standard_normal((2, 30, 30, 2)).astype(np.float32)
    bank = rng.standard_normal((8, 5, 5, 2)).astype(np.float32)  # 1600 bytes; spectra of 30x30 > 60 kB
    with worker_proxy(handle.uri, config, timeout=30) as proxy:
        proxy.put_blob("bank", Blob.bank(bank).to_wire())
        record = batch_task(0, (0, 2), (0, 26), (0, 8), bands(batch, (0, 2), (0, 26), 5), engine="fft")
        for _ in range(2):
            assert_close(unpack(proxy.correlate(record)["result"]), batch_reference(batch, bank))
        assert proxy.info()["banks"] == ["bank"]
    cache = handle.worker._blobs
    assert cache.nbytes <= cache.max_bytes
    assert len(spectra_made) == 2  # too big to keep: made again per task, never cached
