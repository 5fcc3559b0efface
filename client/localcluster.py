"""A name server and N worker subprocesses on 127.0.0.1, started ready and always stopped (`rmidl up`,
notebooks, tests)."""

from __future__ import annotations

import ctypes
import html
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

from rmidl.config import Config
from rmidl.errors import ClusterError, OptionError
from rmidl.remote import clusterfile

__all__ = ["LOG_FORMAT", "LocalCluster", "Process", "log_flags"]

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s: %(message)s"
"""How `rmidl` commands log; a child's lines in this form are logged again here, at their level."""
_LEVELS = {name: getattr(logging, name) for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}
_LOG_LINE = re.compile(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} (\S+) ({'|'.join(_LEVELS)}): (.*)$")

_ADDRESS = re.compile(r"(?:@|\b)((?:\d{1,3}\.){3}\d{1,3}|localhost):(\d{1,5})\b")
_READY = re.compile(r"\bready\b", re.IGNORECASE)
_METRICS = re.compile(r"^metrics (https?://\S+)$")
# Output lines kept per child: enough for the start-up lines and an error's context.
KEEP_LINES = 200


class Process:
    """One child (`python -m rmidl.client.cli ...`) whose output lines are read by a thread."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], *,
                 die_with_parent: bool = False) -> None:
        self.name = name
        self.lines: deque[str] = deque(maxlen=KEEP_LINES)
        """The child's last KEEP_LINES output lines (a long-lived `rmidl up` must not hoard them all)."""
        self._ready = False
        self._eof = False
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "rmidl.client.cli", *argv],
            preexec_fn=_parent_death_signal() if die_with_parent else None,  # noqa: PLW1509 (see there)
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(env),
            # Own process group: a Ctrl-C in the terminal reaches `rmidl up`, which stops children in order.
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"rmidl-out-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.popen.stdout:
            for raw in self.popen.stdout:
                line = raw.rstrip("\n")
                record = _LOG_LINE.match(line)
                if record:  # the child's log line, under its logger and level: filtered as ours are
                    level = _LEVELS[record[2]]
                    logging.getLogger(record[1]).log(level, "[%s] %s", self.name, record[3])
                else:
                    log.debug("[%s] %s", self.name, line)
                with self._cond:
                    self.lines.append(line)
                    # Seen here, not by the waiter: more than KEEP_LINES may pass before it looks.
                    self._ready = self._ready or bool(_READY.search(line))
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_ready(self, timeout: float) -> list[str]:
        """Block until the child prints a line saying "ready"; return its lines so far."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._eof, timeout)
            if self._ready:
                return list(self.lines)
            if not self._eof:
                raise ClusterError(f"{self.name} did not get ready in {timeout:.0f} s: {self._tail()}")
        code = self.popen.wait()
        raise ClusterError(f"{self.name} exited with code {code} before it was ready: {self._tail()}")

    def _tail(self) -> str:
        return " | ".join(list(self.lines)[-5:]) or "(no output)"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Ask politely (SIGTERM: workers unregister), wait `timeout`, then SIGKILL; return the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing", self.name, self.pid, timeout)
                self.popen.kill()
        code = self.popen.wait()
        self._reader.join(timeout)
        return code


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the thread that started it dies (even by
    SIGKILL), or None where prctl is missing. libc is resolved here, before fork, so the child only
    makes one foreign call between fork and exec."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_signal() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return set_signal


def log_flags(level: int) -> list[str]:
    """The `rmidl` option that gives a child command the log level `level` (none for WARNING)."""
    if level <= logging.DEBUG:
        return ["--debug"]
    if level <= logging.INFO:
        return ["--verbose"]
    return ["--quiet"] if level >= logging.ERROR else []


class LocalCluster:
    """A Pyro5 name server and `workers` worker daemons as subprocesses on 127.0.0.1.

    Returns when every worker printed "ready" (it registers before that). `.address` is the name
    server's HOST:PORT and `.config` the settings (secret included) a Coordinator needs; `.stop()` (or
    leaving the `with` block) stops them all::

        with LocalCluster(workers=2, secure=True) as cluster:
            with Coordinator(cluster.address, config=cluster.config) as co:
                maps = co.correlate(image, bank)

    `metrics_port` P gives every child a Prometheus metrics port: P for the name server and P+i for
    worker i (P=0: any free ones); `.metrics` maps "ns" and each worker's name to its URL.
    `secure=True` generates a secret the daemons require (unless `config` has one), so other local
    users cannot drive them; `cluster_file=True` also writes a cluster file (see
    `rmidl.remote.clusterfile`) so that `rmidl status` / `rmidl run` find the cluster without `--ns`.
    Children log at `log_level` (default: the level of the "rmidl" logger here), and their log lines
    are logged again here under their own logger names. `env` is added to every child's environment
    (RMIDL_* settings; BLAS starts single-threaded unless `env` says otherwise).
    """

    def __init__(
        self,
        workers: int = 2,
        threads_per_worker: int = 1,
        ns_port: int = 0,
        *,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 60.0,
        config: Config | None = None,
        die_with_parent: bool = False,
        secure: bool = False,
        cluster_file: bool = False,
        log_level: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        for what, value, least in (("workers", workers, 0), ("threads_per_worker", threads_per_worker, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise OptionError(f"{what}={value!r} must be an integer >= {least}")
        if isinstance(ns_port, bool) or not isinstance(ns_port, int) or not 0 <= ns_port <= 65535:
            # said here as the input error it is, not as a name server that failed to start
            raise OptionError(f"ns_port={ns_port!r} must be a port number 0-65535 (0: any free port)")
        if metrics_port is not None and (isinstance(metrics_port, bool) or not isinstance(metrics_port, int)
                                         or not 0 <= metrics_port <= 65535 - workers):
            raise OptionError(f"metrics_port={metrics_port!r} must leave room for {workers + 1} ports "
                              "below 65536 (0: any free ports)")
        self.metrics_port = metrics_port
        self.metrics: dict[str, str] = {}
        """Metrics URL of each child ("ns" and the worker names), with `metrics_port`."""
        self.config = config or Config()
        if secure and not self.config.secret:
            self.config = self.config.replace(secret=clusterfile.new_secret())
        self.log_level = logging.getLogger("rmidl").getEffectiveLevel() if log_level is None else log_level
        # Children get SIGTERM if the thread that started them dies, even by SIGKILL: for `rmidl up`,
        # whose main thread lives as long as the cluster (not for clusters started from short threads).
        self.die_with_parent = die_with_parent
        self.threads_per_worker = threads_per_worker
        self.ready_timeout = ready_timeout
        # Workers run the engine on their own threads and pin BLAS to one inside each call; starting them
        # with one BLAS thread still pays: the reference job (1280x720, 128x11x11, 2 workers) took 1.27x
        # (1 thread each) and 1.15x (2 threads each) as long with BLAS left at every core (Nov 2026).
        single = {name: "1" for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **single, **(env or {})}
        if self.config.secret:  # children read it from the environment, never from the command line
            self.env["RMIDL_SECRET"] = self.config.secret
        self.ns: Process | None = None
        self.workers: dict[str, Process] = {}
        self.ns_address = ""
        self.cluster_file: Path | None = None
        """The cluster file written for this cluster (`cluster_file=True`), removed by stop()."""
        self._count = 0
        self._stopped = False
        try:
            self._start_ns(ns_port)
            pending = [self._spawn_worker() for _ in range(workers)]
            for process in pending:
                self._note_metrics(process, process.wait_ready(ready_timeout))
            if cluster_file:
                self.cluster_file = clusterfile.write(self.ns_address, self.config.secret, workers=workers,
                                                     config=self.config)
        except BaseException:
            self.stop()
            raise

    @property
    def address(self) -> str:
        """The name server's HOST:PORT, as a Coordinator and `--ns` take it."""
        return self.ns_address

    def _metrics_flags(self, index: int) -> list[str]:
        """`--metrics-port` of child `index` (0 the name server, i worker i), if metrics are asked for."""
        if self.metrics_port is None:
            return []
        return ["--metrics-port", str(self.metrics_port + index if self.metrics_port else 0)]

    def _note_metrics(self, process: Process, lines: list[str]) -> None:
        for line in lines:
            match = _METRICS.match(line)
            if match:
                self.metrics[process.name.removeprefix("worker ")] = match.group(1)
                return

    def _start_ns(self, port: int) -> None:
        argv = ["ns", "--host", "127.0.0.1", "--port", str(port), *self._metrics_flags(0),
                *log_flags(self.log_level)]
        self.ns = Process("ns", argv, self.env, die_with_parent=self.die_with_parent)
        lines = self.ns.wait_ready(self.ready_timeout)
        self._note_metrics(self.ns, lines)
        for line in reversed(lines):
            match = _ADDRESS.search(line)
            if match:
                self.ns_address = f"{match.group(1)}:{match.group(2)}"
                return
        raise ClusterError(f"name server printed no HOST:PORT: {' | '.join(lines)}")

    def restart_ns(self) -> None:
        """Start the name server again on the address it had (after it died): its workers find it there
        and register again by their heartbeat, coordinators on their next look."""
        port = int(self.ns_address.rsplit(":", 1)[1])
        if self.ns is not None:
            self.ns.stop()
        self._start_ns(port)

    def _spawn_worker(self, name: str | None = None, env: Mapping[str, str] | None = None) -> Process:
        self._count += 1
        name = name or f"w{self._count}"
        argv = ["worker", "--ns", self.ns_address, "--host", "127.0.0.1", "--port", "0",
                "--threads", str(self.threads_per_worker), "--name", name, *self._metrics_flags(self._count),
                *log_flags(self.log_level)]
        process = Process(f"worker {name}", argv, {**self.env, **(env or {})},
                          die_with_parent=self.die_with_parent)
        self.workers[name] = process
        return process

    def add_worker(self, name: str | None = None, *, env: Mapping[str, str] | None = None) -> str:
        """Start one more worker and wait until it is ready; `env` is added to its environment alone, over
        the cluster's: RMIDL_* settings that make it differ (a smaller memory_budget, another cache size)."""
        process = self._spawn_worker(name, env)
        self._note_metrics(process, process.wait_ready(self.ready_timeout))
        return process.name.removeprefix("worker ")

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        """Send `signum` to one worker (fault injection) and reap it if it was SIGKILL."""
        process = self.workers[name]
        process.signal(signum)
        if signum == signal.SIGKILL:
            process.popen.wait()

    def pids(self) -> list[int]:
        children = [self.ns] if self.ns else []
        return [p.pid for p in [*children, *self.workers.values()]]

    @property
    def state(self) -> str:
        """"running", "stopped", or what is wrong ("2 of 3 workers exited", "name server exited")."""
        if self._stopped:
            return "stopped"
        if self.ns is None or not self.ns.alive():
            return "name server exited"
        exited = sum(not process.alive() for process in self.workers.values())
        return f"{exited} of {len(self.workers)} workers exited" if exited else "running"

    def _summary(self) -> tuple[str, str, str]:
        count = len(self.workers)
        secured = "secret" if self.config.secret else "no secret"
        return f"{count} worker{'s' if count != 1 else ''}", secured, self.state

    def __repr__(self) -> str:
        workers, secured, state = self._summary()
        return f"<LocalCluster {self.ns_address or '(no name server)'}: {workers}, {secured}, {state}>"

    def _repr_html_(self) -> str:
        """The cluster as a small table in a notebook (Jupyter calls this)."""
        workers, secured, state = self._summary()
        rows = [("address", self.ns_address), ("workers", f"{workers}: {', '.join(self.workers)}"),
                ("threads per worker", str(self.threads_per_worker)), ("security", secured),
                ("state", state)]
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(key)}</th>"
                        f"<td style='text-align:left'>{html.escape(value)}</td></tr>" for key, value in rows)
        return f"<div><strong>rmidl LocalCluster</strong><table>{cells}</table></div>"

    def stop(self, timeout: float = 5.0) -> None:
        """Workers first (they unregister from the name server), then the name server; no orphans.
        Removes the cluster file first, so no command picks a cluster that is going away."""
        self._stopped = True
        if self.cluster_file is not None:
            clusterfile.remove(self.cluster_file)
            self.cluster_file = None
        for process in self.workers.values():
            process.signal(signal.SIGTERM)
        for process in self.workers.values():
            process.stop(timeout)
        if self.ns is not None:
            self.ns.stop(timeout)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
