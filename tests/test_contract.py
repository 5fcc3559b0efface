"""The executable contract on its own: every record's one build/parse pair, blobs, the worker's LRU cache."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from rmidl.errors import (
    BankError,
    BudgetExceeded,
    DTypeError,
    InputError,
    NonFiniteInput,
    OptionError,
    ShapeError,
)
from rmidl.network import Network, network_parts
from rmidl.remote.blobs import Blob
from rmidl.remote.contract import BulkTicket, CorrelateReply, CorrelateTask, ShmRef
from rmidl.server.cache import LruCache


def over_the_wire(record: dict) -> dict:
    """What msgpack (Pyro5's serializer) hands the receiver."""
    return msgpack.unpackb(msgpack.packb(record, use_bin_type=True), raw=False)


SHM = ShmRef("rmidl_abc", (30, 20, 2), "float32", 1234, 7, "ab" * 32)
SHM_FIELDS = {"pid": 1, "fd": 3, "token": "ab" * 32}
NET_TEXT = network_parts(Network.from_spec("1x2x2"))[0]


@pytest.mark.parametrize("source_kind", ["array", "shm"])
@pytest.mark.parametrize("output", ["inline", "bulk", SHM])
def test_a_task_parses_back_to_itself(rng, source_kind, output):
    band = rng.standard_normal((12, 20, 2)).astype(np.float32)
    source = band if source_kind == "array" else SHM
    task = CorrelateTask(3, "bank-x", (1, 4), (5, 15), source, output, "fft")
    back = CorrelateTask.from_wire(over_the_wire(task.to_wire()), max_bytes=1 << 20)
    assert (back.task_id, back.bank_id, back.kernels, back.rows, back.output, back.engine) == (
        3, "bank-x", (1, 4), (5, 15), output, "fft")
    if source_kind == "array":
        np.testing.assert_array_equal(back.source, band)
    else:
        assert back.source == SHM


def _task_wire(**changes) -> dict:
    wire = CorrelateTask(0, "b", (0, 2), (0, 4), SHM, "inline").to_wire()
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not None}


@pytest.mark.parametrize(
    ("wire", "error", "match"),
    [
        ("task", ShapeError, "task must be a dict"),
        (_task_wire(rows=None), ShapeError, "task is missing rows"),
        (_task_wire(priority=1), ShapeError, r"unknown field\(s\) priority"),
        (_task_wire(task_id=True), ShapeError, "task_id must be an int"),
        (_task_wire(bank_id=""), BankError, "non-empty string"),
        (_task_wire(kernels=[0, 2, 4]), ShapeError, r"kernels must be \[start, stop\]"),
        (_task_wire(kernels=[2, 2]), ShapeError, r"kernels \[2, 2\) are empty"),
        (_task_wire(rows=[-1, 3]), ShapeError, r"rows \[-1, 3\) are empty or negative"),
        (_task_wire(input={"shm": {"name": "rmidl_x", "shape": [2], "dtype": "int8"} | SHM_FIELDS}),
         DTypeError, "int8"),
        (_task_wire(input={"shm": {"name": 7, "shape": [2], "dtype": "float32"} | SHM_FIELDS}), ShapeError,
         "name"),
        (_task_wire(input={"shm": {"name": "rmidl_x", "shape": [2], "dtype": "float32"}}), ShapeError,
         "missing fd, pid, token"),
        (_task_wire(input={"shm": {"name": "rmidl_x", "shape": [2], "dtype": "float32"} | SHM_FIELDS
                           | {"pid": "1"}}), ShapeError, "pid must be an int"),
        (_task_wire(input={"array": {"dtype": "float32", "shape": [1 << 30], "data": b""}}), BudgetExceeded,
         "exceeds the limit"),
        (_task_wire(output={"shm": SHM.to_wire(), "also": 1}), ShapeError, "is not 'inline', 'bulk'"),
        (_task_wire(engine="fast"), OptionError, "engine 'fast'"),
    ],
)
def test_a_malformed_task_is_refused_naming_the_field(wire, error, match):
    with pytest.raises(error, match=match):
        CorrelateTask.from_wire(wire, max_bytes=1 << 20)


@pytest.mark.parametrize("result", ["array", BulkTicket("t" * 43, 96, (2, 3, 4), "float32"), None])
def test_a_reply_parses_back_to_itself(rng, result):
    array = rng.standard_normal((2, 3, 4))
    reply = CorrelateReply(9, 0.25, "lowering", array if result == "array" else result)
    task = CorrelateTask(9, "b", (0, 2), (0, 3), SHM, "inline")
    back = task.parse_reply(over_the_wire(reply.to_wire()), max_bytes=1 << 20)
    assert (back.task_id, back.seconds, back.engine) == (9, 0.25, "lowering")
    if result == "array":
        np.testing.assert_array_equal(back.result, array)
    else:
        assert back.result == result


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"task_id": 8}, "reply to task 9 names task 8"),
        ({"seconds": "fast"}, "seconds must be a number"),
        ({"ticket": "t" * 43, "nbytes": 95, "shape": [2, 3, 4], "dtype": "float32"}, "95 bytes do not match"),
        ({"ticket": "t" * 43}, "needs ticket, nbytes, shape and dtype"),
        ({"extra": 1}, r"unknown field\(s\) extra"),
    ],
)
def test_a_malformed_reply_is_refused(changes, match):
    task = CorrelateTask(9, "b", (0, 2), (0, 3), SHM, "inline")
    with pytest.raises(ShapeError, match=match):
        task.parse_reply(CorrelateReply(9, 0.1, "fft").to_wire() | changes, max_bytes=1 << 20)


