"""The job feed: a coordinator publishes its running and last jobs in the name server, where dashboards
of other processes read them (so `rmidl up --dashboard` shows the job of an `rmidl run` elsewhere).

Each coordinator with a name server registers `rmidl.coordinator.<host>-<pid>-<n>` with the tags
FEED_TAGS and one metadata string "jobs:<json>": its running jobs and its newest finished one, each with
its newest MAX_TASKS task attempts. A thread publishes when the jobs change, at most every
MIN_INTERVAL s, and every HEARTBEAT s while one runs; a reader calls a running job whose feed is older
than STALE s "stale" (its coordinator died). The entry stays after the coordinator closes (the last job
stays visible); each new feed removes all but the newest KEEP_FEEDS and those older than MAX_AGE s.
The registration's URI names no object (nothing answers there): the name server is only the mailbox,
reached with the cluster's secret or TLS like everything else.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from rmidl.config import Config

from .jobboard import JobBoard

__all__ = ["FEED_PREFIX", "FEED_TAGS", "JobFeed", "read_feeds"]

log = logging.getLogger(__name__)

FEED_PREFIX = "rmidl.coordinator."
FEED_TAGS = frozenset({"rmidl", "role:coordinator"})
_JOBS = "jobs:"
MIN_INTERVAL = 0.5
HEARTBEAT = 5.0
STALE = 3 * HEARTBEAT
KEEP_FEEDS = 16
MAX_AGE = 24 * 3600.0
MAX_TASKS = 2000
_numbers = itertools.count(1)


class JobFeed:
    """Publishes `board` at the name server `ns` from a thread of its own (`close()` publishes a last time
    and stops it). Publishing never fails a job: a name server that does not answer is retried later."""

    def __init__(self, board: JobBoard, ns: str, config: Config) -> None:
        host = socket.gethostname()
        self.name = f"{FEED_PREFIX}{host}-{os.getpid()}-{next(_numbers)}"
        self._uri = f"PYRO:{self.name}@{_safe_host(host)}:0"
        self._board = board
        self._ns_address = ns
        self._config = config
        self._proxy: Any = None
        self._lock = threading.Lock()
        self._published = -1
        self._pruned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rmidl-jobfeed", daemon=True)
        self._thread.start()

    def flush(self) -> bool:
        """Publish the board now if it changed since the last time; True if it is published."""
        with self._lock:
            version = self._board.version
            if version == self._published and not self._running():
                return True
            try:
                self._publish()
            except Exception as error:
                log.debug("could not publish jobs to %s: %r", self._ns_address, error)
                self._release()
                return False
            self._published = version
            return True

    def close(self) -> None:
        """Stop the thread, publish the final state (if any job ran) and let go of the name server."""
        self._stop.set()
        self._board.touch()  # wakes the thread
        self._thread.join(5.0)
        if self._board.traces():  # a coordinator that ran no job leaves no entry
            self.flush()
        with self._lock:
            self._release()

    # -- internals -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        version = 0
        while not self._stop.is_set():
            version = self._board.wait(version, HEARTBEAT)
            if self._stop.is_set():
                return
            if version or self._running():
                self.flush()
            self._stop.wait(MIN_INTERVAL)  # the publishing rate, not a synchronisation

    def _running(self) -> bool:
        return any(trace.state == "running" for trace in self._board.traces())

    def _publish(self) -> None:
        jobs = self._board.jobs(max_tasks=MAX_TASKS)
        running = [job for job in jobs if job["state"] == "running"]
        finished = [job for job in jobs if job["state"] != "running"][:1]
        feed = {"coordinator": self.name, "host": socket.gethostname(), "pid": os.getpid(),
                "updated": time.time(), "jobs": running + finished}
        metadata = [*sorted(FEED_TAGS), _JOBS + json.dumps(feed, separators=(",", ":"))]
        if self._proxy is None:
            from rmidl.remote.transport import connect_ns

            self._proxy = connect_ns(self._ns_address, self._config)
        self._proxy._pyroClaimOwnership()
        if not self._pruned:
            self._prune()
            self._pruned = True
        self._proxy.register(self.name, self._uri, metadata=metadata)

    def _prune(self) -> None:
        """Remove all but the newest KEEP_FEEDS - 1 feeds (this one makes KEEP_FEEDS) and any older than
        MAX_AGE."""
        feeds = sorted(read_feeds(self._proxy), key=lambda feed: feed["updated"], reverse=True)
        now = time.time()
        for index, feed in enumerate(feeds):
            if index >= KEEP_FEEDS - 1 or now - feed["updated"] > MAX_AGE:
                self._proxy.remove(feed["coordinator"])

    def _release(self) -> None:
        if self._proxy is not None:
            try:
                self._proxy._pyroClaimOwnership()
                self._proxy._pyroRelease()
            except Exception as error:
                log.debug("releasing the name server proxy: %r", error)
            self._proxy = None


def read_feeds(ns_proxy: Any) -> list[dict[str, Any]]:
    """Every coordinator's feed registered at a name server (a proxy), with running jobs whose feed is
    older than STALE s marked "stale"; entries that are not feeds are skipped."""
    found = ns_proxy.yplookup(meta_all=sorted(FEED_TAGS), return_metadata=True)
    now = time.time()
    feeds = []
    for name, (_, metadata) in sorted(found.items()):
        text = next((item for item in metadata if item.startswith(_JOBS)), None)
        if not name.startswith(FEED_PREFIX) or text is None:
            continue
        try:
            feed = json.loads(text[len(_JOBS):])
            feed["coordinator"], updated = name, float(feed["updated"])
            jobs = [job for job in feed["jobs"] if isinstance(job, dict)]
        except (ValueError, KeyError, TypeError) as error:
            log.debug("feed %s is not readable: %r", name, error)
            continue
        for job in jobs:
            job["coordinator"] = name
            if job.get("state") == "running" and now - updated > STALE:
                job["state"] = "stale"
        feed["jobs"] = jobs
        feeds.append(feed)
    return feeds


def _safe_host(host: str) -> str:
    """A host part Pyro5 accepts in a URI (hostnames with odd characters become 'localhost')."""
    return host if host.replace("-", "").replace(".", "").isalnum() else "localhost"
