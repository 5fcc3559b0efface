"""The data plane's parts on their own: wire packing, shared-memory arrays and the bulk side channel."""

from __future__ import annotations

import os
import socket
import threading
import time

import msgpack
import numpy as np
import pytest

from rmidl.errors import BudgetExceeded, DTypeError, ShapeError, SharedMemoryUnavailable, WorkerLost
from rmidl.remote.bulk import TICKET_CHARS, BulkServer, fetch
from rmidl.remote.shm import SharedArray, block_name, host_id
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


def test_shared_array_attach_sees_writes_and_leaves_nothing_in_dev_shm(rng):
    before = _shm_names()
    with SharedArray.create((4, 5, 3), "float64") as owner:
        assert not owner.array.any()
        block = SharedArray.attach(owner.descriptor())
        values = rng.standard_normal((4, 5, 3))
        block.array[1:3] = values[1:3]
        np.testing.assert_array_equal(owner.array[1:3], values[1:3])
        block.close()  # a borrower only unmaps
        assert owner.exists() and _shm_names() == before
        again = SharedArray.attach(owner.descriptor())
        np.testing.assert_array_equal(again.array[1:3], values[1:3])
        assert again.exists()
    assert not again.exists()  # the owner closed it: the borrower sees it
    again.close()
    assert _shm_names() == before


def test_shared_array_close_with_live_view_keeps_view_valid():
    owner = SharedArray.create((3, 3), "float32")
    owner.array[:] = 7.0
    view = owner.array
    owner.close()  # the fd is closed, but the mapping stays while `view` lives
    assert not owner.exists()
    assert view.sum() == 63.0
    with pytest.raises(ValueError, match="closed"):
        _ = owner.array


def _descriptor(**changes: object) -> dict:
    token = "ab" * 32
    return {"name": block_name(token), "pid": os.getpid(), "fd": 0, "token": token, "shape": [1],
            "dtype": "float32"} | changes


@pytest.mark.parametrize(
    ("descriptor", "error", "match"),
    [
        (_descriptor(name="../etc/passwd"), ShapeError, "not an rmidl block name"),
        (_descriptor(shape=[-1]), ShapeError, "non-negative"),
        (_descriptor(pid=0), ShapeError, "pid=0"),
        (_descriptor(fd="3"), ShapeError, "fd='3'"),
        (_descriptor(token="cd" * 32), SharedMemoryUnavailable, "the token does not open it"),
        (_descriptor(token=None), SharedMemoryUnavailable, "the token does not open it"),
        (_descriptor(fd=999_999), SharedMemoryUnavailable, "is not open in process"),
        (_descriptor(fd=0), SharedMemoryUnavailable, "is not the shared block"),  # stdin, not a block
    ],
)
def test_shared_array_attach_refuses_bad_descriptors(descriptor, error, match):
    with pytest.raises(error, match=match):
        SharedArray.attach(descriptor)


def test_attach_needs_the_blocks_own_token():
    with SharedArray.create((2, 2), "float32") as owner, SharedArray.create((2, 2), "float32") as other:
        # Another block's valid token does not open this one.
        stolen = owner.descriptor() | {"token": other.descriptor()["token"]}
        with pytest.raises(SharedMemoryUnavailable, match="token does not open it"):
            SharedArray.attach(stolen)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_attach_from_another_user_is_refused():
    with SharedArray.create((2, 2), "float32") as owner:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe and exits
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                SharedArray.attach(owner.descriptor())
                code = 1
            except SharedMemoryUnavailable as error:
                code = 0 if "another user" in str(error) else 2
            finally:
                os.write(write, bytes([code]))
                os._exit(0)
        os.close(write)
        answer = os.read(read, 1)
        os.close(read)
        os.waitpid(pid, 0)
    assert answer == bytes([0])


