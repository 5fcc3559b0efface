"""WorkerStub: the client side of one remote worker (the RMI stub), kept across jobs.

It owns the worker's Pyro5 proxies (one per calling thread), their timeouts, which blobs the worker holds,
the worker's capabilities as `info()` tells them (host id, bulk port, limits, budgets, rate), the TLS-aware
bulk fetch, and its health. Jobs build typed task records; the stub sends them.

Health: "ok" (usable), "silent" (does not answer, but nothing says it is dead: paused, overloaded, a
network blip), "quarantined" (missed a task's deadline), "untrusted" (cannot prove it knows the cluster
secret), "dead" (evidence of death: nothing listens on its port, or its process is gone). Only evidence,
or silence over a grace period (`failing_for`), lets a coordinator remove a worker's registration; the
others are checked again later and come back when they answer (`rmidl.client.discovery`).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from rmidl.config import Config
from rmidl.errors import (
    AuthenticationError,
    BankError,
    ClusterError,
    DataPlaneError,
    RmidlError,
    SharedMemoryUnavailable,
    WorkerLost,
)
from rmidl.remote.blobs import Blob
from rmidl.remote.contract import BulkTicket, ReplyRecord, Result, TaskRecord, WorkerInfo

from .cost import (
    BULK_BYTES_PER_S,
    INLINE_BYTES_PER_S,
    ROUND_TRIP_S,
    Capacity,
    TaskCost,
    deadline,
    local_gflops,
)

__all__ = ["BULK_RETRY_S", "STATES", "WorkerStub"]

log = logging.getLogger(__name__)

STATES = ("ok", "silent", "quarantined", "untrusted", "dead")
"""A worker's health as its stub sees it (see the module docstring)."""
R = TypeVar("R")
BULK_RETRY_S = 30.0
"""After its bulk channel failed while the worker answered, its results come inline for this long."""


