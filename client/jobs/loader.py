"""The coordinator's LOAD stage: decode a features job's batches ahead of whoever takes them, a bounded few.

Tasks leave the pull queue roughly in task order, so one background thread decodes the next tasks in that
order while consumers compute earlier ones (LOAD overlapping CNP), holding at most `depth` decoded batches
that nobody took yet: memory stays bounded whatever the dataset's size (back pressure on the decoder).
A consumer that can read the files itself (a worker on this host) `claim`s a task: it gets the batch if
it is decoded or being decoded (never decoded twice), else nothing, and the decoder skips that task.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Generic, TypeVar

__all__ = ["BatchLoader"]

log = logging.getLogger(__name__)

B = TypeVar("B")

_JOIN_SECONDS = 30.0


class BatchLoader(Generic[B]):
    """`read(task_id) -> batch` run ahead in task order by one thread (when `ahead`), at most `depth`
    decoded batches waiting; `get` and `claim` hand each batch out once (a retry decodes again)."""

    def __init__(self, read: Callable[[int], B], order: Sequence[int], *, depth: int, ahead: bool) -> None:
        self._read = read
        self._order = list(order)
        self.depth = max(1, depth)
        self._ready: dict[int, B] = {}
        self._failed: dict[int, BaseException] = {}
        self._loading: int | None = None
        self._skip: set[int] = set()  # handed out, claimed, or being read by a consumer
        self._cursor = 0
        self._stop = False
        self._cond = threading.Condition()
        self.peak_waiting = 0
        """Most decoded batches waiting at once (the bound the tests and the study check)."""
        self._thread: threading.Thread | None = None
        if ahead and self._order:
            self._thread = threading.Thread(target=self._run, name="rmidl-load", daemon=True)
            self._thread.start()

    # -- consumers -----------------------------------------------------------------------------------
    def get(self, task_id: int) -> B:
        """The task's batch: the decoded one if the decoder has (or is making) it, else read here."""
        found, batch = self._take(task_id, wait=True)
        if found:
            return batch  # type: ignore[return-value]
        return self._read(task_id)

    def claim(self, task_id: int) -> B | None:
        """The task's batch if decoded or being decoded; else None, and the decoder leaves it alone."""
        found, batch = self._take(task_id, wait=True)
        return batch if found else None

    def _take(self, task_id: int, *, wait: bool) -> tuple[bool, B | None]:
        with self._cond:
            while wait and self._loading == task_id:  # being decoded: wait for it rather than decode twice
                self._cond.wait()
            self._skip.add(task_id)
            if task_id in self._failed:
                raise self._failed.pop(task_id)
            if task_id in self._ready:
                batch = self._ready.pop(task_id)
                self._cond.notify_all()
                return True, batch
            return False, None

    # -- the decoder ---------------------------------------------------------------------------------
    def _next(self) -> int | None:
        """The next task to decode (the caller holds the lock), or None when every task is past."""
        while self._cursor < len(self._order) and self._order[self._cursor] in self._skip:
            self._cursor += 1
        return self._order[self._cursor] if self._cursor < len(self._order) else None

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or len(self._ready) + len(self._failed) < self.depth)
                task_id = None if self._stop else self._next()
                if task_id is None:
                    return
                self._cursor += 1
                self._loading = task_id
            try:
                batch = self._read(task_id)
            except Exception as error:  # handed to whoever takes the task
                with self._cond:
                    self._failed[task_id] = error
                    self._loading = None
                    self._cond.notify_all()
                continue
            with self._cond:
                # Nobody took it meanwhile: a consumer coming for it waits while it is being decoded.
                self._ready[task_id] = batch
                self._loading = None
                self.peak_waiting = max(self.peak_waiting, len(self._ready))
                self._cond.notify_all()

    def close(self) -> None:
        """Stop decoding ahead and drop what nobody took (joins the decoder, bounded)."""
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._failed.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(_JOIN_SECONDS)
            if self._thread.is_alive():
                log.warning("the LOAD thread is still decoding after %.0f s", _JOIN_SECONDS)

    def __enter__(self) -> BatchLoader[B]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
