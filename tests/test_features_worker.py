"""The features contract on its own: the task and reply records, the network blob, the worker method."""

from __future__ import annotations

import gc
from pathlib import Path

import msgpack
import numpy as np
import pytest

from rmidl.datasets import open_dataset
from rmidl.errors import BankError, BudgetExceeded, ImageReadError, NonFiniteInput, ShapeError
from rmidl.network import Network
from rmidl.remote.blobs import Blob
from rmidl.remote.contract import BulkTicket
from rmidl.remote.features import FeaturesReply, FeaturesTask
from rmidl.remote.transport import worker_proxy

NET = Network.from_spec("3x3x3:relu:max2,2x3x3:tanh:avg2")
BLOB = Blob.network(NET)


def over_the_wire(record: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False)


def test_the_network_blob_is_keyed_by_what_computes() -> None:
    respelled = Network.from_spec("3x3x3:relu:max2:valid,2x3x3:avg2:tanh")
    assert Blob.network(respelled).content_id == BLOB.content_id
    assert Blob.network(Network.from_spec(NET.spec, seed=1)).content_id != BLOB.content_id
    back = Blob.from_wire(over_the_wire(BLOB.to_wire()), blob_id="n", max_bytes=1 << 20).as_network()
    assert back == NET and back.fingerprint == NET.fingerprint
    with pytest.raises(ShapeError, match="bank blob, not a network"):
        Blob.bank(np.ones((1, 2, 2, 1), np.float32)).as_network()


@pytest.mark.parametrize("source", ["array", "dataset"])
def test_a_features_task_and_its_reply_parse_back(rng, source) -> None:
    data = rng.random((3, 8, 9), dtype=np.float32) if source == "array" else {"format": "rmidl.dataset"}
    task = FeaturesTask(4, BLOB.content_id, (0, 2), (5, 6, 7), data, "bulk")
    back = FeaturesTask.from_wire(over_the_wire(task.to_wire()), max_bytes=1 << 20)
    assert (back.task_id, back.network_id, back.stages, back.ids, back.output) == (
        4, BLOB.content_id, (0, 2), (5, 6, 7), "bulk")
    if source == "array":
        np.testing.assert_array_equal(back.source, data)
    else:
        assert back.source == data
    features = rng.random((2, 5), dtype=np.float32)
    for result in (features, BulkTicket("t" * 43, 40, (2, 5), "float32")):
        reply = FeaturesReply(4, 0.5, (5, 7), {"LOAD": 0.1, "CNP1": 0.2}, ((6, "truncated"),), result)
        parsed = task.parse_reply(over_the_wire(reply.to_wire()), max_bytes=1 << 20)
        assert (parsed.ids, parsed.bad, dict(parsed.timings)) == ((5, 7), ((6, "truncated"),),
                                                                 {"LOAD": 0.1, "CNP1": 0.2})


def _wire(**changes) -> dict:
    wire = FeaturesTask(0, "n", (0, 1), (1, 2), np.ones((2, 4, 4), np.float32)).to_wire()
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not None}


@pytest.mark.parametrize(("wire", "match"), [
    (_wire(stages=None), "missing stages"),
    (_wire(stages=[1, 1]), r"stages \[1, 1\) are empty"),
    (_wire(ids=[1, 1]), "distinct non-negative"),
    (_wire(ids=[-1, 2]), "distinct non-negative"),
    (_wire(ids=[1]), r"input of shape \(2, 4, 4\) does not hold the 1"),
    (_wire(input={"dataset": {}, "array": {}}), "input must be"),
    (_wire(input={"dataset": {"format": "x"}}, stages=[1, 2]), "only enters stage 0"),
    (_wire(input={"dataset": {"format": "x"}}, ids=[]), "description .dict. of some images"),
    (_wire(output="shm"), "is not 'inline' or 'bulk'"),
    (_wire(priority=1), r"unknown field\(s\) priority"),
])
def test_a_malformed_features_task_is_refused_naming_the_field(wire, match) -> None:
    with pytest.raises(ShapeError, match=match):
        FeaturesTask.from_wire(wire, max_bytes=1 << 20)


