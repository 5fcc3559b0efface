"""Large result arrays on recycled mappings: a fresh output costs no page faults once one of its size went.

A new 462 MB output costs ~0.05 s of kernel page zeroing even on huge pages (numpy already asks for them),
~20 % of the reference job. So big results live on mappings that go back to a `Recycler` when the last
view of the array handed out is freed, and the next result of that size reuses them: warm pages, no
faults, no zeroing. Freed anonymous mappings are kept with MADV_FREE, so the kernel may still reclaim
them under memory pressure (a reclaimed page faults in as a zero page again: the contents of a fresh
output are undefined, as with `np.empty`). The same recycler, with a shared-memory factory, is the
coordinator's pool of blocks that same-host workers write results into (`rmidl.client.shared`).

`empty(shape, dtype)` is the drop-in for `np.empty` of outputs; arrays under RECYCLE_MIN_BYTES are plain
numpy ones. Its recycler is process-wide (an allocator cache, like malloc's), bounded by `max_free_bytes`.
"""

from __future__ import annotations

import collections
import logging
import math
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from functools import cache
from typing import Generic, Protocol, TypeVar

import numpy as np

__all__ = ["RECYCLE_MIN_BYTES", "AnonymousBuffer", "Buffer", "Recycler", "empty", "outputs"]

logger = logging.getLogger(__name__)

RECYCLE_MIN_BYTES = 4 << 20
"""Smaller arrays come from numpy's allocator (malloc reuses them well; a mapping would waste a page)."""
MAX_OVERSIZE = 2.0
"""A free buffer serves a request of at least 1 / MAX_OVERSIZE of its size (bounded waste)."""


class Buffer(Protocol):
    """One mapping a Recycler hands out and takes back."""

    @property
    def nbytes(self) -> int: ...

    @property
    def mmap(self) -> mmap.mmap: ...

    def recycle(self) -> None:
        """Called when it goes back to the free list (e.g. MADV_FREE)."""
        ...

    def close(self) -> None:
        """Unmap for good (no view may be alive)."""
        ...


class AnonymousBuffer:
    """A private anonymous mapping with transparent huge pages asked for (where the kernel allows them)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.mmap = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _advise(self.mmap, "MADV_HUGEPAGE")

    def recycle(self) -> None:
        _advise(self.mmap, "MADV_FREE")

    def close(self) -> None:
        self.mmap.close()


B = TypeVar("B", bound=Buffer)


class Recycler(Generic[B]):
    """Hands out arrays on buffers from `make(nbytes)`; a buffer comes back when the array's last view is
    freed and serves the next request of about its size. At most `max_free` buffers and `max_free_bytes`
    bytes wait on the free list (the oldest are closed first); after `close()` returned buffers are closed.

    Buffers come back from a `weakref.finalize`, i.e. from whichever thread drops the last view (or from
    the garbage collector, inside any allocation): that path only takes the lock if it is free and else
    leaves the buffer on a queue the next caller drains, so it can never deadlock with our own calls.
    """

    def __init__(self, make: Callable[[int], B], *, max_free: int = 2, max_free_bytes: int = 2 << 30) -> None:
        self._make = make
        self.max_free = max_free
        self.max_free_bytes = max_free_bytes
        self._free: collections.OrderedDict[int, B] = collections.OrderedDict()
        self._returned: collections.deque[B] = collections.deque()
        self._lock = threading.Lock()
        self._discarded: set[int] = set()
        self._closed = False
        self.made = 0
        """Buffers made so far (a test of reuse reads it)."""

    @property
    def free_bytes(self) -> int:
        with self._lock:
            self._drain()
            return sum(buffer.nbytes for buffer in self._free.values())

    def lease(self, shape: tuple[int, ...], dtype: np.dtype | str) -> tuple[np.ndarray, B]:
        """A C-ordered array of `shape` on a buffer of this recycler, and that buffer (for its name/fd)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            self._drain()
            buffer = self._take(nbytes)
            made = buffer is None
            self.made += made
        if buffer is None:
            buffer = self._make(max(nbytes, 1))
        # The finalizer watches `holder`: every view of the result keeps it (numpy's base), never the
        # buffer itself, which the finalizer holds and takes back.
        holder = np.frombuffer(buffer.mmap, np.uint8, nbytes)
        # At exit the process's mappings go anyway: nothing to give back then.
        weakref.finalize(holder, self._give, buffer).atexit = False
        return holder.view(dtype).reshape(shape), buffer

    def discard(self, buffer: B) -> None:
        """Close `buffer` when its array goes instead of handing it out again."""
        with self._lock:
            self._discarded.add(id(buffer))

    def close(self) -> list[B]:
        """Close every free buffer and return them; buffers still leased are closed when their arrays go."""
        with self._lock:
            self._closed = True
            self._drain()
            free, self._free = list(self._free.values()), collections.OrderedDict()
        for buffer in free:
            _close(buffer)
        return free

    # -- internals -----------------------------------------------------------------------------------
    def _take(self, nbytes: int) -> B | None:
        fits = [key for key, b in self._free.items() if nbytes <= b.nbytes <= max(nbytes, 1) * MAX_OVERSIZE]
        if not fits:
            return None
        best = min(fits, key=lambda key: self._free[key].nbytes)
        return self._free.pop(best)

    def _give(self, buffer: B) -> None:
        if not self._lock.acquire(blocking=False):
            self._returned.append(buffer)  # drained by whoever holds the lock next
            return
        try:
            self._keep(buffer)
            self._drain()
        finally:
            self._lock.release()

    def _drain(self) -> None:
        while self._returned:
            self._keep(self._returned.popleft())

    def _keep(self, buffer: B) -> None:
        """Under the lock: put `buffer` on the free list, closing what no longer fits there."""
        discarded = id(buffer) in self._discarded
        self._discarded.discard(id(buffer))
        if discarded or self._closed or buffer.nbytes > self.max_free_bytes:
            _close(buffer)
            return
        buffer.recycle()
        self._free[id(buffer)] = buffer
        total = sum(b.nbytes for b in self._free.values())
        while len(self._free) > self.max_free or total > self.max_free_bytes:
            _, oldest = self._free.popitem(last=False)
            total -= oldest.nbytes
            _close(oldest)


@cache
def outputs() -> Recycler[AnonymousBuffer]:
    """The process's recycler of result arrays (made on first use)."""
    return Recycler(AnonymousBuffer, max_free=2, max_free_bytes=_physical_bytes() // 8)


def empty(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """`np.empty(shape, dtype)` for results: big ones on recycled, huge-page mappings (see the module)."""
    dtype = np.dtype(dtype)
    if math.prod(shape) * dtype.itemsize < RECYCLE_MIN_BYTES:
        return np.empty(shape, dtype)
    return outputs().lease(tuple(int(n) for n in shape), dtype)[0]


def _close(buffer: Buffer) -> None:
    try:
        buffer.close()
    except (BufferError, OSError, ValueError) as error:  # a view outlived its holder: it keeps the mapping
        logger.debug("buffer of %d bytes not closed: %s", buffer.nbytes, error)


def _advise(buffer: mmap.mmap, name: str) -> None:
    advice = getattr(mmap, name, None)
    if advice is None:
        return
    try:
        buffer.madvise(advice)
    except OSError as error:  # e.g. a kernel without THP: only slower
        logger.debug("madvise(%s) refused: %s", name, error)


def _physical_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30
