#!/usr/bin/env python
"""Issue 3's cluster benchmark: the reference job in-process, on `rmidl up`-style workers (shm, TCP), on Dask.

Run: .venv/bin/python scripts/bench_cluster.py [--repeat 3] [--workers 2]
Times are medians after one warm-up run; ratios are against the in-process baseline measured in the same
run, since the machine may be shared. Dask distributed is measured when it is importable.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import rmidl
from rmidl.client import Coordinator
from rmidl.client.localcluster import LocalCluster
from rmidl.imaging import default_image
from rmidl.kernels import available_cores


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of this process and `pids` (children: workers), from /proc."""
    total = sum(os.times()[:2])
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


@dataclass
class Timing:
    """Median wall seconds of the runs after a warm-up, each run's wall and CPU seconds, the last result.
    CPU seconds (this process + the workers) are what contention on a shared machine inflates least."""

    median: float
    runs: list[float]
    cpu: float
    result: Any


def timed(repeat: int, call: Callable[[], Any], pids: Sequence[int] = ()) -> Timing:
    result = call()
    walls, cpus = [], []
    for _ in range(repeat):
        del result
        cpu = cpu_seconds(pids)
        start = time.perf_counter()
        result = call()
        walls.append(time.perf_counter() - start)
        cpus.append(cpu_seconds(pids) - cpu)
    return Timing(statistics.median(walls), walls, statistics.median(cpus), result)


def dask_job(image: np.ndarray, kernels: np.ndarray, workers: int, repeat: int) -> Timing | None:
    """The same job with dask.array.map_overlap on a distributed LocalCluster, gathered to this process."""
    try:
        import dask.array as da
        from distributed import Client
        from distributed import LocalCluster as DaskCluster
    except ImportError:
        return None
    k, kh, kw = kernels.shape
    if kh % 2 == 0 or kw % 2 == 0:
        return None  # map_overlap's zero boundary needs a symmetric halo: odd kernels only
    top, left = kh // 2, kw // 2
    rows = -(-image.shape[0] // (2 * workers))

    def block(chunk: np.ndarray) -> np.ndarray:
        # A chunk with its halo: its valid correlation is the chunk's rows of the zero-padded "same" maps.
        return rmidl.correlate(chunk, kernels, mode="valid", threads=1)

    cluster = DaskCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        array = da.from_array(image, chunks=(rows, image.shape[1]))
        lazy = da.map_overlap(
            block, array, depth={0: top, 1: left}, boundary=0, trim=False,
            new_axis=[0], chunks=((k,), array.chunks[0], (image.shape[1],)), dtype=np.float32,
            allow_rechunk=False,
        )

        def run() -> np.ndarray:
            same = client.compute(lazy).result()
            return same[:, top : top + image.shape[0] - kh + 1, left : left + image.shape[1] - kw + 1]

        return timed(repeat, run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kernels", default="random:128x11x11")
    parser.add_argument("--no-dask", action="store_true")
    args = parser.parse_args(argv)

    image = default_image()
    kernels = rmidl.load_kernels(args.kernels)
    k, kh, kw = kernels.shape
    out_bytes = k * (image.shape[0] - kh + 1) * (image.shape[1] - kw + 1) * 4
    flops = 2.0 * kh * kw * out_bytes / 4
    print(f"reference job: {image.shape[1]}x{image.shape[0]} image, {k} kernels {kh}x{kw}, valid: "
          f"{flops / 1e9:.2f} GFLOP, {out_bytes / 1e6:.0f} MB out; {available_cores()} cores; "
          f"median of {args.repeat} after a warm-up")
    rows: list[tuple[str, Timing, str]] = []

    base = timed(args.repeat, lambda: rmidl.correlate(image, kernels, threads=2))
    rows.append(("in-process rmidl.correlate, 2 threads", base, "baseline"))
    reference = base.result
    scale = float(np.abs(reference).max())

    def check(timing: Timing, what: str) -> Timing:
        error = float(np.abs(timing.result - reference).max()) / scale
        if error > 1e-5:
            raise SystemExit(f"{what}: result differs from the baseline by {error:.1e}")
        timing.result = None
        return timing

    moved: dict[str, Any] = {}
    with LocalCluster(workers=args.workers, threads_per_worker=1, die_with_parent=True) as cluster:
        paths = ((True, "shared memory", "<= 1.25x"), (False, "TCP (bulk channel)", "<= 1.0 s"))
        for shm, name, target in paths:
            with Coordinator(cluster.ns_address, local_threads=0, shared_memory=shm) as coordinator:
                timing = timed(args.repeat, lambda c=coordinator: c.correlate(image, kernels), cluster.pids())
                rows.append((f"{args.workers} workers x 1 thread, {name}", check(timing, name), target))
                if not shm:
                    moved = coordinator.last_job()
    dask = None if args.no_dask else dask_job(image, kernels, args.workers, args.repeat)
    if dask is not None:
        name = f"Dask distributed {args.workers} x 1 thread, map_overlap + gather"
        dask.cpu = float("nan")  # its worker processes are not ours to read
        rows.append((name, check(dask, "dask"), "-"))

    header = f"{'configuration':<58} {'median s':>9} {'x base':>7} {'GFLOP/s':>8} {'CPU s':>6}  target"
    print(f"\n{header}    runs")
    for name, timing, target in rows:
        runs = " ".join(f"{t:.3f}" for t in timing.runs)
        cells = f"{timing.median:9.3f} {timing.median / base.median:7.2f} {flops / timing.median / 1e9:8.1f}"
        print(f"{name:<58} {cells} {timing.cpu:6.2f}  {target:<9} {runs}")
    shm_s, tcp = rows[1][1].median, rows[2][1].median
    if moved.get("moving_seconds"):
        rate = moved["moved_bytes"] / moved["moving_seconds"] / 1e6
        print(f"\ndata plane (bulk side channel): {moved['moved_bytes'] / 1e6:.0f} MB received at "
              f"{rate:.0f} MB/s per stream while receiving; "
              f"{out_bytes / tcp / 1e6:.0f} MB/s of results over the whole TCP job")
    print(f"shared memory: {shm_s / base.median:.2f}x the baseline (target <= 1.25x), CPU "
          f"{rows[1][1].cpu / base.cpu:.2f}x; TCP path: {tcp:.3f} s (target <= 1.0 s)", end="")
    if dask is not None:
        print(f"; Dask / TCP = {dask.median / tcp:.1f}x (target >= 2x)")
    else:
        print("; Dask distributed not importable (pip install 'rmidl[bench]') or skipped")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
