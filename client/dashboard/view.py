"""What the status page shows: the workers of a name server and the jobs of every coordinator that
publishes there (`rmidl.client.jobfeed`), gathered by a thread, plus the jobs of boards in this process."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any

from rmidl.config import Config

from ..census import census
from ..jobboard import JobBoard
from ..jobfeed import read_feeds

__all__ = ["ClusterView"]

log = logging.getLogger(__name__)

THIS_PROCESS = "this process"
"""The coordinator name the page shows for the jobs of boards in the dashboard's own process."""
IDLE_AFTER = 10.0
"""Seconds without a snapshot asked for after which the thread stops asking the cluster (nobody looks)."""


class ClusterView:
    """`snapshot()` is the page's data: {"time", "ns", "error", "workers": census rows, "jobs": job
    summaries newest first}. The name server is asked every `interval` s by a thread (a slow or dead
    worker never holds up a page) while someone looks (a snapshot in the last IDLE_AFTER s; the first
    one after a pause asks at once); `boards` are read live at each snapshot; feeds named in
    `skip_feeds` (this process's own, already among `boards`) are left out."""

    def __init__(self, ns: str | None, config: Config, *, boards: Sequence[JobBoard] = (),
                 skip_feeds: Collection[str] = (), interval: float = 1.0) -> None:
        self.ns = ns
        self.config = config
        self.interval = interval
        self._boards = list(boards)
        self._skip = set(skip_feeds)
        self._workers: list[dict[str, Any]] = []
        self._feed_jobs: list[dict[str, Any]] = []
        self._error: str | None = None
        self._asked = self._refreshed = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if ns is not None:
            self.refresh()
            self._thread = threading.Thread(target=self._loop, name="rmidl-dashboard-view", daemon=True)
            self._thread.start()

    def refresh(self) -> None:
        """Ask the name server and the workers now (the thread does this every `interval` s)."""
        if self.ns is None:
            return
        try:
            workers = census(self.ns, self.config)
            jobs = [job for feed in self._feeds() if feed["coordinator"] not in self._skip
                    for job in feed["jobs"]]
            error = None
        except Exception as error_:  # shown on the page; the last good figures stay
            log.debug("dashboard refresh failed: %r", error_)
            with self._lock:
                self._error = " ".join(str(error_).split()) or type(error_).__name__
                self._refreshed = time.monotonic()
            return
        with self._lock:
            self._workers, self._feed_jobs, self._error = workers, jobs, error
            self._refreshed = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        self._asked = now = time.monotonic()
        if self.ns is not None and now - self._refreshed > max(2 * self.interval, 2.0):
            self.refresh()  # the thread idled while nobody looked
        with self._lock:
            workers, jobs, error = list(self._workers), list(self._feed_jobs), self._error
        for board in self._boards:
            jobs += [{**job, "coordinator": THIS_PROCESS} for job in board.jobs()]
        jobs.sort(key=_newest_first)
        return {"time": time.time(), "ns": self.ns, "error": error, "workers": workers, "jobs": jobs}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0 + self.config.connect_timeout)

    def _feeds(self) -> list[dict[str, Any]]:
        from rmidl.remote.transport import connect_ns

        with connect_ns(self.ns, self.config) as registry:
            return read_feeds(registry)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):  # the refresh period, not a synchronisation
            if time.monotonic() - self._asked < IDLE_AFTER:
                self.refresh()


def _newest_first(job: dict[str, Any]) -> tuple[int, float]:
    """Running jobs first, then by start (or creation) time, newest first."""
    live = job.get("state") in ("running", "stale")
    return (0 if live else 1, -float(job.get("started") or job.get("created") or 0.0))
