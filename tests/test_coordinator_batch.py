"""Coordinator.correlate(..., batch=True): the plan (images, rows, kernel groups), results against the float64
reference and bitwise against rmidl.correlate, out= on every path, options checked before any work, and
kernel spectra a worker keeps for the next batch on the same bank."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_close, batch_reference

import rmidl
from rmidl.client import Coordinator
from rmidl.client.cost import Capacity
from rmidl.client.localcluster import LocalCluster
from rmidl.client.planning import plan
from rmidl.errors import DTypeError, OptionError, ShapeError
from rmidl.validate import MODES


def covered_once(tasks, n_images, n_kernels, out_h) -> bool:
    counts = np.zeros((n_images, n_kernels, out_h), int)
    for task in tasks:
        counts[slice(*task.images), slice(*task.kernels), slice(*task.rows)] += 1
    return bool((counts == 1).all())


# -- the plan -----------------------------------------------------------------------------------------------
def test_a_large_batch_is_split_by_whole_images_for_every_core():
    consumers = [Capacity("local", 20.0), Capacity("w1", 40.0, cores=2), Capacity("w2", 40.0, cores=2)]
    job = plan((25, 85, 85), (25, 11, 11, 25), consumers, images=48)
    assert job.images > 1 and job.band == 85 and job.group == 25
    assert len(job.tasks) >= 5  # at least one task per core of every consumer
    assert covered_once(job.tasks, 48, 25, 85)


def test_a_small_batch_is_split_by_rows_and_kernel_groups():
    consumers = [Capacity("local", 20.0, cores=4), Capacity("w1", 40.0, cores=4)]
    job = plan((64, 120, 90), (64, 5, 5, 3), consumers, images=2)
    assert job.images == 1 and (job.band < 120 or job.group < 64)
    assert len(job.tasks) >= 8
    assert covered_once(job.tasks, 2, 64, 120)


@pytest.mark.parametrize("seed", range(6))
def test_batch_plans_cover_the_output_once_within_their_limits(seed):
    rng = np.random.default_rng(seed)
    n, k, out_h, out_w, kh = (int(x) for x in rng.integers([1, 1, 1, 1, 1], [60, 40, 90, 90, 9]))
    max_task = int(rng.integers(4 * out_w, 4 * k * out_h * out_w * 3))
    max_rows = int(rng.integers(1, out_h + 1))
    consumers = [Capacity("w", 30.0, cores=int(rng.integers(1, 9)))]
    job = plan((k, out_h, out_w), (k, kh, 3, 2), consumers, images=n, max_task_bytes=max_task,
               max_band_rows=max_rows, min_tasks=int(rng.integers(1, 30)))
    assert covered_once(job.tasks, n, k, out_h)
    for task in job.tasks:
        (n0, n1), (r0, r1) = task.images, task.rows
        assert task.out_elements(out_w) * 4 <= max_task
        assert (n1 - n0) * (r1 - r0 + kh - 1) <= max_rows + kh - 1  # the input of one band at most


# -- on a cluster -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    """Two single-thread workers shared by this module's cluster tests; none stops a worker of it."""
    with LocalCluster(workers=2, threads_per_worker=1) as running:
        yield running


def cases():
    """(N, (H, W, C), (kh, kw), K): channels 1..25, odd/even/non-square kernels, batches of 1..40."""
    rng = np.random.default_rng(14)
    sampled = []
    for _ in range(8):
        channels = int(rng.choice([1, 2, 3, 8, 25]))
        h, w = (int(x) for x in rng.integers(6, 30, size=2))
        kh, kw = int(rng.integers(1, min(h, 9) + 1)), int(rng.integers(1, min(w, 9) + 1))
        sampled.append((int(rng.integers(1, 13)), (h, w, channels), (kh, kw), int(rng.integers(1, 12))))
    edges = [(40, (12, 11, 3), (3, 3), 5), (1, (60, 48, 25), (11, 11), 25), (3, (20, 16, 4), (4, 6), 7)]
    return [*sampled, *edges]


@pytest.mark.parametrize("case", cases(), ids=str)
def test_batches_on_the_cluster_match_the_reference_and_rmidl(cluster, case):
    n, image_shape, kernel_hw, k = case
    rng = np.random.default_rng(hash(case) % 2**32)
    images = rng.standard_normal((n, *image_shape)).astype(np.float32)
    bank = rng.standard_normal((k, *kernel_hw, image_shape[2])).astype(np.float32)
    shared = n % 2 == 0  # both data planes over the cases
    with Coordinator(cluster, local_threads=1, shared_memory=shared, min_tasks=6) as coordinator:
        for mode in MODES:
            result = coordinator.correlate(images, bank, batch=True, mode=mode)
            assert_close(result, batch_reference(images, bank, mode))
        # The direct engine sums in one order whatever the split: bit for bit rmidl's result.
        mode = MODES[n % len(MODES)]
        direct = coordinator.correlate(images, bank, batch=True, mode=mode, engine="direct")
        assert np.array_equal(direct, rmidl.correlate(images, bank, batch=True, mode=mode, engine="direct"))
        assert_close(coordinator.convolve(images, bank, batch=True, mode="same"),
                     batch_reference(images, bank, "same", flip=True))
        assert coordinator.last_job()["shared_memory"] is shared