class WorkerStub:
    """One remote worker: `probe()` it, `call()` task records on it, `receive()` their results."""

    def __init__(self, name: str, uri: str, config: Config) -> None:
        self.name = name
        self.uri = uri
        self.config = config
        self.info = WorkerInfo()
        self.round_trip_s = ROUND_TRIP_S
        self.same_host = False
        """Shares this process's kernel: shared memory may work between us."""
        self.shm_refused = False
        """It could not map our shared blocks once (another user or pid namespace): TCP from then on."""
        self._bulk_broken_until = 0.0
        self.state = "ok"
        """One of STATES."""
        self.failing_since: float | None = None
        """When its health checks began to fail (monotonic seconds), None while it answers."""
        self.failed_checks = 0
        self.blobs: set[str] = set()
        """Ids of the blobs put on the worker (it may have evicted some since: it says so, we put again)."""
        self.in_flight = 0
        """Tasks of this process's jobs running on it now (jobs of one coordinator may run concurrently)."""
        self.blob_bytes_sent = 0
        """Bytes of blobs put on the worker so far (a job's figures take differences)."""
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._putting = threading.Lock()
        """Held while blobs are put: threads needing the same blob at once send it once."""
        self._ssl: ssl.SSLContext | None = None

    @property
    def host(self) -> str:
        from Pyro5.core import URI

        return str(URI(self.uri).host)

    @property
    def usable(self) -> bool:
        return self.state == "ok"

    @property
    def shares_memory(self) -> bool:
        """Jobs may hand this worker shared blocks (same host, and it has not refused them)."""
        return self.same_host and not self.shm_refused

    @property
    def bulk_usable(self) -> bool:
        """Results may come over its bulk channel (it has one, and it has not failed lately)."""
        return bool(self.info.bulk_port) and time.monotonic() >= self._bulk_broken_until

    def fall_back(self, error: DataPlaneError) -> None:
        """Stop using the data path `error` says is broken (TCP instead of shared memory, inline results
        instead of the bulk channel); logged once per switch."""
        with self._lock:
            if isinstance(error, SharedMemoryUnavailable):
                switched, self.shm_refused = not self.shm_refused, True
            else:
                switched = self.bulk_usable
                self._bulk_broken_until = time.monotonic() + BULK_RETRY_S
        if switched:
            log.warning("worker %s: %s; moving its data another way", self.name, error)

    def capacity(self) -> Capacity:
        """The worker as the cost model sees it: rate, cores, round trip, data-plane rate."""
        threads = self.info.threads or self.info.cores or 1
        # Workers report the engine's measured rate on their threads; an old one without it counts as
        # this machine's single-thread rate per thread.
        gflops = self.info.gflops or local_gflops() * threads
        if self.shares_memory:
            rate = None
        elif self.bulk_usable:
            rate = BULK_BYTES_PER_S
        else:
            rate = INLINE_BYTES_PER_S
        return Capacity(self.name, gflops, threads, self.round_trip_s, rate)

    # -- connections ---------------------------------------------------------------------------------
    def connect(self) -> Any:
        from rmidl.remote.transport import worker_proxy

        return worker_proxy(self.uri, self.config, timeout=self.config.connect_timeout)

    def remote(self, work: Callable[[Any], R]) -> R:
        """`work(proxy)` on a proxy owned by the calling thread, returned to the pool unless the call broke
        it. A pooled connection the worker closed while it idled (its idle timeout, or room made for a
        new client) is replaced once: every remote method here may run twice."""
        from Pyro5.errors import ConnectionClosedError

        with self._lock:
            proxy = self._idle.pop() if self._idle else None
        reused = proxy is not None
        while True:
            if proxy is None:
                proxy = self.connect()
            proxy._pyroClaimOwnership()
            try:
                result = work(proxy)
            except ConnectionClosedError:
                # After a timeout or a dropped connection the stream is in an unknown state: never reuse it.
                proxy._pyroRelease()
                if not reused:
                    raise
                reused, proxy = False, None
                continue
            except BaseException:
                proxy._pyroRelease()
                raise
            with self._lock:
                self._idle.append(proxy)
            return result

    @contextmanager
    def running(self) -> Iterator[None]:
        """Count a task in flight on this worker while the block runs."""
        with self._lock:
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def probe(self) -> None:
        """Fetch info() and time a ping on a fresh connection (raises Pyro5 errors if unreachable, and
        AuthenticationError if the worker cannot prove it knows the cluster secret)."""
        from rmidl.remote.shm import host_id

        with self.connect() as proxy:
            self.info = WorkerInfo.from_wire(proxy.info())
            trips = []
            for _ in range(3):  # the least of a few: one round trip on a busy machine is mostly noise
                start = time.perf_counter()
                proxy.ping()
                trips.append(time.perf_counter() - start)
            self.round_trip_s = max(1e-4, min(trips))
        self.same_host = self.info.host_id == host_id()

    def health(self) -> str:
        """"ok" if it answers a ping on a new connection within connect_timeout; otherwise "dead" with
        evidence of death, "untrusted" if it cannot authenticate, else "silent"."""
        try:
            with self.connect() as proxy:
                if proxy.ping() == "pong":
                    return "ok"
        except AuthenticationError:
            return "untrusted"
        except Exception as error:
            log.debug("worker %s does not answer: %r", self.name, error)
        return "dead" if self.gone() else "silent"

    def gone(self) -> bool:
        """Evidence of death: its process no longer exists (same host), or nothing listens on its port."""
        if self.same_host and self.info.pid:
            try:
                os.kill(self.info.pid, 0)
            except ProcessLookupError:
                return True
            except OSError:
                pass  # exists (another user's), or cannot tell
        from Pyro5.core import URI

        location = URI(self.uri)
        try:
            with socket.create_connection((location.host, location.port), self.config.connect_timeout):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    def mark(self, state: str) -> bool:
        """Move out of "ok"; True only for the first caller (so the warning is logged once)."""
        with self._lock:
            if self.state != "ok":
                return False
            self.state = state
            return True

    def failing(self, now: float) -> float:
        """Count one more failed health check at `now`; return how long it has been failing (seconds)."""
        with self._lock:
            if self.failing_since is None:
                self.failing_since = now
            self.failed_checks += 1
            return now - self.failing_since

    # -- work ----------------------------------------------------------------------------------------
    def call(self, record: TaskRecord, *, timeout: float, blobs: Mapping[str, Blob]) -> ReplyRecord:
        """Run one task on the worker within `timeout` s, putting `blobs` first where it lacks them;
        a worker that lost a blob (evicted, restarted) says so, and gets it again once."""
        wire = record.to_wire()
        method = record.METHOD

        def work(proxy: Any) -> Any:
            self._put_blobs(proxy, blobs)
            proxy._pyroTimeout = timeout
            try:
                return getattr(proxy, method)(wire)
            except BankError:
                self._put_blobs(proxy, blobs, force=True)
                proxy._pyroTimeout = timeout
                try:
                    return getattr(proxy, method)(wire)
                except BankError as error:
                    # Evicted again at once (by other tasks' blobs): the worker's cache is too small for
                    # the tasks in flight, not the input's fault; another worker may run it.
                    raise ClusterError(f"worker {self.name} lost this task's blobs right after they were "
                                       f"put ({error}); its blob cache is too small for the tasks in "
                                       "flight (raise its bank_cache_size, the blobs it keeps, or its "
                                       "memory_budget, a quarter of which their bytes may take)") from None

        with self.running():
            raw = self.remote(work)
        return record.parse_reply(raw, max_bytes=self.config.max_message_size)

    def receive(self, result: Result, into: np.ndarray, *, what: str) -> int:
        """Write a task's result into `into`: inline from the reply, or fetched over the bulk channel
        (with the TLS context it expects); returns the bytes that crossed TCP (0 for shared memory)."""
        if result is None:
            return 0
        if isinstance(result, BulkTicket):
            if result.shape != into.shape or result.dtype != into.dtype.name:
                raise RmidlError(f"worker {self.name} offers {result.shape} {result.dtype} for {what}, "
                                 f"expected {into.shape} {into.dtype.name}")
            from rmidl.remote.bulk_fetch import fetch

            if not self.info.bulk_port:
                raise WorkerLost(f"worker {self.name} offered a bulk result but has no bulk channel")
            timeout = deadline(TaskCost(0.0, result_bytes=result.nbytes), self.capacity(),
                               floor=self.config.task_deadline_floor)
            try:
                return fetch(self.host, self.info.bulk_port, result.ticket, into, timeout=timeout,
                             ssl_context=self._bulk_ssl_context())
            except WorkerLost as error:
                if self.health() != "ok":
                    raise
                # E.g. its port flooded by strangers' connections: the worker itself is fine.
                raise DataPlaneError(f"bulk channel of worker {self.name} failed ({error})") from None
        if result.shape != into.shape:
            raise RmidlError(f"worker {self.name} returned shape {result.shape} for {what}, "
                             f"expected {into.shape}")
        into[...] = result
        return int(into.nbytes)

    def put_blobs(self, blobs: Mapping[str, Blob]) -> None:
        """Put the blobs the worker lacks (as far as we know) now, rather than with the next task."""
        self.remote(lambda proxy: self._put_blobs(proxy, blobs))

    def drop_blobs(self, blob_ids: Iterable[str]) -> None:
        """Ask the worker to forget these blobs (best effort: its cache evicts them in time anyway)."""
        ids = [blob_id for blob_id in blob_ids if blob_id in self.blobs]
        if not ids:
            return
        self.blobs.difference_update(ids)
        def work(proxy: Any) -> None:
            proxy._pyroTimeout = self.config.connect_timeout
            for blob_id in ids:
                proxy.drop_blob(blob_id)

        try:
            self.remote(work)
        except Exception as error:
            log.debug("worker %s could not drop %d blob(s): %r", self.name, len(ids), error)

    def release_shm(self, names: list[str]) -> None:
        """Ask the worker to unmap these shared blocks (best effort: it unmaps them later anyway)."""
        def work(proxy: Any) -> None:
            proxy._pyroTimeout = self.config.connect_timeout
            proxy.release_shm(names)

        try:
            self.remote(work)
        except Exception as error:
            log.debug("worker %s could not release %s: %r", self.name, names, error)

    def close(self) -> None:
        """Release every idle proxy (the worker keeps running)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for proxy in idle:
            proxy._pyroClaimOwnership()
            proxy._pyroRelease()

    # -- internals -----------------------------------------------------------------------------------
    def _put_blobs(self, proxy: Any, blobs: Mapping[str, Blob], *, force: bool = False) -> None:
        if not force and self.blobs.issuperset(blobs):
            return
        with self._putting:
            missing = [blob_id for blob_id in blobs if force or blob_id not in self.blobs]
            proxy._pyroTimeout = max(self.config.connect_timeout, self.config.task_deadline_floor)
            for blob_id in missing:
                proxy.put_blob(blob_id, blobs[blob_id].to_wire())
                self.blobs.add(blob_id)
                self.blob_bytes_sent += blobs[blob_id].nbytes

    def _bulk_ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context the worker's bulk channel expects (2-way TLS), or None; made once."""
        from rmidl.remote.transport import client_ssl_context

        if self._ssl is None:
            self._ssl = client_ssl_context(self.config)
        return self._ssl
