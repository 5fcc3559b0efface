"""Coordinator.features: a dataset through a network on the local pool and on workers, exact and in order."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import wait_for, write_image_folder
from reference import network_reference

import rmidl
from rmidl.client import Coordinator
from rmidl.client.cost import Capacity
from rmidl.client.jobs import features as features_job
from rmidl.client.jobs.features import MAX_AUTO_BATCH, FeaturesJob
from rmidl.client.jobs.loader import BatchLoader
from rmidl.config import Config
from rmidl.datasets import open_dataset
from rmidl.errors import BudgetExceeded, ImageReadError, InputError, OptionError, ShapeError
from rmidl.featureset import FeatureSet
from rmidl.network import Network

NETS = {
    "full": "3x3x3:relu:max2,2x3x3:tanh:avg2",
    "depthwise": "3x5x5:relu:max2:dw,3x3x3:sigmoid:max2:dw",
    "same mode": "2x3x3:abstanh:max3s2:same,4x2x2:linear:nopool",
}


def local_features(dataset, net, **options) -> FeatureSet:
    with Coordinator(local_threads=1, config=Config(environ={})) as coordinator:
        return coordinator.features(dataset, net, **{"progress": False, **options})


@pytest.mark.parametrize("spec", NETS.values(), ids=NETS.keys())
def test_local_features_match_the_float64_reference_in_dataset_order(image_folder: Path, spec: str) -> None:
    net = Network.from_spec(spec, seed=3)
    dataset = open_dataset(image_folder)
    result = local_features(dataset, net, batch=3)
    assert result.X.dtype == np.float32 and result.X.shape == (10, net.output_shape((24, 20))[0])
    for row, image in zip(result.X, (dataset[i] for i in range(len(dataset))), strict=True):
        expected = network_reference(net, image)
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=2e-5 * np.abs(expected).max())
    assert result.labels.tolist() == [0] * 5 + [1] * 5
    assert result.classes == ("c0", "c1")
    assert result.paths == dataset.paths and result.ids.tolist() == list(range(10))
    assert result.network["fingerprint"] == net.fingerprint


def test_paths_and_specs_are_resolved_for_the_images_channels(image_folder: Path, tmp_path: Path) -> None:
    by_spec = local_features(str(image_folder), "2x3x3:relu:max2")
    saved = Network.from_spec("2x3x3:relu:max2").save(tmp_path / "net.npz")
    by_file = local_features(image_folder, saved)
    np.testing.assert_array_equal(by_spec.X, by_file.X)


@pytest.fixture
def two_workers(nameserver, start_worker) -> str:
    for _ in range(2):
        start_worker()
    return nameserver


@pytest.mark.parametrize(("load", "local", "decoded_by"), [
    ("auto", 0, {"workers"}), ("coordinator", 0, {"coordinator"}), ("workers", 1, {"workers", "coordinator"}),
    ("auto", 1, {"workers", "coordinator"}),
])
def test_workers_and_pool_give_identical_features(image_folder: Path, two_workers: str, load: str, local: int,
                                                  decoded_by: set[str]) -> None:
    net = Network.from_spec(NETS["full"], seed=1)
    expected = local_features(image_folder, net, batch=2)
    with Coordinator(two_workers, local_threads=local, config=Config(environ={})) as coordinator:
        result = coordinator.features(image_folder, net, batch=2, progress=False, load=load)
        job = coordinator.last_job()
    np.testing.assert_array_equal(result.X, expected.X)
    assert result.labels.tolist() == expected.labels.tolist()
    assert set(job["tasks_by"]) - {"local"} <= {"w0", "w1"} and sum(job["tasks_by"].values()) == 5
    assert set(job["load"]) <= decoded_by and sum(job["load"].values()) >= 5
    if local == 0:
        assert set(job["load"]) == decoded_by


def test_results_over_the_bulk_channel_and_dataset_views(image_folder: Path, two_workers: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features_job, "BULK_MIN_BYTES", 0)
    net = Network.from_spec(NETS["depthwise"])
    view = open_dataset(image_folder)[[7, 2, 9, 0, 5]]
    expected = local_features(view, net, batch=2)
    with Coordinator(two_workers, local_threads=0, config=Config(environ={})) as coordinator:
        result = coordinator.features(view, net, batch=2, progress=False, load="coordinator")
        assert coordinator.last_job()["moved_bytes"] == result.X.nbytes
    np.testing.assert_array_equal(result.X, expected.X)
    assert result.ids.tolist() == [7, 2, 9, 0, 5] and result.labels.tolist() == [1, 0, 1, 0, 1]
    full = local_features(image_folder, net)  # other batches: the batched engine may round otherwise
    np.testing.assert_allclose(result.X, full.X[[7, 2, 9, 0, 5]], rtol=2e-5, atol=2e-5 * full.X.max())


def test_npz_datasets_are_read_by_the_workers(tmp_path: Path, two_workers: str, rng) -> None:
    images = rng.random((7, 16, 18, 3), dtype=np.float32)
    np.savez(tmp_path / "set.npz", images=images, labels=np.arange(7) % 3)
    net = Network.from_spec("2x3x3:relu:max2", channels=3)
    with Coordinator(two_workers, local_threads=0, config=Config(environ={})) as coordinator:
        result = coordinator.features(tmp_path / "set.npz", net, batch=3, progress=False)
        assert coordinator.last_job()["load"] == {"workers": 3}
    # the same batches of 3 in one process give the same bits (another batching: the same to rounding)
    by_batch = [net.forward_batch(images[a : a + 3], threads=1) for a in (0, 3, 6)]
    np.testing.assert_array_equal(result.X, np.concatenate(by_batch))
    assert result.paths is None and result.classes == ("0", "1", "2")


def test_progress_counts_images(image_folder: Path) -> None:
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    def progress(done: int, total: int) -> None:
        with lock:
            seen.append((done, total))

    with Coordinator(local_threads=2, config=Config(environ={})) as coordinator:
        coordinator.features(image_folder, "2x3x3", batch=4, progress=progress)
    done = [d for d, _ in sorted(seen)]
    assert {t for _, t in seen} == {10} and done[-1] == 10
    assert sorted(np.diff([0, *done]).tolist()) == [3, 3, 4]  # batches of at most 4, as even as can be


def test_the_saved_file_is_what_train_reads(image_folder: Path, tmp_path: Path) -> None:
    result = local_features(image_folder, "2x3x3:relu:max2")
    result.save(tmp_path / "features.npz")
    with np.load(tmp_path / "features.npz", allow_pickle=False) as archive:
        assert {"X", "y", "labels", "classes", "paths", "network", "stats"} <= set(archive.files)
        np.testing.assert_array_equal(archive["X"], result.X)
        np.testing.assert_array_equal(archive["y"], archive["labels"])
    back = FeatureSet.load(tmp_path / "features.npz")
    np.testing.assert_array_equal(back.X, result.X)
    assert (back.classes, back.paths, back.stats["images"]) == (result.classes, result.paths, 10)
    assert back.network["fingerprint"] == Network.from_spec("2x3x3:relu:max2").fingerprint
    (tmp_path / "other.npz").write_bytes(b"PK not a zip")
    with pytest.raises(InputError, match=r"other\.npz"):
        FeatureSet.load(tmp_path / "other.npz")


@pytest.fixture
def with_bad_file(tmp_path: Path) -> Path:
    root = write_image_folder(tmp_path / "data", per_class=3)
    victim = root / "c1" / "img001.png"
    victim.write_bytes(victim.read_bytes()[:40])
    return root


@pytest.mark.parametrize("where", ["local pool", "workers"])
def test_bad_files_are_skipped_and_reported_or_stop_the_job(with_bad_file: Path, two_workers: str,
                                                            start_worker, where: str) -> None:
    net = Network.from_spec("2x3x3:relu:max2")
    ns, local = (None, 1) if where == "local pool" else (two_workers, 0)
    with Coordinator(ns, local_threads=local, config=Config(environ={})) as coordinator:
        skipping = open_dataset(with_bad_file, skip_bad=True)
        result = coordinator.features(skipping, net, batch=2, progress=False)
        assert len(result) == 5 and list(result.bad) == [4]
        assert "img001.png" in result.bad[4] and not any(p.endswith("c1/img001.png") for p in result.paths)
        assert result.labels.tolist() == [0, 0, 0, 1, 1]
        clean = local_features(open_dataset(with_bad_file)[[0, 1, 2, 3, 5]], net, batch=2)
        np.testing.assert_array_equal(result.X, clean.X)
        with pytest.raises(ImageReadError, match=r"img001\.png"):
            coordinator.features(open_dataset(with_bad_file), net, batch=2, progress=False)
        # the workers still serve, and compute right
        again = coordinator.features(open_dataset(with_bad_file)[[0, 1, 2, 3, 5]], net, batch=2,
                                     progress=False)
        np.testing.assert_array_equal(again.X, clean.X)


def test_bad_datasets_and_options_are_refused_before_work(tmp_path: Path, image_folder: Path) -> None:
    mixed = write_image_folder(tmp_path / "mixed", per_class=2)
    rmidl.save_image(mixed / "c0" / "z_big.png", np.zeros((30, 30), np.uint8))
    with pytest.raises(ShapeError, match=r"z_big.png' is 30x30 but the dataset's images are 20x24.*resize"):
        local_features(mixed, "2x3x3")
    assert len(local_features(open_dataset(mixed, resize=(24, 20)), "2x3x3")) == 5
    (tmp_path / "empty" / "c0").mkdir(parents=True)
    with pytest.raises(InputError, match="holds no images"):
        local_features(tmp_path / "empty", "2x3x3")
    cases = [({"batch": 0}, OptionError, "batch=0"), ({"load": "elsewhere"}, OptionError, "load='elsewhere'"),
             ({"progress": 3}, OptionError, "progress=3")]
    for options, error, text in cases:
        with pytest.raises(error, match=text):
            local_features(image_folder, "2x3x3", **options)
    with pytest.raises(ShapeError, match=r"images have 1 channel\(s\) but the network takes 3"):
        local_features(image_folder, Network.from_spec("2x3x3", channels=3))
    with pytest.raises(OptionError, match="repeats"):
        local_features(open_dataset(image_folder)[[1, 1]], "2x3x3")
    small = Config(environ={}, memory_budget=1000)
    with pytest.raises(BudgetExceeded, match="budget"), Coordinator(local_threads=1, config=small) as co:
        co.features(image_folder, "2x3x3", progress=False)


def test_auto_batches_are_bounded_whatever_the_dataset_size(tmp_path: Path, rng) -> None:
    np.savez(tmp_path / "many.npz", images=rng.random((5000, 12, 12), dtype=np.float32))
    dataset = open_dataset(tmp_path / "many.npz")
    job = FeaturesJob(dataset, Network.from_spec("1x3x3"), config=Config(environ={}))
    two = [Capacity("local", 10.0)] * 2
    assert job.auto_batch(two) == MAX_AUTO_BATCH  # tiny images: as large as allowed, no larger
    heavy = FeaturesJob(dataset[:40], Network.from_spec("64x9x9:relu:nopool:same,64x9x9:same"),
                        config=Config(environ={}))
    assert heavy.auto_batch(two) == 5  # 4 tasks per core: a slow or lost consumer costs little
    small = FeaturesJob(dataset, Network.from_spec("1x3x3"), config=Config(environ={}, memory_budget=1 << 20))
    assert small.auto_batch(two) * small.peak_bytes <= (1 << 20) // 16


def test_the_loader_decodes_ahead_a_bounded_few_in_order() -> None:
    read: list[int] = []
    with BatchLoader(lambda t: read.append(t) or t * 10, range(8), depth=2, ahead=True) as loader:
        wait_for(lambda: len(read) == 2 and loader._loading is None)
        assert [loader.get(t) for t in range(8)] == [t * 10 for t in range(8)]
    assert loader.peak_waiting == 2 and read == list(range(8))


def test_claimed_tasks_are_not_decoded_and_errors_reach_the_consumer() -> None:
    read: list[int] = []
    gate = threading.Event()

    def decode(task_id: int) -> int:
        read.append(task_id)
        if task_id == 0:
            gate.wait(10)
        if task_id == 4:
            raise ImageReadError("image 4 is broken")
        return task_id * 10

    with BatchLoader(decode, range(6), depth=4, ahead=True) as loader:
        wait_for(lambda: loader._loading == 0)
        assert loader.claim(1) is None and loader.claim(2) is None  # the workers read these themselves
        gate.set()
        assert loader.get(0) == 0  # waited for the decoder rather than decoding it twice
        assert loader.claim(3) == 30  # decoded (or being decoded) ahead: handed over, not read again
        with pytest.raises(ImageReadError, match="image 4"):
            loader.get(4)
        assert loader.get(5) == 50
        assert loader.get(0) == 0  # a retried task is decoded again, here
    assert read == [0, 3, 4, 5, 0]


PEAK_RSS = """
import sys
from rmidl.client import Coordinator
from rmidl.config import Config
from rmidl.datasets import open_dataset
with Coordinator(local_threads=2, config=Config(environ={})) as coordinator:
    for placement in ("tasks", "stages"):
        result = coordinator.features(open_dataset(sys.argv[1])[: int(sys.argv[2])], "8x9x9:relu:max8",
                                      batch=16, progress=False, placement=placement)
        assert len(result) == int(sys.argv[2])