def test_blob_content_ids_follow_the_content(rng):
    bank = rng.standard_normal((4, 3, 3, 1)).astype(np.float32)
    same = Blob.bank(bank.copy())
    assert Blob.bank(bank).content_id == same.content_id and same.content_id.startswith("bank-")
    changed = bank.copy()
    changed[0, 0, 0, 0] += 1
    for other in (changed, bank.astype(np.float64), bank.reshape(2, 6, 3, 1), bank[:, ::-1]):
        assert Blob.bank(other).content_id != same.content_id
    assert Blob("bank", {"bank": bank}, {"x": 1}).content_id != same.content_id


def test_a_blob_parses_back_after_its_kinds_check(rng):
    bank = rng.standard_normal((4, 3, 3, 2)).astype(np.float64)
    wire = over_the_wire(Blob.bank(bank).to_wire())
    assert Blob.claimed_nbytes(wire) == bank.nbytes
    back = Blob.from_wire(wire, blob_id="b", max_bytes=1 << 20)
    assert back.kind == "bank" and back.nbytes == bank.nbytes
    np.testing.assert_array_equal(back.arrays["bank"], bank)


@pytest.mark.parametrize(
    ("wire", "error", "match"),
    [
        ({"kind": "bank", "arrays": {}}, ShapeError, "exactly 'kind', 'arrays' and 'settings'"),
        ({"kind": "gadget", "arrays": {}, "settings": {}}, OptionError, "'gadget'; this worker knows bank"),
        ({"kind": "network", "arrays": {}, "settings": {}}, ShapeError, "exactly one setting, 'network'"),
        (Blob("network", {}, {"network": "{"}).to_wire(), InputError, "unreadable settings"),
        (Blob("network", {"bank_1": np.ones((1, 2, 2, 1))}, {"network": NET_TEXT}).to_wire(), InputError,
         r"stages need \['bank_0'\]"),
        (Blob("network", {"bank_0": np.full((1, 2, 2, 1), np.nan)}, {"network": NET_TEXT}).to_wire(),
         NonFiniteInput, "bank_0 contains NaN"),
        (Blob("network", {"bank_0": np.ones((1, 2, 2, 3))}, {"network": NET_TEXT}).to_wire(), ShapeError,
         r"3 channel\(s\) but its input has 1"),
        ({"kind": "bank", "arrays": [], "settings": {}}, ShapeError, "arrays must map names"),
        ({"kind": "bank", "arrays": {}, "settings": {"x": [1]}}, ShapeError, "settings must map names"),
        ({"kind": "bank", "arrays": {}, "settings": {}}, ShapeError, "one array named 'bank'"),
        (Blob("bank", {"bank": np.ones((2, 3))}).to_wire(), ShapeError, r"non-empty \(K, kh, kw, C\)"),
        (Blob.bank(np.full((1, 2, 2, 1), np.inf)).to_wire(), NonFiniteInput, "'b' contains NaN or Inf"),
    ],
)
def test_a_malformed_blob_is_refused(wire, error, match):
    with pytest.raises(error, match=match):
        Blob.from_wire(wire, blob_id="b", max_bytes=1 << 20)


def test_the_lru_cache_is_bounded_by_count_and_bytes_and_keeps_the_newest():
    cache: LruCache[str, bytes] = LruCache(3, 10, len, keep=1)
    assert cache.put("a", b"1234") == [] and cache.put("b", b"1234") == []
    assert cache.get("a") == b"1234"  # now newest: b goes first
    assert cache.put("c", b"1234") == [b"1234"] and cache.keys() == ["a", "c"] and cache.nbytes == 8
    assert cache.put("d", b"x" * 20) == [b"1234", b"1234"]  # over the bytes alone, but the newest stays
    assert cache.keys() == ["d"] and cache.nbytes == 20
    for key in "efg":
        cache.put(key, b"1")
    assert cache.keys() == ["e", "f", "g"]  # by count
    assert cache.pop_where(lambda v: v == b"1") == [b"1"] * 3 and len(cache) == 0 and cache.nbytes == 0


def test_replies_refuse_seconds_and_losses_that_are_not_numbers() -> None:
    from rmidl.remote.features import FeaturesReply
    from rmidl.remote.gradient import GradientReply

    features = FeaturesReply(3, 0.5, (0, 1), {"CNP1": 0.25}).to_wire()
    assert FeaturesReply.from_wire(features, max_bytes=1 << 20).timings == {"CNP1": 0.25}
    refusals = [({"seconds": -1.0}, "features reply seconds must be a non-negative number, got -1.0"),
                ({"seconds": True}, "features reply seconds must be a non-negative number"),
                ({"timings": {"CNP1": float("nan")}}, "timing 'CNP1' must be a non-negative number")]
    for change, text in refusals:
        with pytest.raises(ShapeError, match=text):
            FeaturesReply.from_wire({**features, **change}, max_bytes=1 << 20)
    gradient = GradientReply(4, 0.5, (0,), (1.5,), (2,), (1,)).to_wire()
    assert GradientReply.from_wire(gradient, max_bytes=1 << 20).loss_sums == (1.5,)
    for change, text in [({"seconds": "slow"}, "gradient reply seconds must be a number, got 'slow'"),
                         ({"loss_sums": [None]}, "gradient reply loss must be a number, got None")]:
        with pytest.raises(ShapeError, match=text):
            GradientReply.from_wire({**gradient, **change}, max_bytes=1 << 20)
