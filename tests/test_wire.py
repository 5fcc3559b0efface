"""The data plane's parts on their own: wire packing, shared-memory arrays and the bulk side channel."""

from __future__ import annotations

import os
import socket
import threading
import time

import msgpack
import numpy as np
import pytest

from rmidl.errors import BudgetExceeded, DTypeError, ShapeError, WorkerLost
from rmidl.remote.bulk import TICKET_CHARS, BulkServer, fetch
from rmidl.remote.shm import SharedArray, host_id
from rmidl.remote.wire import pack, unpack

# --- wire -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 4, 6, 3), (0, 4)])
def test_pack_unpack_round_trip_through_msgpack(rng, dtype, shape):
    array = rng.standard_normal(shape).astype(dtype)
    # What Pyro5's msgpack serializer does with the dict: bytes travel as bin, unchanged.
    d = msgpack.unpackb(msgpack.packb(pack(array), use_bin_type=True), raw=False)
    back = unpack(d)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert not back.flags.writeable


def test_pack_takes_non_contiguous_and_big_endian_arrays(rng):
    array = rng.standard_normal((6, 8)).astype(">f8")[:, ::2]
    back = unpack(msgpack.unpackb(msgpack.packb(pack(array)), raw=False))
    np.testing.assert_array_equal(back, array)
    assert back.dtype == np.float64


@pytest.mark.parametrize("dtype", [np.int32, np.float16, np.complex64, bool, object])
def test_pack_refuses_other_dtypes(dtype):
    with pytest.raises(DTypeError, match="cannot send dtype"):
        pack(np.zeros(3, dtype=dtype))


def _wire(**changes):
    d = {"dtype": "float32", "shape": [2, 3], "data": bytes(24)}
    d.update(changes)
    return d


@pytest.mark.parametrize(
    ("d", "error", "match"),
    [
        (_wire(dtype="int64"), DTypeError, "'int64'"),
        (_wire(dtype=None), DTypeError, "None"),
        (_wire(shape=[2, -3]), ShapeError, r"\[2, -3\]"),
        (_wire(shape="2x3"), ShapeError, "2x3"),
        (_wire(shape=[2, 3.0]), ShapeError, "3.0"),
        (_wire(shape=[True, 3]), ShapeError, "True"),
        (_wire(shape=[1] * 9), ShapeError, "at most 8"),
        (_wire(data=bytes(20)), ShapeError, "needs 24 bytes, got 20"),
        (_wire(data="text"), ShapeError, "must be bytes"),
        (_wire(data=memoryview(bytes(48))[::2]), ShapeError, "must be contiguous"),
        ([1, 2], ShapeError, "list"),
    ],
)
def test_unpack_refuses_malformed_dicts(d, error, match):
    with pytest.raises(error, match=match):
        unpack(d)


def test_unpack_size_cap_is_checked_before_the_data():
    # The claim alone is refused: no 4 GB of data needed to find out.
    with pytest.raises(BudgetExceeded, match="4294967296 bytes exceeds the limit of 1000"):
        unpack({"dtype": "float32", "shape": [1 << 30], "data": b""}, max_bytes=1000)


# --- shared memory --------------------------------------------------------------------------------


def _shm_names() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if name.startswith("rmidl_")}


def test_shared_array_attach_sees_writes_and_owner_unlinks(rng):
    before = _shm_names()
    with SharedArray.create((4, 5, 3), "float64") as owner:
        assert not owner.array.any()
        block = SharedArray.attach(owner.descriptor())
        values = rng.standard_normal((4, 5, 3))
        block.array[1:3] = values[1:3]
        np.testing.assert_array_equal(owner.array[1:3], values[1:3])
        block.close()  # a borrower never unlinks
        assert owner.name in _shm_names()
        again = SharedArray.attach(owner.descriptor())
        np.testing.assert_array_equal(again.array[1:3], values[1:3])
        again.close()
    assert _shm_names() == before


def test_shared_array_close_with_live_view_keeps_view_valid():
    owner = SharedArray.create((3, 3), "float32")
    owner.array[:] = 7.0
    view = owner.array
    owner.close()  # unlinked, but the mapping stays while `view` lives
    assert owner.name not in _shm_names()
    assert view.sum() == 63.0
    with pytest.raises(ValueError, match="closed"):
        _ = owner.array


@pytest.mark.parametrize(
    ("descriptor", "match"),
    [
        ({"name": "../etc/passwd", "shape": [1], "dtype": "float32"}, "not an rmidl block name"),
        ({"name": "rmidl_doesnotexist", "shape": [1], "dtype": "float32"}, "does not exist"),
        ({"name": "rmidl_x", "shape": [-1], "dtype": "float32"}, "non-negative"),
    ],
)
def test_shared_array_attach_refuses_bad_descriptors(descriptor, match):
    with pytest.raises(ShapeError, match=match):
        SharedArray.attach(descriptor)


def test_shared_array_attach_of_another_users_block_is_a_cluster_error(monkeypatch):
    from rmidl.errors import ClusterError
    from rmidl.remote import shm

    with SharedArray.create((2, 2), "float32") as owner:
        real_open = shm._posixshmem.shm_open

        def as_another_user(path: str, flags: int, mode: int = 0o777) -> int:
            if path == "/" + owner.name:  # what a 0600 block of another user gives a worker
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, flags, mode=mode)

        monkeypatch.setattr(shm._posixshmem, "shm_open", as_another_user)
        with pytest.raises(ClusterError, match=f"'{owner.name}' belongs to another user"):
            SharedArray.attach(owner.descriptor())


