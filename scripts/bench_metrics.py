#!/usr/bin/env python
"""What metrics cost: the same jobs with no metrics port open (the no-op recorder) and with one open,
interleaved on in-process daemons, plus the cost of one task's hooks (taken + finished + bytes).

Run: .venv/bin/python scripts/bench_metrics.py [--rounds 7]
Job times are medians and bests over the rounds, off and on run alternately in each round, ratios are
on / off of the same round, so a machine shared with other work skews both alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from rmidl import metrics
from rmidl.client import Coordinator
from rmidl.client.jobboard import JobBoard
from rmidl.config import Config
from rmidl.server.daemon import start_worker
from rmidl.server.nameserver import address_of, start_ns

JOBS = {
    # name: (image H x W, bank K x kh x kw, min_tasks): many small tasks make the hooks' share largest
    "small tasks (256x256, 16x5x5, 96 tasks)": ((256, 256), (16, 5, 5), 96),
    "reference-like (720x1280, 32x11x11)": ((720, 1280), (32, 11, 11), 1),
}


def hook_cost(events: int, metered: bool) -> float:
    """Microseconds of one task's observer calls (taken, finished, received) on a job board."""
    server = metrics.serve_metrics(0) if metered else None
    try:
        board = JobBoard()
        trace = board.trace("correlate", events)
        start = time.perf_counter()
        for task in range(events):
            trace.taken(task, "w1")
            trace.finished(task, "w1", "done")
            trace.received("w1", "bulk", 4096)
        seconds = time.perf_counter() - start
        trace.ended(None)
    finally:
        if server is not None:
            server.close()
    return seconds / events * 1e6


def job_seconds(ns: str, config: Config, run: Callable[[Coordinator], object], metered: bool) -> float:
    server = metrics.serve_metrics(0) if metered else None
    try:
        with Coordinator(ns, config=config, local_threads=1) as co:
            start = time.perf_counter()
            run(co)
            return time.perf_counter() - start
    finally:
        if server is not None:
            server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    config = Config(environ={})
    _, daemon = start_ns("127.0.0.1", 0, config=config)
    thread = daemon.serve_in_thread()
    ns = address_of(daemon)
    workers = [start_worker(ns=ns, name=f"w{i}", config=config, threads=1) for i in (1, 2)]
    for worker in workers:
        worker.serve_in_thread()
    rng = np.random.default_rng(0)
    try:
        print(f"one task's hooks, µs: off {min(hook_cost(20000, False) for _ in range(5)):.2f}, "
              f"on {min(hook_cost(20000, True) for _ in range(5)):.2f} (best of 5, 20000 tasks)")
        header = f"{'off median':>10s} {'on median':>10s} {'on/off median':>14s} {'on/off best':>12s}"
        print(f"{'job':42s} {header}")
        for name, (shape, bank_shape, min_tasks) in JOBS.items():
            image = rng.standard_normal(shape).astype(np.float32)
            bank = rng.standard_normal(bank_shape).astype(np.float32)

            def run(co: Coordinator, image: np.ndarray = image, bank: np.ndarray = bank,
                    min_tasks: int = min_tasks) -> object:
                co.min_tasks = min_tasks
                return co.correlate(image, bank)

            job_seconds(ns, config, run, False)  # warm-up: calibration, caches
            off, on, ratios = [], [], []
            for round_ in range(args.rounds):
                order = (False, True) if round_ % 2 == 0 else (True, False)  # alternate which goes first
                seconds = {metered: job_seconds(ns, config, run, metered) for metered in order}
                off.append(seconds[False])
                on.append(seconds[True])
                ratios.append(seconds[True] / seconds[False])
            print(f"{name:42s} {statistics.median(off):10.3f} {statistics.median(on):10.3f} "
                  f"{statistics.median(ratios):14.3f} {min(on) / min(off):12.3f}")
    finally:
        for worker in workers:
            worker.close()
        daemon.shutdown()
        thread.join(5)


if __name__ == "__main__":
    main()
