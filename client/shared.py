"""The coordinator's shared-memory blocks, leased to jobs and recycled, so same-host workers write warm pages.

A job leases a block for its padded input and, unless the caller passed `out=`, one for its output: that
output IS the array the caller gets back, written once by the workers where the caller reads it.

Lifetime of a result on a shared block (what `Coordinator.correlate` returns with shared memory on):
- it is an ordinary numpy array; the block lives for as long as the caller holds it or any view of it,
  also after the Coordinator is closed;
- when its last view goes, the block comes back to the coordinator's pool for a later job of about that
  size (workers keep it mapped: no page faults next time); once the pool is closed, or full, it is closed;
- a closed block's memory goes when the same-host workers unmap it, which they do within a second of
  the owner closing it (or at once on `release_shm`), and at once if the owner dies: blocks are memfds,
  never names in /dev/shm, so a killed coordinator, a killed worker, or both, leave nothing behind.
A job whose calls may still write after it ended (a worker timed out or its connection broke mid-task)
hands the caller a copy instead and never reuses those blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rmidl._memory import Recycler
from rmidl.remote.contract import ShmRef
from rmidl.remote.shm import SharedBlock

__all__ = ["Lease", "SharedPool"]


@dataclass(frozen=True)
class Lease:
    """One array on a leased block, and the reference workers use to map it."""

    array: np.ndarray
    ref: ShmRef
    block: SharedBlock


class SharedPool:
    """Blocks kept from one job to the next: at most `max_free` of them and `max_free_bytes` unused."""

    def __init__(self, released: Callable[[list[str]], None], *, max_free: int = 4,
                 max_free_bytes: int = 2 << 30) -> None:
        self._recycler: Recycler[SharedBlock] = Recycler(SharedBlock, max_free=max_free,
                                                         max_free_bytes=max_free_bytes)
        self._released = released
        """Told the names of blocks once closed by `close()`, so that workers unmap them at once."""

    @property
    def blocks_made(self) -> int:
        return self._recycler.made

    def lease(self, shape: tuple[int, ...], dtype: np.dtype | str) -> Lease:
        """An array of `shape` on a block of this pool: back in the pool when its last view goes."""
        array, block = self._recycler.lease(tuple(int(n) for n in shape), dtype)
        assert block.fd is not None, "a leased block is open"
        ref = ShmRef(block.name, tuple(array.shape), np.dtype(dtype).name, block.pid, block.fd, block.token)
        return Lease(array, ref, block)

    def discard(self, lease: Lease) -> None:
        """Never give this block to another job (a call of a finished job may still write into it): it is
        closed when its last view goes."""
        self._recycler.discard(lease.block)

    def close(self) -> None:
        """Close every unused block (and tell workers to unmap them); leased ones close when freed."""
        closed = self._recycler.close()
        if closed:
            self._released([block.name for block in closed])
