"""Our thread pool over row tiles, with BLAS pinned to one thread while any engine call runs.

Pinning is process-wide (OpenBLAS has one thread setting) and reference-counted: the first engine call
to enter pins BLAS to 1 thread, the last one to leave restores the original setting, so concurrent
calls in one process (a worker serving several tasks) never undo each other's pin, and pool threads
never multiply with BLAS threads.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Any, TypeVar

import threadpoolctl
from threadpoolctl import ThreadpoolController

__all__ = ["available_cores", "blas_pinned", "resolve_threads", "run_tiles"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def available_cores() -> int:
    """Cores this process may run on (respects the affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """`threads=None` means every core this process may use."""
    return available_cores() if threads is None else max(1, int(threads))


class _BlasPin:
    """Reference-counted process-wide BLAS pin to one thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._limiter: Any = None
        self._controller: ThreadpoolController | None = None
        self._modules_seen = -1

    def acquire(self) -> None:
        with self._lock:
            if self._users == 0:
                # Scanning the loaded libraries costs ~1-10 ms; rescan only when imports may have
                # brought in another BLAS (pinning a cached controller costs ~10 us).
                if self._controller is None or self._modules_seen != len(sys.modules):
                    self._controller = ThreadpoolController()
                    self._modules_seen = len(sys.modules)
                    for lib in self._controller.select(user_api="blas").lib_controllers:
                        logger.debug("BLAS %s %s, %s kernel: pinned to 1 thread inside engine calls",
                                     lib.internal_api, lib.version, getattr(lib, "architecture", "?"))
                _claim_openblas_control()
                self._limiter = self._controller.limit(limits=1, user_api="blas")
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                _claim_openblas_control()
                self._limiter.restore_original_limits()
                self._limiter = None


def _claim_openblas_control() -> None:
    """Let this thread change OpenBLAS's thread count (threadpoolctl >= 3.8 lets only one thread do so).

    threadpoolctl gives OpenBLAS's process-wide setting to the first thread that limits it and silently
    ignores every other thread while that one lives; engine calls come from any thread (Pyro5's, our
    pools), and our own lock already keeps them from fighting, so each pin and unpin claims control.
    """
    controller_class = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(controller_class, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@cache
def _pin() -> _BlasPin:
    return _BlasPin()


@contextmanager
def blas_pinned() -> Iterator[None]:
    """BLAS runs on the calling thread only while inside (nests and is shared across threads)."""
    pin = _pin()
    pin.acquire()
    try:
        yield
    finally:
        pin.release()


POOL_THREADS = 64
"""Most helper threads alive at once, over all engine calls of the process (made when first needed)."""


class _SharedPool:
    """One pool of helper threads for every engine call: starting threads per call cost ~2-8 ms, which
    decided small calls (a depthwise stage's per-map calls, small images) at 2+ threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        os.register_at_fork(after_in_child=self._forget)

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="rmidl-tile")
            return self._pool

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._pool = None  # a forked child has none of the parent's threads


_HELPERS = _SharedPool()


def run_tiles(tiles: Sequence[T], work: Callable[[T, Any], None], make_scratch: Callable[[], Any],
              threads: int) -> None:
    """Run `work(tile, scratch)` for every tile on `threads` threads, each with its own scratch.

    Threads pull tiles from a shared queue (not fixed shares), so a core slowed by other load does less.
    The calling thread is one of them and the others come from the process's shared pool; helpers that
    have not started by the time the tiles run out are cancelled, so a busy pool (or a nested call) only
    means fewer helpers, never a wait.
    """
    threads = max(1, min(threads, len(tiles)))
    if threads == 1:
        scratch = make_scratch()
        for tile in tiles:
            work(tile, scratch)
        return
    lock = threading.Lock()
    position = iter(tiles)
    failed = threading.Event()  # one tile's error stops the others from taking more

    def loop() -> None:
        scratch = make_scratch()
        while not failed.is_set():
            with lock:
                tile = next(position, None)
            if tile is None:
                return
            try:
                work(tile, scratch)
            except BaseException:
                failed.set()
                raise

    pool = _HELPERS.get()
    helpers = [pool.submit(loop) for _ in range(threads - 1)]
    try:
        loop()
    finally:
        started = [future for future in helpers if not future.cancel()]
        errors = []
        for future in started:  # running or done: their tiles write into the caller's arrays
            error = future.exception()
            if error is not None:
                errors.append(error)
    if errors:
        raise errors[0]