def test_shared_array_attach_refuses_a_shape_larger_than_the_block():
    with SharedArray.create((2, 2), "float32") as owner:
        descriptor = owner.descriptor() | {"shape": [20, 20]}
        with pytest.raises(ShapeError, match="holds 16 bytes"):
            SharedArray.attach(descriptor)


def test_a_block_cannot_be_resized_under_its_mappings():
    with SharedArray.create((2, 2), "float32") as owner:
        path = f"/proc/self/fd/{owner.descriptor()['fd']}"
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 4)  # a mapping past the end would SIGBUS its reader
        finally:
            os.close(fd)


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


def test_bulk_fetch_fills_a_fortran_ordered_out(rng):
    result = rng.standard_normal((3, 40, 9)).astype(np.float32)
    out = np.zeros((3, 40, 9), np.float32, order="F")
    strided = np.zeros((3, 80, 18), np.float32)[:, ::2, ::2]
    with BulkServer("127.0.0.1") as server:
        for target in (out, strided):
            fetch("127.0.0.1", server.port, server.offer(result), target, timeout=5)
            np.testing.assert_array_equal(target, result)


def test_bulk_pieces_of_a_big_strided_out_fit_the_bounce_buffer(monkeypatch, rng):
    from rmidl.remote import bulk_fetch as bulk

    monkeypatch.setattr(bulk, "BOUNCE_BYTES", 256)
    result = rng.standard_normal((2, 30, 7)).astype(np.float32)
    out = np.zeros((2, 30, 7), np.float32, order="F")
    pieces = bulk._pieces(out)
    assert all(p.flags.c_contiguous or p.nbytes <= 256 for p in pieces)
    assert sum(p.size for p in pieces) == out.size
    with BulkServer("127.0.0.1") as server:
        fetch("127.0.0.1", server.port, server.offer(result), out, timeout=5)
    np.testing.assert_array_equal(out, result)


def _silent(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_idle_connections_hold_no_transfer_slot(rng):
    # 32 idle connections used to take every handler thread: each fetch then failed for 30 s.
    result = rng.standard_normal((64, 64)).astype(np.float32)
    with BulkServer("127.0.0.1", max_transfers=2, max_waiting_per_peer=100) as server:
        idle = _silent(server.port, 48)
        try:
            _wait_for(lambda: server.waiting == 48)
            for _ in range(3):
                out = np.empty_like(result)
                fetch("127.0.0.1", server.port, server.offer(result), out, timeout=5)
                np.testing.assert_array_equal(out, result)
        finally:
            for sock in idle:
                sock.close()


def test_connections_without_a_ticket_are_hung_up_on_after_the_deadline():
    with BulkServer("127.0.0.1", ticket_timeout=0.2) as server:
        idle = _silent(server.port, 3)
        try:
            for sock in idle:
                assert sock.recv(1) == b""  # closed by the server, within the deadline
            assert server.refused == 3
        finally:
            for sock in idle:
                sock.close()


def test_waiting_connections_are_bounded_per_peer_oldest_first(rng):
    with BulkServer("127.0.0.1", max_waiting_per_peer=4) as server:
        idle = _silent(server.port, 10)
        try:
            for sock in idle[:6]:  # each newcomer beyond four hung up on the oldest
                assert sock.recv(1) == b""
            _wait_for(lambda: server.waiting == 4)
            result = rng.standard_normal(5).astype(np.float32)
            out = np.empty_like(result)
            fetch("127.0.0.1", server.port, server.offer(result), out, timeout=5)
            np.testing.assert_array_equal(out, result)
        finally:
            for sock in idle:
                sock.close()


def test_bulk_close_hangs_up_on_a_connection_that_sent_no_ticket(rng):
    result = rng.standard_normal((4, 5)).astype(np.float32)
    server = BulkServer("127.0.0.1", timeout=30.0, ticket_timeout=30.0)
    ticket = server.offer(result)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as silent:
        _wait_for(lambda: server.waiting == 1)
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