def test_a_reply_for_other_images_is_refused() -> None:
    task = FeaturesTask(3, "n", (0, 1), (1, 2), np.ones((2, 4, 4), np.float32))
    for ids, bad in [((1,), ()), ((1, 2, 3), ()), ((1,), ((3, "x"),))]:
        reply = FeaturesReply(3, 0.1, ids, {}, bad, np.ones((len(ids), 2), np.float32)).to_wire()
        with pytest.raises(ShapeError, match="other images than its batch"):
            task.parse_reply(reply, max_bytes=1 << 20)
    with pytest.raises(ShapeError, match="names task 4"):
        task.parse_reply(FeaturesReply(4, 0.1, (1, 2)).to_wire(), max_bytes=1 << 20)


@pytest.fixture
def proxy(start_worker, cluster_config):
    handle = start_worker()
    with worker_proxy(handle.uri, cluster_config, timeout=30) as p:
        yield p


def call(proxy, task: FeaturesTask) -> FeaturesReply:
    return task.parse_reply(proxy.features(task.to_wire()), max_bytes=1 << 24)


def test_the_worker_runs_stages_on_images_maps_and_files(proxy, image_folder: Path) -> None:
    dataset = open_dataset(image_folder)
    images = dataset.read().images
    with pytest.raises(BankError, match="not cached"):
        call(proxy, FeaturesTask(0, BLOB.content_id, (0, 2), tuple(range(10)), images))
    proxy.put_blob(BLOB.content_id, BLOB.to_wire())
    whole = call(proxy, FeaturesTask(0, BLOB.content_id, (0, 2), tuple(range(10)), images))
    np.testing.assert_array_equal(whole.result, NET.forward_batch(images, threads=1))
    assert {"CNP1", "CNP2", "FLAT", "CNP1.conv"} <= set(whole.timings) and "LOAD" not in whole.timings
    first = call(proxy, FeaturesTask(1, BLOB.content_id, (0, 1), tuple(range(10)), images))
    second = call(proxy, FeaturesTask(2, BLOB.content_id, (1, 2), tuple(range(10)), first.result))
    expected = NET.stages[1].forward(first.result, threads=1).reshape(10, -1)
    np.testing.assert_array_equal(second.result, expected)
    view = dataset[3:6]
    read = call(proxy, FeaturesTask(3, BLOB.content_id, (0, 2), (3, 4, 5), view.to_dict()))
    assert read.ids == (3, 4, 5) and "LOAD" in read.timings
    np.testing.assert_array_equal(read.result, NET.forward_batch(images[3:6], threads=1))


def test_the_worker_refuses_bad_batches_and_keeps_serving(proxy, image_folder: Path, tmp_path) -> None:
    proxy.put_blob(BLOB.content_id, BLOB.to_wire())
    images = open_dataset(image_folder).read().images[:2]
    nan = images.copy()
    nan[0, 1, 1] = np.nan
    with pytest.raises(NonFiniteInput, match="NaN"):
        call(proxy, FeaturesTask(0, BLOB.content_id, (0, 2), (0, 1), nan))
    maps = np.ones((2, 2, 11, 9), np.float32)  # stage 2 takes 3 maps
    with pytest.raises(ShapeError, match=r"3 channel\(s\) but its input has 2"):
        call(proxy, FeaturesTask(0, BLOB.content_id, (1, 2), (0, 1), maps))
    with pytest.raises(ShapeError, match="go past the network's last stage"):
        call(proxy, FeaturesTask(0, BLOB.content_id, (0, 3), (0, 1), images))
    bad = tmp_path / "c0"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    description = open_dataset(image_folder)[:1].to_dict()
    description["source"]["paths"] = [str(bad / "x.png")]
    with pytest.raises(ImageReadError, match=r"x\.png"):
        call(proxy, FeaturesTask(0, BLOB.content_id, (0, 2), (0,), description))
    skipped = call(proxy, FeaturesTask(0, BLOB.content_id, (0, 2), (0,), description | {"skip_bad": True}))
    assert skipped.ids == () and skipped.bad[0][0] == 0 and skipped.result.shape == (0, 24)
    empty = call(proxy, FeaturesTask(0, BLOB.content_id, (0, 2), (), np.empty((0, 24, 20), np.float32)))
    assert empty.ids == () and empty.result.shape == (0, 24)
    assert proxy.ping() == "pong"


