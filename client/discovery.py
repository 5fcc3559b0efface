"""The workers a coordinator knows, kept up to date from the registry and healed, off the task path.

`discover()` lists the registry, probes the workers it has not met (in parallel, each within
connect_timeout) and checks again those that are not "ok" once their back-off has passed: one that
answers comes back as a fresh stub (its blobs and connections reset). A registration is removed only on
evidence of death (nothing listens on the worker's port, or its process is gone) or after a worker
stayed silent for `worker_grace` seconds over at least MIN_FAILED_CHECKS checks; a live worker removed
by mistake registers itself again (its heartbeat, server/daemon.py). During jobs `refresh()` runs
discovery in a background thread, so a slow or hung name server never holds up a task.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor, wait

from rmidl.config import Config
from rmidl.errors import AuthenticationError

from .stub import WorkerStub

__all__ = ["MIN_FAILED_CHECKS", "Discovery"]

log = logging.getLogger(__name__)

MIN_FAILED_CHECKS = 3
"""Failed health checks a silent worker needs, besides `worker_grace` seconds, before it is unregistered."""
RECHECK_S = (0.5, 30.0)
"""Back-off of health checks of a worker that is not "ok": first delay, longest delay (doubling)."""
QUARANTINE_S = (5.0, 120.0)
"""Back-off before a worker that missed a task's deadline is tried again (doubling per quarantine)."""
PROBE_THREADS = 16