@pytest.mark.parametrize("shared_memory", [True, False])
@pytest.mark.parametrize("layout", ["c", "fortran", "strided"])
def test_results_land_in_the_callers_out_on_every_path(cluster, rng, shared_memory, layout):
    images = rng.standard_normal((6, 18, 15, 2)).astype(np.float32)
    bank = rng.standard_normal((4, 3, 4, 2)).astype(np.float32)
    expected = batch_reference(images, bank, "same")
    if layout == "fortran":
        out = np.zeros(expected.shape, np.float32, order="F")
    elif layout == "strided":
        out = np.zeros((*expected.shape[:3], expected.shape[3] * 2), np.float32)[..., ::2]
    else:
        out = np.zeros(expected.shape, np.float32)
    with Coordinator(cluster, local_threads=1, shared_memory=shared_memory, min_tasks=8) as coordinator:
        assert coordinator.correlate(images, bank, batch=True, mode="same", out=out) is out
        assert_close(out, expected)
        assert_close(coordinator.correlate(images, bank, batch=True, mode="same"), expected)
        assert coordinator.last_job()["shared_memory"] is shared_memory


def test_an_out_over_the_images_gets_the_right_result(cluster, rng):
    buffer = rng.standard_normal((5, 3, 12, 9)).astype(np.float32)
    images = buffer[:, 0]  # the first map of each image's output is the image itself
    bank = rng.standard_normal((3, 1, 1)).astype(np.float32)
    expected = batch_reference(images, bank, "valid")
    with Coordinator(cluster, local_threads=1, min_tasks=10) as coordinator:
        assert coordinator.correlate(images, bank, batch=True, out=buffer) is buffer
    assert_close(buffer, expected)


def test_an_empty_batch_needs_nobody(cluster):
    with Coordinator(cluster, local_threads=0) as coordinator:
        got = coordinator.correlate(np.ones((0, 8, 9, 2)), np.ones((3, 2, 2, 2), np.float32), batch=True)
        assert got.shape == (0, 3, 7, 8) and coordinator.last_job() == {}


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"batch": "yes"}, OptionError, "batch='yes' must be True or False"),
    ({"batch": True, "engine": "fast"}, OptionError, "engine 'fast'"),
    ({"batch": True, "mode": "wrap"}, OptionError, "mode 'wrap'"),
    ({"batch": True, "out": np.empty((4, 2, 8, 7), np.float32)}, ShapeError,
     r"\(4, 2, 8, 7\).*\(4, 2, 6, 7\)"),
    ({"batch": True, "out": np.empty((4, 2, 6, 7))}, DTypeError, "float64"),
    ({"batch": False}, ShapeError, "did you mean batch=True"),
])
def test_bad_batch_options_are_refused_before_any_work(nameserver, start_worker, cluster_config, options,
                                                       error, match):
    handle = start_worker()
    images, bank = np.ones((4, 8, 9), np.float32), np.ones((2, 3, 3), np.float32)
    for local in (0, 1):
        with Coordinator(nameserver, local_threads=local, config=cluster_config) as coordinator:
            with pytest.raises(error, match=match):
                coordinator.correlate(images, bank, **options)
            assert coordinator.last_job() == {}
    info = handle.worker.info()
    assert info["banks"] == [] and info["tasks_done"] == 0  # no bank sent, no task run


def test_a_second_batch_on_the_same_bank_reuses_the_workers_kernel_spectra(nameserver, start_worker,
                                                                          cluster_config, rng, spectra_made):
    made = spectra_made
    handle = start_worker()  # in this process: its engine calls are counted
    images = rng.standard_normal((16, 24, 24, 8)).astype(np.float32)
    bank = rng.standard_normal((12, 7, 7, 8)).astype(np.float32)
    expected = batch_reference(images, bank, "valid")
    with Coordinator(nameserver, local_threads=0, config=cluster_config) as coordinator:
        assert_close(coordinator.correlate(images, bank, batch=True, engine="fft"), expected)
        first = len(made)
        assert first >= 1 and coordinator.last_job()["images"] > 1  # whole images: one FFT size
        assert_close(coordinator.correlate(images, bank, batch=True, engine="fft"), expected)
        assert len(made) == first  # the second batch transformed no kernel
        other = rng.standard_normal((16, 24, 24, 8)).astype(np.float32)
        assert_close(coordinator.correlate(other, bank, batch=True, engine="fft"),
                     batch_reference(other, bank, "valid"))
        assert len(made) == first  # new images, same bank: still none
    assert handle.worker.info()["engines"] == {"fft": 3 * coordinator.last_job()["tasks"]}
