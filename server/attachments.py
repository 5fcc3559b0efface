"""The shared-memory blocks a worker has mapped: each mapped once after its capability is checked, kept
in a bounded cache, and unmapped when its owner lets go (released, closed or dead) by a reaper thread."""

from __future__ import annotations

import hmac
import logging
import threading

import numpy as np

from rmidl.remote.contract import ShmRef
from rmidl.remote.shm import Attachment, block_name

from .cache import LruCache

__all__ = ["ATTACHMENT_CACHE", "REAP_S", "AttachedBlocks"]

logger = logging.getLogger(__name__)

ATTACHMENT_CACHE = 8
"""Shared-memory blocks a worker keeps mapped (a job uses two: padded input and output); their bytes are
bounded too, by the worker's memory budget."""
REAP_S = 1.0
"""How often a worker unmaps blocks whose owner closed them or died (their memory is freed only then)."""


class AttachedBlocks:
    """A worker's mapped blocks, at most ATTACHMENT_CACHE of them and `max_bytes` in all (the newest two,
    a job's input and output, always stay); safe for concurrent tasks."""

    def __init__(self, max_bytes: int, *, name: str) -> None:
        self._lock = threading.Lock()
        self._blocks: LruCache[str, Attachment] = LruCache(
            ATTACHMENT_CACHE, max_bytes, lambda block: block.nbytes, keep=2
        )
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name=f"rmidl-shm-reaper-{name}", daemon=True)
        self._reaper.start()

    def __len__(self) -> int:
        with self._lock:
            return len(self._blocks)

    def attach(self, ref: ShmRef) -> np.ndarray:
        """The array a shared block holds, the block mapped once (after its capability is checked) and
        cached; taken under the lock, so a later eviction cannot close it under the caller (the view
        keeps the mapping alive)."""
        descriptor = ref.to_wire()
        with self._lock:
            block = self._blocks.get(ref.name)
            # The capability is checked on every use, as when the block was mapped.
            same = block is not None and block.pid == ref.pid and block.fd == ref.fd
            if block is not None and same and hmac.compare_digest(block_name(ref.token), ref.name):
                array = block.array(descriptor)
            else:
                block = None
        if block is not None:
            block.populate()
            return array
        self.prune()
        block = Attachment(descriptor)
        with self._lock:
            # Old blocks belong to finished jobs (and pin their memory while mapped): evicted by count
            # and bytes; a task still using an evicted block keeps its views.
            evicted = self._blocks.put(ref.name, block)
        for old in evicted:
            old.close()
        return block.array(descriptor)

    def release(self, names: set[str]) -> int:
        """Unmap the blocks named (their owner is done with them); how many were mapped."""
        with self._lock:
            blocks = self._blocks.pop_where(lambda block: block.name in names)
        for block in blocks:
            block.close()
        return len(blocks)

    def prune(self) -> None:
        """Unmap blocks their owner has closed or died with: their memory is freed only when we let go."""
        with self._lock:
            candidates = self._blocks.values()
        gone = {id(block) for block in candidates if not block.owner_holds()}
        if not gone:
            return
        with self._lock:
            blocks = self._blocks.pop_where(lambda block: id(block) in gone)
        for block in blocks:
            block.close()

    def close(self) -> None:
        """Unmap every block and stop the reaper."""
        self._stopping.set()
        with self._lock:
            blocks = self._blocks.clear()
        for block in blocks:
            block.close()
        if self._reaper is not threading.current_thread():
            self._reaper.join(REAP_S + 1.0)

    def _reap(self) -> None:
        while not self._stopping.wait(REAP_S):
            try:
                self.prune()
            except Exception as error:  # never let the reaper die
                logger.warning("unmapping finished shared blocks failed: %r", error)