def test_shared_array_attach_refuses_a_shape_larger_than_the_block():
    with SharedArray.create((2, 2), "float32") as owner:
        descriptor = owner.descriptor() | {"shape": [20, 20]}
        with pytest.raises(ShapeError, match="holds 16 bytes"):
            SharedArray.attach(descriptor)


def test_host_id_is_stable_and_names_this_host():
    assert host_id() == host_id()
    assert host_id().startswith(socket.gethostname() + "/")


# --- bulk side channel ----------------------------------------------------------------------------


def test_bulk_fetch_lands_in_a_strided_output_view(rng):
    result = rng.standard_normal((3, 4, 9)).astype(np.float32)
    out = np.zeros((5, 10, 9), np.float32)
    with BulkServer("127.0.0.1") as server:
        ticket = server.offer(result)
        assert len(ticket) == TICKET_CHARS
        view = out[1:4, 2:6, :]
        assert not view.flags.c_contiguous
        assert fetch("127.0.0.1", server.port, ticket, view, timeout=5) == result.nbytes
        # One-time: the same ticket is refused afterwards.
        with pytest.raises(WorkerLost, match="unknown or expired"):
            fetch("127.0.0.1", server.port, ticket, view, timeout=5)
        assert server.pending_bytes == 0
    np.testing.assert_array_equal(out[1:4, 2:6], result)
    assert not out[0].any() and not out[4].any() and not out[:, :2].any() and not out[:, 6:].any()


def test_bulk_refuses_unknown_tickets_and_wrong_sizes(rng):
    with BulkServer("127.0.0.1") as server:
        with pytest.raises(WorkerLost, match="unknown or expired"):
            fetch("127.0.0.1", server.port, "x" * TICKET_CHARS, np.zeros(3, np.float32), timeout=5)
        ticket = server.offer(np.ones((2, 3), np.float32))
        with pytest.raises(ShapeError, match="24 bytes"):
            fetch("127.0.0.1", server.port, ticket, np.zeros((2, 2), np.float32), timeout=5)
        with pytest.raises(ShapeError, match="malformed"):
            fetch("127.0.0.1", server.port, "short", np.zeros(3, np.float32), timeout=5)


def test_bulk_offers_are_bounded_and_expire():
    with BulkServer("127.0.0.1", max_bytes=100, ttl=0.0) as server:
        with pytest.raises(BudgetExceeded, match="bulk budget"):
            server.offer(np.zeros(50, np.float32))
        ticket = server.offer(np.zeros(10, np.float32))
        with pytest.raises(WorkerLost, match="unknown or expired"):
            fetch("127.0.0.1", server.port, ticket, np.zeros(10, np.float32), timeout=5)


def test_bulk_serves_concurrent_fetches(rng):
    results = [rng.standard_normal((64, 256)).astype(np.float32) for _ in range(6)]
    outs = [np.empty_like(r) for r in results]
    errors: list[BaseException] = []
    with BulkServer("127.0.0.1") as server:
        tickets = [server.offer(r) for r in results]

        def get(i: int) -> None:
            try:
                fetch("127.0.0.1", server.port, tickets[i], outs[i], timeout=10)
            except BaseException as error:  # collected for the main thread
                errors.append(error)

        threads = [threading.Thread(target=get, args=(i,)) for i in range(len(results))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert not errors
    for out, result in zip(outs, results, strict=True):
        np.testing.assert_array_equal(out, result)


def test_bulk_connections_beyond_the_cap_are_closed_at_once(rng):
    result = rng.standard_normal((4, 5)).astype(np.float32)
    with BulkServer("127.0.0.1", max_connections=2) as server:
        ticket = server.offer(result)
        silent = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
        try:
            # Each silent peer holds a handler thread (up to the server's 30 s timeout); one more is
            # hung up on instead of getting a thread of its own.
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
                assert extra.recv(1) == b""
        finally:
            for sock in silent:
                sock.close()
        out = np.empty_like(result)
        deadline = time.monotonic() + 10
        while True:  # the silent peers' threads free their slots once they see the hang-up
            try:
                fetch("127.0.0.1", server.port, ticket, out, timeout=5)
                break
            except WorkerLost:
                if time.monotonic() > deadline:
                    raise
    np.testing.assert_array_equal(out, result)


def test_bulk_close_hangs_up_on_a_connection_that_sent_no_ticket(rng):
    result = rng.standard_normal((4, 5)).astype(np.float32)
    server = BulkServer("127.0.0.1", timeout=30.0)
    ticket = server.offer(result)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        # Wait until the server holds the connection: a fetch beside it is served.
        out = np.empty_like(result)
        fetch("127.0.0.1", server.port, ticket, out, timeout=5)
        np.testing.assert_array_equal(out, result)
        started = time.monotonic()
        server.close()
        # It used to wait out the silent peer's 30 s socket timeout (a worker's SIGTERM took as long).
        assert time.monotonic() - started < 5.0
        assert silent.recv(1) == b""


def test_bulk_fetch_from_a_closed_port_is_worker_lost():
    with BulkServer("127.0.0.1") as server:
        port = server.port
    with pytest.raises(WorkerLost, match=f"127.0.0.1:{port}"):
        fetch("127.0.0.1", port, "x" * TICKET_CHARS, np.zeros(1, np.float32), timeout=2)