# VmHWM, not getrusage's ru_maxrss: that one keeps the forking parent's peak across exec
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_dataset(tmp_path: Path, rng) -> None:
    """Ten times the images, the same peak RSS within 10 %, with either placement: decoded batches wait in
    bounded buffers. Decoding is far faster than the network here, so an unbounded buffer would hold
    nearly all 2000 decoded images (+31 MB over a ~120 MB process); the features themselves are +1 MB."""
    import subprocess

    if not Path("/proc/self/status").exists():
        pytest.skip("peak RSS is read from /proc (Linux)")
    import sys

    np.savez(tmp_path / "many.npz", images=rng.integers(0, 256, (2000, 64, 64), dtype=np.uint8))
    peaks = {}
    for n in (200, 2000):
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(tmp_path / "many.npz"), str(n)],
                              capture_output=True, text=True, timeout=100, check=False)
        assert done.returncode == 0, done.stderr
        peaks[n] = int(done.stdout.split()[-1])
    assert peaks[2000] <= 1.10 * peaks[200], peaks


def test_a_closed_coordinator_refuses_a_features_job(image_folder: Path) -> None:
    from rmidl.errors import ClusterError

    coordinator = Coordinator(local_threads=1, config=Config(environ={}))
    coordinator.close()
    with pytest.raises(ClusterError, match="Coordinator is closed"):
        coordinator.features(image_folder, "2x3x3", progress=False)
