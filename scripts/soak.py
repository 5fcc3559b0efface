#!/usr/bin/env python3
"""Bounded soak: concurrent coordinators send many small jobs to local workers; every result must be
exact, the workers' threads, open files and RSS must not grow beyond a small bound after warm-up, and
no shared-memory block of ours may be left in /dev/shm.

    python scripts/soak.py [--jobs 200] [--coordinators 4] [--workers 2]
    python scripts/soak.py --faults --workers 3   # the load test: one worker killed, one paused meanwhile

With --faults, once a quarter of the jobs are done worker w1 is SIGKILLed, and at 40% worker w2 is
SIGSTOPped for --pause seconds (past the coordinators' task deadline, so it is quarantined and comes
back); the statistics are those of the workers that survive.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import scipy.signal

from rmidl.client import Coordinator
from rmidl.client.census import census
from rmidl.client.localcluster import LocalCluster
from rmidl.config import Config
from rmidl.remote.shm import NAME_PREFIX

MODES = ("valid", "same", "full")
# Growth allowed between the warm state and the end: a thread pool may still grow a little.
BOUNDS = {"threads": 8, "fds": 8, "rss_mib": 48.0}


def process_stats(pid: int) -> dict[str, float]:
    """Threads, open file descriptors and resident memory (MiB) of a live process, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return {
        "threads": int(fields["Threads"][0]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_mib": int(fields["VmRSS"][0]) / 1024,
    }


def reference(image: np.ndarray, bank: np.ndarray, mode: str) -> np.ndarray:
    """float64 correlation, kernel by kernel, with scipy."""
    return np.stack([scipy.signal.correlate(image.astype(np.float64), k.astype(np.float64), mode=mode)
                     for k in bank])


def one_job(coordinator: Coordinator, rng: np.random.Generator, shared_memory_label: str) -> float:
    """Run one random small job and return its error relative to max|reference| (must be <= 1e-5)."""
    height, width = int(rng.integers(24, 64)), int(rng.integers(24, 64))
    kh, kw = int(rng.integers(1, 8)), int(rng.integers(1, 8))
    image = rng.standard_normal((height, width)).astype(np.float32)
    bank = rng.standard_normal((int(rng.integers(1, 9)), kh, kw)).astype(np.float32)
    mode = MODES[int(rng.integers(len(MODES)))]
    got = coordinator.correlate(image, bank, mode=mode)
    want = reference(image, bank, mode)
    error = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
    if error > 1e-5:
        shape = f"{height}x{width} * {bank.shape} {mode}"
        raise AssertionError(f"job {shape} ({shared_memory_label}) off by {error:.2e}")
    return error


def our_blocks() -> set[str]:
    """Shared-memory blocks this process created (its coordinators') that still exist."""
    mine = f"{NAME_PREFIX}{os.getpid()}_"
    return {entry.name for entry in Path("/dev/shm").glob(f"{mine}*")} if Path("/dev/shm").is_dir() else set()


class Faults:
    """Kills w1 once `kill_at` jobs are done and pauses w2 for `pause_s` at `pause_at` (a thread)."""

    def __init__(self, cluster: LocalCluster, kill_at: int, pause_at: int, pause_s: float) -> None:
        self.cluster, self.kill_at, self.pause_at, self.pause_s = cluster, kill_at, pause_at, pause_s
        self.done = 0
        self.events: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def job_done(self) -> None:
        with self._cond:
            self.done += 1
            self._cond.notify_all()

    def _wait_for(self, count: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.done >= count)

    def _run(self) -> None:
        self._wait_for(self.kill_at)
        self.cluster.kill("w1")
        self.events.append(f"w1 killed after {self.done} jobs")
        self._wait_for(self.pause_at)
        self.cluster.kill("w2", signal.SIGSTOP)
        self.events.append(f"w2 paused after {self.done} jobs")
        time.sleep(self.pause_s)  # the length of the fault, not a synchronisation
        self.cluster.kill("w2", signal.SIGCONT)
        self.events.append(f"w2 resumed after {self.done} jobs")

    def join(self) -> None:
        with self._cond:
            self.done = 1 << 30
            self._cond.notify_all()
        self._thread.join(self.pause_s + 10)
        self.cluster.kill("w2", signal.SIGCONT)


def run_soak(jobs: int = 200, coordinators: int = 4, workers: int = 2, *, jobs_per_connection: int = 10,
             warmup: int = 8, faults: bool = False, pause_s: float = 4.0) -> dict[str, Any]:
    """Run the soak on a fresh LocalCluster; return counts, the worst error and per-worker stats.
    `faults`: the load test (see the module docstring); needs at least 3 workers."""
    if faults and workers < 3:
        raise ValueError("the load test kills one worker and pauses another: it needs --workers >= 3")
    # Under faults a paused worker must miss its deadline (quarantine) and be probed back quickly.
    config = Config(task_deadline_floor=2.0, connect_timeout=2.0) if faults else Config()
    blocks_before = our_blocks()
    with LocalCluster(workers=workers, threads_per_worker=1, die_with_parent=True) as cluster:
        pids = {name: process.pid for name, process in cluster.workers.items()}
        injector: Faults | None = None

        def client(index: int, count: int) -> float:
            rng = np.random.default_rng(1000 + index)
            worst = 0.0
            shared = index % 2 == 0  # half the coordinators take the TCP data plane
            label = "shared memory" if shared else "tcp"
            done = 0
            while done < count:
                batch = min(jobs_per_connection, count - done)
                with Coordinator(cluster.ns_address, local_threads=0, shared_memory=shared,
                                 config=config) as coordinator:
                    for _ in range(batch):
                        worst = max(worst, one_job(coordinator, rng, label))
                        if injector is not None:
                            injector.job_done()
                done += batch
            return worst

        def clients(indices: range, shares: list[int]) -> float:
            with ThreadPoolExecutor(len(shares)) as pool:
                return max(pool.map(client, indices, shares))

        # Warm the workers' thread pools and caches at the soak's concurrency before the baseline.
        clients(range(-coordinators, 0), [max(1, warmup // coordinators)] * coordinators)
        before = {name: process_stats(pid) for name, pid in pids.items()}
        if faults:
            injector = Faults(cluster, kill_at=jobs // 4, pause_at=jobs * 2 // 5, pause_s=pause_s)
        shares = [jobs // coordinators + (i < jobs % coordinators) for i in range(coordinators)]
        start = time.perf_counter()
        try:
            worst = clients(range(coordinators), shares)
        finally:
            if injector is not None:
                injector.join()
        seconds = time.perf_counter() - start
        alive = {name: pid for name, pid in pids.items() if cluster.workers[name].alive()}
        after = {name: process_stats(pid) for name, pid in alive.items()}
        tasks_done = {row["name"]: row["tasks_done"] for row in census(cluster.ns_address, Config())
                      if row.get("tasks_done") is not None}
    growth = {name: {key: after[name][key] - before[name][key] for key in BOUNDS} for name in alive}
    return {
        "jobs": jobs, "coordinators": coordinators, "workers": workers, "seconds": seconds,
        "worst_relative_error": worst, "before": before, "after": after, "growth": growth,
        "tasks_done": tasks_done, "bounds": BOUNDS, "threads_alive_here": threading.active_count(),
        "faults": injector.events if injector is not None else [],
        "shm_left": sorted(our_blocks() - blocks_before),
    }


def over_bounds(result: dict[str, Any]) -> list[str]:
    """Each worker statistic that grew beyond its bound, and every block left in /dev/shm, as text."""
    grown = [f"{name}: {key} grew by {value:g} (bound {BOUNDS[key]:g})"
             for name, growth in result["growth"].items()
             for key, value in growth.items() if value > BOUNDS[key]]
    return grown + [f"left in /dev/shm: {name}" for name in result["shm_left"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--coordinators", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--faults", action="store_true", help="kill w1 and pause w2 during the run")
    parser.add_argument("--pause", type=float, default=4.0, metavar="S", help="seconds w2 stays paused")
    args = parser.parse_args(argv)
    result = run_soak(args.jobs, args.coordinators, args.workers, faults=args.faults, pause_s=args.pause)
    print(json.dumps(result, indent=2))
    problems = over_bounds(result)
    for problem in problems:
        print(f"soak: {problem}", file=sys.stderr)
    print(f"soak: {result['jobs']} jobs in {result['seconds']:.1f} s, worst error "
          f"{result['worst_relative_error']:.1e}, {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
