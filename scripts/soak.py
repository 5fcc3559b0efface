#!/usr/bin/env python3
"""Bounded soak: concurrent coordinators send many small jobs to local workers; every result must be
exact, and the workers' threads, open files and RSS must not grow beyond a small bound.

    python scripts/soak.py [--jobs 200] [--coordinators 4] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import scipy.signal

from rmidl.client import Coordinator
from rmidl.client.cli.status import collect
from rmidl.client.localcluster import LocalCluster
from rmidl.config import Config

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


def run_soak(jobs: int = 200, coordinators: int = 4, workers: int = 2, jobs_per_connection: int = 10,
             warmup: int = 8) -> dict[str, Any]:
    """Run the soak on a fresh LocalCluster; return counts, the worst error and per-worker stats."""
    with LocalCluster(workers=workers, threads_per_worker=1, die_with_parent=True) as cluster:
        pids = {name: process.pid for name, process in cluster.workers.items()}

        def client(index: int, count: int) -> float:
            rng = np.random.default_rng(1000 + index)
            worst = 0.0
            shared = index % 2 == 0  # half the coordinators take the TCP data plane
            label = "shared memory" if shared else "tcp"
            done = 0
            while done < count:
                batch = min(jobs_per_connection, count - done)
                with Coordinator(cluster.ns_address, local_threads=0, shared_memory=shared) as coordinator:
                    for _ in range(batch):
                        worst = max(worst, one_job(coordinator, rng, label))
                done += batch
            return worst

        client(-1, warmup)  # warm the workers' thread pools and caches before the baseline
        before = {name: process_stats(pid) for name, pid in pids.items()}
        shares = [jobs // coordinators + (i < jobs % coordinators) for i in range(coordinators)]
        start = time.perf_counter()
        with ThreadPoolExecutor(coordinators) as pool:
            worst = max(pool.map(client, range(coordinators), shares))
        seconds = time.perf_counter() - start
        after = {name: process_stats(pid) for name, pid in pids.items()}
        tasks_done = {row["name"]: row["tasks_done"] for row in collect(cluster.ns_address, Config())}
    growth = {name: {key: after[name][key] - before[name][key] for key in BOUNDS} for name in pids}
    return {
        "jobs": jobs, "coordinators": coordinators, "workers": workers, "seconds": seconds,
        "worst_relative_error": worst, "before": before, "after": after, "growth": growth,
        "tasks_done": tasks_done, "bounds": BOUNDS, "threads_alive_here": threading.active_count(),
    }


def over_bounds(result: dict[str, Any]) -> list[str]:
    """Each worker statistic that grew beyond its bound, as text."""
    return [f"{name}: {key} grew by {value:g} (bound {BOUNDS[key]:g})"
            for name, grown in result["growth"].items()
            for key, value in grown.items() if value > BOUNDS[key]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--coordinators", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    result = run_soak(args.jobs, args.coordinators, args.workers)
    print(json.dumps(result, indent=2))
    problems = over_bounds(result)
    for problem in problems:
        print(f"soak: {problem}", file=sys.stderr)
    print(f"soak: {result['jobs']} jobs in {result['seconds']:.1f} s, worst error "
          f"{result['worst_relative_error']:.1e}, {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