class Discovery:
    """The coordinator's remote workers by name (`workers`), and their health."""

    def __init__(
        self,
        config: Config,
        *,
        registry: Callable[[], dict[str, str]] | None,
        unregister: Callable[[str, str], object] | None = None,
        only: Collection[str] | None = None,
    ) -> None:
        self.config = config
        self.only: frozenset[str] | None = None if only is None else frozenset(only)
        """The only worker names discovery takes (None: every registered one, also those joining later)."""
        self.quarantines = 0
        """Workers quarantined so far (a job compares it before and after: did one hang meanwhile?)."""
        self._registry = registry
        self._unregister = unregister
        self._workers: dict[str, WorkerStub] = {}
        self._next_check: dict[str, float] = {}
        self._strikes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._discover_lock = threading.Lock()
        self._background: threading.Thread | None = None
        self._last_refresh = -float("inf")

    @property
    def workers(self) -> dict[str, WorkerStub]:
        """A snapshot: name -> stub of every worker met (in any state)."""
        with self._lock:
            return dict(self._workers)

    def usable(self) -> list[WorkerStub]:
        with self._lock:
            return [w for w in self._workers.values() if w.usable]

    # -- looking -------------------------------------------------------------------------------------
    def discover(self) -> list[WorkerStub]:
        """Look now (blocking up to a few connect_timeouts); return the workers that became usable."""
        if self._registry is None:
            return []
        with self._discover_lock:  # jobs of one coordinator may run in several threads
            return self._discover()

    def refresh(self) -> None:
        """Discover in a background thread, unless one runs or started less than discovery_interval ago."""
        if self._registry is None:
            return
        now = time.monotonic()
        with self._lock:
            running = self._background is not None and self._background.is_alive()
            if running or now < self._last_refresh + self.config.discovery_interval:
                return
            self._last_refresh = now
            self._background = threading.Thread(target=self.discover, name="rmidl-discovery", daemon=True)
            self._background.start()

    def _discover(self) -> list[WorkerStub]:
        assert self._registry is not None
        try:
            found = self._registry()
        except Exception as error:  # a name server blip must not fail a job
            log.debug("name server poll failed: %s", error)
            return []
        now = time.monotonic()
        due: list[tuple[str, str, WorkerStub | None]] = []
        with self._lock:
            for name, uri in found.items():
                if self.only is not None and name not in self.only:
                    continue  # not chosen for this coordinator: never probed, never given a task
                known = self._workers.get(name)
                if known is not None and known.uri != uri:
                    known = None  # restarted elsewhere: met anew
                if known is not None and (known.state == "ok" or now < self._next_check.get(name, 0.0)):
                    continue
                due.append((name, uri, known))
        fresh = []
        for (name, uri, known), (stub, verdict) in zip(due, self._probe_all(due), strict=True):
            if verdict == "ok":
                with self._lock:
                    replaced = self._workers.get(name)
                    self._workers[name] = stub
                    self._next_check.pop(name, None)
                if replaced is not None:
                    replaced.close()
                if known is not None:
                    log.info("worker %s answers again; back in use", name)
                fresh.append(stub)
                log.debug("found worker %s (%s)", name, stub.info)
                continue
            if known is None:
                with self._lock:
                    replaced = self._workers.get(name)
                    self._workers[name] = stub
                if replaced is not None:
                    replaced.close()
            self._failed(known or stub, verdict, f"no answer to a probe at {uri}")
        return fresh

    def _probe_all(self, due: list[tuple[str, str, WorkerStub | None]]) -> list[tuple[WorkerStub, str]]:
        """A fresh stub per (name, uri), probed in parallel, with its verdict: ok, untrusted, dead, silent."""
        stubs = [WorkerStub(name, uri, self.config) for name, uri, _ in due]
        if not stubs:
            return []

        def probe(stub: WorkerStub, known: WorkerStub | None) -> str:
            try:
                stub.probe()
                return "ok"
            except AuthenticationError as error:
                log.debug("worker %s cannot authenticate: %s", stub.name, error)
                return "untrusted"
            except Exception as error:
                log.debug("worker %s does not answer: %r", stub.name, error)
                if known is not None:  # what it said about itself (pid, host) helps judge
                    stub.info, stub.same_host = known.info, known.same_host
                return "dead" if stub.gone() else "silent"

        pool = ThreadPoolExecutor(min(PROBE_THREADS, len(stubs)), thread_name_prefix="rmidl-probe")
        futures = [pool.submit(probe, stub, known) for stub, (_, _, known) in zip(stubs, due, strict=True)]
        wait(futures, timeout=4 * self.config.connect_timeout + 1.0)
        pool.shutdown(wait=False)
        return [(stub, future.result() if future.done() else "silent")
                for stub, future in zip(stubs, futures, strict=True)]

    # -- what jobs report ----------------------------------------------------------------------------
    def lost(self, stub: WorkerStub, error: BaseException) -> bool:
        """A call to `stub` broke (a communication error): True if it still answers (a blip), else it is
        marked dead, silent or untrusted (and its registration handled as the evidence allows)."""
        verdict = stub.health()
        if verdict == "ok":
            return True
        if stub.mark(verdict):  # once, whichever of its runner threads noticed first
            log.warning("worker %s lost (%s: %s); its tasks go back to the queue", stub.name, verdict, error)
            self._failed(stub, verdict, str(error))
        return False

    def quarantine(self, stub: WorkerStub, why: str) -> None:
        """`stub` missed a task's deadline: not used again until it has answered after a back-off."""
        if not stub.mark("quarantined"):
            return
        with self._lock:
            self.quarantines += 1
            self._strikes[stub.name] += 1
            first, longest = QUARANTINE_S
            delay = min(longest, first * 2 ** (self._strikes[stub.name] - 1))
            self._next_check[stub.name] = time.monotonic() + delay
        log.warning("worker %s %s; quarantined (tried again in %.0f s)", stub.name, why, delay)

    def distrust(self, stub: WorkerStub, error: BaseException) -> None:
        """`stub` failed authentication mid-job."""
        if stub.mark("untrusted"):
            log.warning("worker %s cannot authenticate (%s); not used", stub.name, error)
            self._failed(stub, "untrusted", str(error))

    def close(self) -> None:
        with self._lock:
            stubs, background = list(self._workers.values()), self._background
        for stub in stubs:
            stub.close()
        if background is not None:
            background.join(1.0)  # a hung name server ends it within connect_timeout; not waited for

    # -- internals -----------------------------------------------------------------------------------
    def _failed(self, stub: WorkerStub, verdict: str, why: str) -> None:
        """Record a failed check of `stub` (state `verdict`); unregister it once the evidence allows."""
        now = time.monotonic()
        was = stub.state
        stub.state = verdict
        failing = stub.failing(now)
        first, longest = RECHECK_S
        with self._lock:
            self._next_check[stub.name] = now + min(longest, first * 2 ** (stub.failed_checks - 1))
        if verdict == "untrusted":
            if was != "untrusted":
                log.warning("worker %s at %s cannot prove it knows the cluster secret; not used", stub.name,
                            stub.uri)
        elif verdict == "dead":
            self._drop_registration(stub, f"dead ({why})")
        elif stub.failed_checks >= MIN_FAILED_CHECKS and failing >= self.config.worker_grace:
            self._drop_registration(stub, f"silent for {failing:.0f} s over {stub.failed_checks} checks")

    def _drop_registration(self, stub: WorkerStub, why: str) -> None:
        """Remove a worker's entry (only while it names this stub's URI: a restarted worker keeps its own)."""
        if self._unregister is None:
            return
        try:
            if self._unregister(stub.name, stub.uri):
                log.warning("unregistered worker %s at %s: %s", stub.name, stub.uri, why)
        except Exception as error:
            log.debug("could not unregister %s: %s", stub.name, error)