def test_an_inline_result_over_the_message_limit_is_refused_before_sending(start_worker, cluster_config,
                                                                          rng) -> None:
    handle = start_worker(config=cluster_config.replace(max_message_size=200_000))
    net = Network.from_spec("8x1x1:linear:nopool")
    blob = Blob.network(net)
    with worker_proxy(handle.uri, cluster_config, timeout=30) as proxy:
        proxy.put_blob(blob.content_id, blob.to_wire())
        images = rng.random((1, 80, 80), dtype=np.float32)  # 25 KB in, 200 KB of features out
        with pytest.raises(BudgetExceeded, match="max_message_size"):
            call(proxy, FeaturesTask(0, blob.content_id, (0, 1), (0,), images))


def test_what_a_network_keeps_is_counted_in_the_blob_cache_and_goes_with_its_blob(
        start_worker, cluster_config, rng, wait_until) -> None:
    net = Network.from_spec("16x21x21:relu:max2")  # 21x21 kernels on 100x100 images: the fft engine
    blob = Blob.network(net)
    bank = Blob.bank(rng.standard_normal((4, 3, 3, 1)).astype(np.float32))
    handle = start_worker()
    cache, networks = handle.worker._blobs, handle.worker._features._networks
    images = rng.random((2, 100, 100), dtype=np.float32)
    with worker_proxy(handle.uri, cluster_config, timeout=30) as proxy:
        proxy.put_blob(blob.content_id, blob.to_wire())
        proxy.put_blob("bank", bank.to_wire())
        before = cache.nbytes
        reply = call(proxy, FeaturesTask(0, blob.content_id, (0, 1), (0, 1), images))
        np.testing.assert_array_equal(reply.result, net.forward_batch(images, threads=1))
        (built,) = networks.values()
        assert built.kept_bytes > 0  # the stage's kernel spectra, beside its own copy of the bank
        assert cache.nbytes == before + built.kept_bytes + built.stages[0].bank.nbytes
        assert proxy.drop_blob(blob.content_id) is True
        del built
        # the thread that served the task may still be unwinding its frame (holding the blob) after replying
        wait_until(lambda: gc.collect() >= 0 and len(networks) == 0, timeout=10, what="the network freed")
        assert cache.nbytes == bank.nbytes


@pytest.mark.parametrize(("blob_budget", "kept", "bank_stays"),
                         [(400_000, False, True), (800_000, True, False)])
def test_a_network_keeps_spectra_within_the_blob_cache_room_and_makes_room_for_them(
        start_worker, cluster_config, rng, blob_budget, kept, bank_stays) -> None:
    """Its spectra (~650 kB for 100x100 images) are kept only within the room beside its blob; kept,
    they count, and an older bank (200 kB) makes room for them (the newest blob always stays)."""
    net = Network.from_spec("16x21x21:relu:max2")
    blob = Blob.network(net)
    bank = Blob.bank(rng.standard_normal((500, 10, 10, 1)).astype(np.float32))
    handle = start_worker(config=cluster_config.replace(memory_budget=4 * blob_budget))  # blobs get 1/4
    images = rng.random((1, 100, 100), np.float32)
    with worker_proxy(handle.uri, cluster_config, timeout=30) as proxy:
        proxy.put_blob("bank", bank.to_wire())
        proxy.put_blob(blob.content_id, blob.to_wire())
        reply = call(proxy, FeaturesTask(0, blob.content_id, (0, 1), (0,), images))
        np.testing.assert_array_equal(reply.result, net.forward_batch(images, threads=1))
        (built,) = handle.worker._features._networks.values()
        spectra = built.kept_bytes
        assert (spectra > 0) is kept and spectra <= blob_budget - blob.nbytes
        assert (proxy.info()["banks"] == ["bank"]) is bank_stays
