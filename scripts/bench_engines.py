#!/usr/bin/env python
"""Benchmark the engines on the reference job (720x1280 float32 image, 128 random 11x11 kernels, valid).

Prints one markdown table: each engine and "auto" at 1 and 2 threads, numpy SGEMM 3072^3 (the machine's
practical peak, measured in the same run), scipy.signal.fftconvolve (batched) and per-kernel
scipy.ndimage.correlate, and the lowering engine's GEMMs alone, with their output in cache and written
into the job's output (the ceiling the engine's share of SGEMM is read against); seconds (median),
GFLOP/s (27.93 GFLOP / s), % of SGEMM at the same thread count (single-threaded baselines against
1-thread SGEMM), and the tracemalloc peak of temporaries beyond the output. Slow rows (direct, ndimage)
run a slice of the bank and are scaled to 128 kernels, as marked.

With --multichannel: the CNN layer 48 x (95x95x25) * (25, 11, 11, 25), valid, through rmidl's batch
API (auto, and each engine) against torch.nn.functional.conv2d (the optional `bench` extra) and SGEMM,
all at 1 and 2 threads, interleaved in one run (--cluster: and on a local cluster of 2 workers x 1
thread through the Coordinator, against rmidl.correlate at 2 threads); --map adds the crossover map of
every engine over C in {1,3,8,25,64}, K in {8,25,128}, kernels 3..15 and images 200, 95, 42, 16 (and
--json FILE keeps it).

Usage: .venv/bin/python scripts/bench_engines.py [--repeat 3] [--threads 1 2] [--crossover]
       .venv/bin/python scripts/bench_engines.py --multichannel [--cluster] [--map [--cpu-time] --json FILE]
       .venv/bin/python scripts/bench_engines.py --fit FILE   (the cost model's constants from a map)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.ndimage
import scipy.signal
from threadpoolctl import threadpool_info, threadpool_limits

from rmidl.client.bench.machine import wait_for_quiet_threads
from rmidl.kernels import ENGINES, blas_pinned, choose_engine, correlate_valid

H, W, K, KH, KW = 720, 1280, 128, 11, 11
OH, OW = H - KH + 1, W - KW + 1
GFLOP = 2 * K * KH * KW * OH * OW / 1e9  # 27.93
SGEMM_N = 3072
MiB = 1 << 20


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_temporaries(fn: Callable[[], object]) -> float:
    """tracemalloc peak of one call in MiB (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / MiB
    finally:
        tracemalloc.stop()


class Sgemm:
    """numpy SGEMM 3072^3 at a given BLAS thread count: the machine's practical peak."""

    def __init__(self) -> None:
        self.a = np.random.default_rng(0).standard_normal((SGEMM_N, SGEMM_N), dtype=np.float32)
        self.c = np.empty_like(self.a)

    def run(self, threads: int) -> float:
        with threadpool_limits(limits=threads, user_api="blas"):
            start = time.perf_counter()
            np.matmul(self.a, self.a, out=self.c)
            return time.perf_counter() - start


def gemms_alone(into: np.ndarray | None, threads: int) -> Callable[[], None]:
    """The lowering engine's GEMMs for the reference job without its copies, (K, kh*kw) @ (kh*kw, OW) per
    output row: into the rows of `into` (the job's output), or (None) into one block per thread that stays
    in cache. The ceiling the engine's share of SGEMM is read against: the two differ by the output's
    memory writes."""
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((K, KH * KW), dtype=np.float32)
    columns = rng.standard_normal((KH * KW, OW), dtype=np.float32)

    def rows(r0: int, r1: int) -> None:
        block = np.empty((K, OW), np.float32)
        for r in range(r0, r1):
            np.matmul(weights, columns, out=block if into is None else into[:, r, :])

    def run() -> None:
        shares = [(OH * i // threads, OH * (i + 1) // threads) for i in range(threads)]
        with blas_pinned(), ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda share: rows(*share), shares))

    return run


def interleaved(fn: Callable[[], object], sgemm: Sgemm, threads: int, repeat: int) -> tuple[float, float]:
    """Median seconds of `fn` and median SGEMM GFLOP/s, runs alternating so both see the same load."""
    fn()  # warm-up: page faults of fresh buffers, FFT plans, BLAS buffers
    sgemm.run(threads)
    ours, peak = [], []
    for _ in range(repeat):
        peak.append(sgemm.run(threads))
        wait_for_quiet_threads()  # OpenBLAS's helpers spin ~0.1 s after SGEMM, on our cores
        start = time.perf_counter()
        fn()
        ours.append(time.perf_counter() - start)
    return statistics.median(ours), 2 * SGEMM_N**3 / statistics.median(peak) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (median), at least 3")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--crossover", action="store_true", help="also time engines across kernel sizes")
    parser.add_argument("--multichannel", action="store_true",
                        help="the 48 x (95x95x25) * (25, 11, 11, 25) layer instead of the reference job")
    parser.add_argument("--map", action="store_true", help="with --multichannel: the crossover map too")
    parser.add_argument("--cluster", action="store_true",
                        help="with --multichannel: the layer on 2 local workers x 1 thread too")
    parser.add_argument("--json", help="with --map: write every timing to this file")
    parser.add_argument("--fit", metavar="FILE", help="refit the cost model to a --map --json FILE and stop")
    parser.add_argument("--cpu-time", action="store_true",
                        help="with --map: time CPU seconds (use with --threads 1 on a loaded machine)")
    args = parser.parse_args(argv)
    repeat = max(3, args.repeat)
    if args.fit:
        from bench_multichannel import fit

        fit(args.fit)
        return 0
    if args.multichannel:
        from bench_multichannel import crossover_map, layer_table

        layer_table(args.threads, repeat, cluster=args.cluster)
        if args.map:
            clock = time.process_time if args.cpu_time else time.perf_counter
            crossover_map(max(args.threads), args.json, clock)
        return 0

    rng = np.random.default_rng(1)
    image = rng.standard_normal((H, W, 1)).astype(np.float32)
    bank = rng.standard_normal((K, KH, KW, 1)).astype(np.float32)
    out = np.empty((K, OH, OW), np.float32)
    blas = [f"{lib['internal_api']} {lib['version']} {lib.get('architecture')}" for lib in threadpool_info()
            if lib["user_api"] == "blas"]
    print(f"reference job: {W}x{H} float32 image, {K} kernels {KH}x{KW}, valid; {GFLOP:.2f} GFLOP; "
          f"BLAS: {', '.join(blas)}; auto picks {choose_engine((H, W), bank.shape, 2)}")
    print("runs write into a preallocated output unless marked 'fresh output' (which pays its page faults)")

    sgemm = Sgemm()
    rows: list[tuple[str, int, float, float, float | None]] = []  # name, threads, seconds, SGEMM rate, MiB

    def add(name: str, threads: int, fn: Callable[[], object], scale: float = 1.0,
            memory: bool = True) -> None:
        seconds, peak = interleaved(fn, sgemm, threads, repeat)
        rows.append((name, threads, seconds * scale, peak, peak_temporaries(fn) if memory else None))
        print(f"  measured {name} @ {threads}: {seconds * scale:.3f} s, SGEMM {peak:.1f} GFLOP/s",
              file=sys.stderr)

    for threads in args.threads:
        for engine in ("auto", *ENGINES):
            if engine == "direct":
                part = 16  # ~10 s per run for the whole bank; time a slice and scale
                sub, sub_out = bank[:part].copy(), out[:part]
                add(f"direct ({part} kernels, x{K // part})", threads,
                    lambda sub=sub, sub_out=sub_out, t=threads: correlate_valid(
                        image, sub, sub_out, threads=t, engine="direct"), scale=K / part)
                continue
            add(engine, threads,
                lambda e=engine, t=threads: correlate_valid(image, bank, out, threads=t, engine=e))
        add("auto, fresh output", threads,
            lambda t=threads: correlate_valid(image, bank, np.empty((K, OH, OW), np.float32), threads=t),
            memory=False)
        add("lowering's GEMMs alone, output in cache", threads, gemms_alone(None, threads), memory=False)
        add("lowering's GEMMs alone, into the output", threads, gemms_alone(out, threads), memory=False)

    flipped = np.ascontiguousarray(bank[:, ::-1, ::-1, 0])
    chunk = 16  # batched in chunks: the whole bank at once needs ~1.5 GB of spectra

    def fftconvolve() -> None:
        for k0 in range(0, K, chunk):
            out[k0 : k0 + chunk] = scipy.signal.fftconvolve(image[None, :, :, 0], flipped[k0 : k0 + chunk],
                                                            mode="valid", axes=(1, 2))

    add(f"scipy.signal.fftconvolve (batches of {chunk})", 1, fftconvolve)
    part = 4

    def ndimage() -> None:
        for k in range(part):
            # origin shifts the kernel's anchor to its top-left tap, so [:OH, :OW] is the valid region.
            full = scipy.ndimage.correlate(image[:, :, 0], bank[k, :, :, 0], mode="constant",
                                           origin=(-(KH // 2), -(KW // 2)))
            out[k] = full[:OH, :OW]

    add(f"scipy.ndimage.correlate per kernel ({part} kernels, x{K // part})", 1, ndimage, scale=K / part)

    print(f"\nseconds: median of {repeat} runs, each after an SGEMM {SGEMM_N}^3 run at the same thread "
          "count; % of SGEMM uses those interleaved runs (single-threaded baselines: 1-thread SGEMM)")
    print("| engine | threads | seconds | GFLOP/s | SGEMM GFLOP/s | % of SGEMM | temporaries MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, threads, seconds, peak, mib in rows:
        rate = GFLOP / seconds
        memory = "-" if mib is None else f"{mib:.1f}"
        print(f"| {name} | {threads} | {seconds:.3f} | {rate:.1f} | {peak:.1f} | {100 * rate / peak:.0f} % "
              f"| {memory} |")

    if args.crossover:
        crossover(max(args.threads), repeat)
    return 0


def crossover(threads: int, repeat: int) -> None:
    """Time every engine on a 512x512 image across bank and kernel sizes, against what auto picks."""
    rng = np.random.default_rng(2)
    image = rng.standard_normal((512, 512, 1)).astype(np.float32)
    print(f"\ncrossover at {threads} thread(s), 512x512 image (ms; * = fastest)")
    print("| K | kernel | lowering | direct | fft | auto picks |")
    print("|---:|---:|---:|---:|---:|---|")
    for k in (1, 4, 16, 128):
        for size in (1, 3, 5, 7, 11, 17, 25, 33):
            bank = rng.standard_normal((k, size, size, 1)).astype(np.float32)
            out = np.empty((k, 513 - size, 513 - size), np.float32)
            times = {}
            for engine in ENGINES:
                if engine == "direct" and k * size * size > 4000:
                    continue  # far slower than the others there
                times[engine] = median_seconds(
                    lambda e=engine, b=bank, o=out: correlate_valid(image, b, o, threads=threads, engine=e),
                    repeat)
            best = min(times, key=times.__getitem__)
            cells = [f"{times[e] * 1e3:.1f}{'*' if e == best else ''}" if e in times else "-"
                     for e in ENGINES]
            pick = choose_engine((512, 512), bank.shape, threads)
            print(f"| {k} | {size}x{size} | {' | '.join(cells)} | {pick} |")


if __name__ == "__main__":
    sys.exit(main())
