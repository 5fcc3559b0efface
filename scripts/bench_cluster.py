#!/usr/bin/env python
"""Issue 12's data-plane benchmark: the reference job in-process and on `rmidl up`-style workers.

Run: .venv/bin/python scripts/bench_cluster.py [--repeat 5] [--workers 2] [--compare /work/wt/oldmain]

Every configuration runs once per round, rounds interleave the configurations (and, with --compare,
the same configurations on another checkout's code, served by a child process with that checkout's
python), so a busy machine slows them alike. Figures are medians over the rounds after a warm-up round:
wall seconds, and CPU seconds of this process plus its workers (what contention inflates least). Ratios
are against the in-process job of the same side. Configurations:
  in-process out=      rmidl.correlate into a warm preallocated out= (the fresh-output baseline)
  in-process           rmidl.correlate, fresh output (what users call; the cluster baseline)
  in-process np.empty  rmidl.correlate into out=np.empty(...) made per call (numpy's fresh pages)
  shared memory        a Coordinator over N workers x 1 thread, shared memory
  TCP                  the same with shared_memory=False (bulk channel on loopback)
  bulk channel         one 462 MB result fetched over the bulk channel in this process (one stream)
  socket recv_into     the same bytes over a plain loopback socket into the same buffer (the ceiling)
Dask distributed (map_overlap + gather) is measured once at the end when importable.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

import rmidl
from rmidl.client import Coordinator
from rmidl.client.localcluster import LocalCluster
from rmidl.imaging import default_image
from rmidl.kernels import available_cores

CONFIGS = ["in-process out=", "in-process", "in-process np.empty", "shared memory", "TCP", "bulk channel",
           "socket recv_into"]
BASELINE = "in-process"


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


def _bulk_module() -> Any:
    try:
        from rmidl.remote import bulk
    except ImportError:  # an older checkout
        from rmidl import bulk  # type: ignore[no-redef]
    return bulk


class Side:
    """The configurations on this checkout's code, in this process (`--serve` runs one for --compare)."""

    def __init__(self, workers: int, kernels_spec: str) -> None:
        self.image = default_image()
        self.kernels = rmidl.load_kernels(kernels_spec)
        self.reference = rmidl.correlate(self.image, self.kernels, threads=2)
        self.scale = float(np.abs(self.reference).max())
        self.warm_out = np.zeros_like(self.reference)
        self.cluster = LocalCluster(workers=workers, threads_per_worker=1, die_with_parent=True)
        self.cluster.__enter__()
        try:
            self.shm = Coordinator(self.cluster.ns_address, local_threads=0, shared_memory=True)
            self.tcp = Coordinator(self.cluster.ns_address, local_threads=0, shared_memory=False)
        except BaseException:
            self.cluster.__exit__(None, None, None)
            raise
        self.bulk = _bulk_module()
        self.bulk_server = self.bulk.BulkServer("127.0.0.1")
        self.payload = np.ones(self.reference.size, np.float32)
        self.moved: dict[str, Any] = {}

    def close(self) -> None:
        self.bulk_server.close()
        self.shm.close()
        self.tcp.close()
        self.cluster.__exit__(None, None, None)

    def calls(self) -> dict[str, Callable[[], np.ndarray | None]]:
        image, kernels = self.image, self.kernels

        def tcp() -> np.ndarray:
            result = self.tcp.correlate(image, kernels)
            self.moved = self.tcp.last_job()
            return result

        return {
            "in-process out=": lambda: rmidl.correlate(image, kernels, threads=2, out=self.warm_out),
            "in-process": lambda: rmidl.correlate(image, kernels, threads=2),
            "in-process np.empty": lambda: rmidl.correlate(image, kernels, threads=2,
                                                           out=np.empty(self.reference.shape, np.float32)),
            "shared memory": lambda: self.shm.correlate(image, kernels),
            "TCP": tcp,
            "bulk channel": self._bulk_fetch,
            "socket recv_into": self._socket_recv,
        }

    def run(self, name: str) -> dict[str, Any]:
        """One timed call: wall and CPU seconds, and its result's error against the in-process one."""
        call = self.calls()[name]
        pids = self.cluster.pids()
        cpu = cpu_seconds(pids)
        start = time.perf_counter()
        result = call()
        wall = time.perf_counter() - start
        cpu = cpu_seconds(pids) - cpu
        error = 0.0
        if result is not None:
            error = float(np.abs(result - self.reference).max()) / self.scale
        sample = {"wall": wall, "cpu": cpu, "error": error}
        if name == "TCP" and self.moved.get("moving_seconds"):
            sample["stream_bytes_per_s"] = self.moved["moved_bytes"] / self.moved["moving_seconds"]
        return sample

    def _bulk_fetch(self) -> None:
        ticket = self.bulk_server.offer(self.payload)
        self.bulk.fetch("127.0.0.1", self.bulk_server.port, ticket, self.warm_out.reshape(-1), timeout=60)

    def _socket_recv(self) -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            def send() -> None:
                connection, _ = server.accept()
                with connection:
                    connection.sendall(self.payload.data.cast("B"))

            sender = threading.Thread(target=send)
            sender.start()
            view, got = self.warm_out.reshape(-1).data.cast("B"), 0
            with socket.create_connection(server.getsockname()) as sock:
                while got < view.nbytes:
                    n = sock.recv_into(view[got:], min(view.nbytes - got, 8 << 20))
                    if not n:
                        raise SystemExit("socket ceiling: connection closed early")
                    got += n
            sender.join()


class OtherCheckout:
    """The same configurations on another checkout's code: this script served by its python."""

    def __init__(self, tree: str, workers: int, kernels_spec: str) -> None:
        python = os.path.join(tree, ".venv", "bin", "python")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.process = subprocess.Popen(
            [python, os.path.abspath(__file__), "--serve", "--workers", str(workers),
             "--kernels", kernels_spec],
            cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        line = self._line()
        if line != "ready":
            raise SystemExit(f"the other checkout's side did not start: {line!r}")

    def _line(self) -> str:
        assert self.process.stdout is not None
        return self.process.stdout.readline().strip()

    def run(self, name: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(name + "\n")
        self.process.stdin.flush()
        answer = json.loads(self._line())
        if "failed" in answer:
            raise SystemExit(f"other checkout, {name}: {answer['failed']}")
        return dict(answer)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(60)


def serve(args: argparse.Namespace) -> int:
    side = Side(args.workers, args.kernels)
    try:
        print("ready", flush=True)
        for line in sys.stdin:
            try:
                answer = side.run(line.strip())
            except Exception as error:  # reported to the driving process, which stops
                answer = {"failed": f"{type(error).__name__}: {error}"}
            print(json.dumps(answer), flush=True)
    finally:
        side.close()
    return 0


def dask_job(image: np.ndarray, kernels: np.ndarray, workers: int, repeat: int) -> float | None:
    """Median seconds of the same job with dask.array.map_overlap on a distributed LocalCluster."""
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
        return rmidl.correlate(chunk, kernels, mode="valid", threads=1)

    cluster = DaskCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        array = da.from_array(image, chunks=(rows, image.shape[1]))
        lazy = da.map_overlap(
            block, array, depth={0: top, 1: left}, boundary=0, trim=False,
            new_axis=[0], chunks=((k,), array.chunks[0], (image.shape[1],)), dtype=np.float32,
            allow_rechunk=False,
        )
        walls = []
        for _ in range(repeat + 1):
            start = time.perf_counter()
            client.compute(lazy).result()
            walls.append(time.perf_counter() - start)
        return statistics.median(walls[1:])


def _median(samples: list[dict[str, Any]], key: str) -> float:
    values = [s[key] for s in samples if key in s]
    return statistics.median(values) if values else float("nan")


def report(samples: dict[str, dict[str, list[dict[str, Any]]]], out_bytes: int, flops: float) -> None:
    sides = list(samples)
    print(f"\n{'configuration':<22}" + "".join(
        f" | {side[:14]:>14} {'x base':>6} {'CPU s':>6} {'x CPU':>6}" for side in sides))
    for name in CONFIGS:
        cells = []
        for side in sides:
            runs = samples[side][name]
            wall, cpu = _median(runs, "wall"), _median(runs, "cpu")
            base = samples[side][BASELINE]
            base_wall, base_cpu = _median(base, "wall"), _median(base, "cpu")
            cells.append(f" | {wall:14.3f} {wall / base_wall:6.2f} {cpu:6.2f} {cpu / base_cpu:6.2f}")
        print(f"{name:<22}" + "".join(cells))
    rates = [f"{side} {flops / _median(samples[side][BASELINE], 'wall') / 1e9:.1f}" for side in sides]
    print("\n(s = median wall seconds; GFLOP/s of the baseline: " + ", ".join(rates) + ")")
    for side in sides:
        s = samples[side]
        base, base_cpu = _median(s[BASELINE], "wall"), _median(s[BASELINE], "cpu")
        bulk_rate = out_bytes / _median(s["bulk channel"], "wall")
        ceiling = out_bytes / _median(s["socket recv_into"], "wall")
        in_job = _median(s["TCP"], "stream_bytes_per_s")
        goals = [
            ("shared memory wall <= 1.10x in-process", _median(s["shared memory"], "wall") / base, 1.10),
            ("shared memory CPU <= 1.15x in-process", _median(s["shared memory"], "cpu") / base_cpu, 1.15),
            ("TCP wall <= 1.30x in-process", _median(s["TCP"], "wall") / base, 1.30),
            ("fresh output <= 1.10x out=", base / _median(s["in-process out="], "wall"), 1.10),
        ]
        print(f"\n{side}:")
        used = base_cpu / base
        if used < 1.5:  # the baseline asks for 2 threads
            print(f"  (the in-process baseline got {used:.2f} cores of its 2 threads: the machine is busy, "
                  "and wall ratios favour the multi-process rows, which get more of a shared CPU; read CPU s"
                  ")")
        for what, ratio, limit in goals:
            print(f"  {what:<42} {ratio:5.2f}  {'met' if ratio <= limit else 'NOT met'}")
        verdict = "met" if bulk_rate >= 1.5e9 else "NOT met"
        print(f"  bulk channel, one stream: {bulk_rate / 1e9:.2f} GB/s (>= 1.5 {verdict}), "
              f"{bulk_rate / ceiling:.2f}x the plain socket's {ceiling / 1e9:.2f} GB/s; "
              f"per stream inside TCP jobs {in_job / 1e9:.2f} GB/s")
        worst = max(max(x["error"] for x in runs) for runs in s.values())
        print(f"  largest relative error against its in-process result: {worst:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds after the warm-up round")
    parser.add_argument("--kernels", default="random:128x11x11")
    parser.add_argument("--compare", metavar="CHECKOUT", help="also run another checkout (with its .venv)")
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args)

    here = Side(args.workers, args.kernels)
    sides: dict[str, Any] = {"this checkout": here}
    try:
        if args.compare:
            sides[os.path.basename(os.path.normpath(args.compare))] = OtherCheckout(
                args.compare, args.workers, args.kernels)
        k, kh, kw = here.kernels.shape
        out_bytes = here.reference.nbytes
        flops = 2.0 * kh * kw * here.reference.size
        print(f"reference job: {here.image.shape[1]}x{here.image.shape[0]} image, {k} kernels {kh}x{kw}, "
              f"valid: {flops / 1e9:.2f} GFLOP, {out_bytes / 1e6:.0f} MB out; {available_cores()} cores; "
              f"{args.workers} workers x 1 thread; median of {args.repeat} interleaved rounds after a "
              "warm-up")
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {s: {c: [] for c in CONFIGS} for s in sides}
        for round_ in range(args.repeat + 1):
            for name in CONFIGS:
                order = list(sides.items())
                for side_name, side in order if round_ % 2 == 0 else reversed(order):
                    sample = side.run(name)
                    if round_:  # round 0 warms caches, pools and workers up
                        samples[side_name][name].append(sample)
        report(samples, out_bytes, flops)
        dask = None if args.no_dask else dask_job(here.image, here.kernels, args.workers, args.repeat)
        if dask is not None:
            print(f"\nDask distributed {args.workers} x 1 (map_overlap + gather): {dask:.3f} s, "
                  f"{dask / _median(samples['this checkout'][BASELINE], 'wall'):.2f}x in-process")
    finally:
        for side in sides.values():
            side.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
