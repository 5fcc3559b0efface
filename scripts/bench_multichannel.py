"""The multi-channel half of scripts/bench_engines.py: one CNN layer against torch, and the crossover map.

The layer is 48 x (95x95x25) * (25, 11, 11, 25), valid (a feature-pipeline stage). Every row of the table
is timed in the same interleaved rounds (one run of each per round, median over rounds), so load from
other processes hits all of them alike; read ratios, not absolute seconds. With `cluster`, the layer also
runs as one `Coordinator.correlate(batch=True)` on a local cluster of 2 workers x 1 thread (shared memory,
and TCP with the bulk channel) against `rmidl.correlate(batch=True)` in-process at 2 threads.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from rmidl.client.bench.machine import wait_for_quiet_threads
from rmidl.kernels import ENGINES, KernelSpectra, choose_engine, correlate_valid_batch

N, H, W, C, K, KH, KW = 48, 95, 95, 25, 25, 11, 11
OH, OW = H - KH + 1, W - KW + 1
GFLOP = 2 * N * K * C * KH * KW * OH * OW / 1e9
SGEMM_N = 2048
Runs = dict[tuple[str, int], Callable[[], object]]


def _torch() -> object | None:
    try:
        import torch
    except ImportError:
        return None
    return torch


def layer_table(thread_counts: list[int], repeat: int, *, cluster: bool = False) -> None:
    """Print the layer's table: rmidl auto / fft / lowering, torch conv2d, SGEMM; 1 and 2 threads; with
    `cluster`, the layer on 2 local workers x 1 thread and the in-process call it is measured against."""
    rng = np.random.default_rng(14)
    images = rng.standard_normal((N, H, W, C)).astype(np.float32)
    bank = rng.standard_normal((K, KH, KW, C)).astype(np.float32)
    out = np.empty((N, K, OH, OW), np.float32)
    spectra = KernelSpectra(bank)
    a = rng.standard_normal((SGEMM_N, SGEMM_N)).astype(np.float32)
    torch = _torch()
    runs: Runs = {}
    for t in thread_counts:
        runs[(f"SGEMM {SGEMM_N}^3", t)] = lambda t=t: _sgemm(a, t)
        runs[("rmidl auto", t)] = lambda t=t: correlate_valid_batch(images, bank, out, threads=t)
        runs[("rmidl fft, spectra cached (worker)", t)] = lambda t=t: correlate_valid_batch(
            images, bank, out, threads=t, engine="fft", spectra=spectra)
        runs[("rmidl lowering", t)] = lambda t=t: correlate_valid_batch(images, bank, out, threads=t,
                                                                          engine="lowering")
        if torch is not None:
            x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
            w = torch.from_numpy(np.ascontiguousarray(bank.transpose(0, 3, 1, 2)))
            runs[("torch conv2d", t)] = lambda t=t, x=x, w=w: _torch_conv(torch, x, w, t)
    with contextlib.ExitStack() as stack:
        if cluster:
            runs.update(_cluster_runs(stack, images, bank))
        seconds = _interleaved(runs, repeat)
    picks = {t: choose_engine((H, W), bank.shape, t, batch=N) for t in thread_counts}
    versions = f"torch {torch.__version__}" if torch is not None else "torch not installed (bench extra)"
    print(f"\nlayer: {N} x ({H}x{W}x{C}) * ({K}, {KH}, {KW}, {C}), valid, float32; {GFLOP:.2f} GFLOP "
          f"(direct count); {versions}; auto picks {picks}")
    print(f"median of {repeat} interleaved rounds; GFLOP/s counts the direct method's flops for every row")
    print("| run | threads | seconds | GFLOP/s | vs torch (same threads) | vs 1 thread |")
    print("|---|---:|---:|---:|---:|---:|")
    for (name, t), value in seconds.items():
        torch_s = seconds.get(("torch conv2d", t))
        one = seconds.get((name, 1))
        rate = 2 * SGEMM_N**3 / value / 1e9 if name.startswith("SGEMM") else GFLOP / value
        ratio = f"{torch_s / value:.2f}x" if torch_s and not name.startswith("SGEMM") else "-"
        scale = f"{one / value:.2f}x" if one and t != 1 else "-"
        print(f"| {name} | {t} | {value:.3f} | {rate:.1f} | {ratio} | {scale} |")
    baseline = seconds.get((IN_PROCESS, 2))
    for (name, _), value in seconds.items():
        if baseline and name.startswith("cluster"):
            print(f"{name}: {baseline / value:.2f}x the speed of {IN_PROCESS} at 2 threads")


IN_PROCESS = "rmidl.correlate(batch=True)"
"""The in-process call the cluster rows are measured against (validation and all, as theirs)."""


def _cluster_runs(stack: contextlib.ExitStack, images: np.ndarray, bank: np.ndarray) -> Runs:
    """The layer through Coordinator.correlate(batch=True) on a local cluster of 2 workers x 1 thread (over
    shared memory, and over TCP with results on the bulk channel), and rmidl.correlate at 2 threads."""
    import rmidl
    from rmidl.client import Coordinator
    from rmidl.client.localcluster import LocalCluster

    local = stack.enter_context(LocalCluster(workers=2, threads_per_worker=1))
    runs: Runs = {(IN_PROCESS, 2): lambda: rmidl.correlate(images, bank, batch=True, threads=2)}
    for shared in (True, False):
        coordinator = stack.enter_context(Coordinator(local, local_threads=0, shared_memory=shared))
        name = f"cluster 2 workers x 1 thread, {'shared memory' if shared else 'TCP + bulk'}"
        runs[(name, 2)] = lambda c=coordinator: c.correlate(images, bank, batch=True)
    return runs


def _sgemm(a: np.ndarray, threads: int) -> None:
    with threadpool_limits(limits=threads, user_api="blas"):
        np.matmul(a, a)


def _torch_conv(torch: object, x: object, w: object, threads: int) -> None:
    torch.set_num_threads(threads)  # type: ignore[attr-defined]
    with torch.no_grad():  # type: ignore[attr-defined]
        torch.nn.functional.conv2d(x, w)  # type: ignore[attr-defined]


def _interleaved(runs: Runs, repeat: int) -> dict[tuple[str, int], float]:
    """Median seconds per run over `repeat` rounds, each round running every run once (after a warm-up)."""
    for fn in runs.values():
        fn()
    times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for _ in range(repeat):
        for key, fn in runs.items():
            wait_for_quiet_threads()  # SGEMM's and torch's helpers spin after a call, on our cores
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


SIZES = {200: 4, 95: 16, 42: 32, 16: 64}
"""Image size -> batch: the feature pipeline's stages (200x200 down to 16x16)."""
CHANNELS = (1, 3, 8, 25, 64)
BANKS = (8, 25, 128)
KERNEL_SIZES = (3, 5, 7, 11, 15)
BUDGET_SECONDS = 1.5
"""A run slower than this is timed once (it has already lost to another engine by far)."""
HOPELESS = 3.0
"""An engine whose lower bound (direct flops at SGEMM's rate; direct at an eighth of it) is this many times
the best time so far is not timed: it cannot win, and would take minutes on the largest shapes."""


REFERENCE_SHAPES = ((128, 11), (64, 3), (16, 17), (32, 25), (32, 41))
"""(K, kernel size) on the single-channel 720x1280 image: the reference job and its neighbours, so that a
refit keeps choosing for them what is fastest."""


def crossover_map(threads: int, json_path: str | None,
                  clock: Callable[[], float] = time.perf_counter) -> None:
    """Time every engine on every shape of the grid; print the fastest engine, auto's pick and its cost.

    `clock=time.process_time` times CPU seconds instead (sound at 1 thread on a loaded machine: other
    processes' time slices are not counted; the cost model's constants were fitted so).
    """
    rng = np.random.default_rng(15)
    a = rng.standard_normal((SGEMM_N, SGEMM_N)).astype(np.float32)
    sgemm = min(_timed(lambda: _sgemm(a, threads), clock) for _ in range(3))
    peak = 2 * SGEMM_N**3 / sgemm  # flop/s
    rows: list[dict] = []
    image = rng.standard_normal((1, 720, 1280, 1)).astype(np.float32)
    for k, ks in REFERENCE_SHAPES:
        bank = rng.standard_normal((k, ks, ks, 1)).astype(np.float32)
        out = np.empty((1, k, 721 - ks, 1281 - ks), np.float32)
        times = {engine: _best_time(image, bank, out, threads=threads, engine=engine, clock=clock)
                 for engine in ENGINES if engine != "direct" or ks <= 3}
        best = min(times, key=times.__getitem__)
        pick = choose_engine((720, 1280), bank.shape, threads)
        rows.append({"size": [720, 1280], "batch": 1, "channels": 1, "kernels": k, "kernel": ks,
                     "threads": threads, "seconds": times, "best": best, "auto": pick,
                     "auto_over_best": times[pick] / times[best]})
    print(f"\ncrossover map at {threads} thread(s): fastest engine (auto's pick if different, its slowdown)",
          file=sys.stderr)
    for size, batch in SIZES.items():
        for channels in CHANNELS:
            images = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
            for k in BANKS:
                for ks in KERNEL_SIZES:
                    if ks > size:
                        continue
                    bank = rng.standard_normal((k, ks, ks, channels)).astype(np.float32)
                    out = np.empty((batch, k, size - ks + 1, size - ks + 1), np.float32)
                    flops = 2.0 * bank.size * batch * (size - ks + 1) ** 2
                    # direct: a numpy pass (~1 us at least) per tap, kernel and image
                    bounds = {"fft": 0.0, "lowering": flops / peak,
                              "direct": max(30 * flops / peak, 1e-6 * batch * bank.size)}
                    times: dict[str, float] = {}
                    for engine in sorted(ENGINES, key=bounds.__getitem__):
                        if times and bounds[engine] > HOPELESS * min(times.values()):
                            continue
                        times[engine] = _best_time(images, bank, out, threads=threads, engine=engine,
                                                   clock=clock)
                    pick = choose_engine((size, size), bank.shape, threads, batch=batch)
                    best = min(times, key=times.__getitem__)
                    if pick not in times:
                        times[pick] = _best_time(images, bank, out, threads=threads, engine=pick, clock=clock)
                    row = {"size": size, "batch": batch, "channels": channels, "kernels": k, "kernel": ks,
                           "threads": threads, "seconds": times, "best": best, "auto": pick,
                           "auto_over_best": times[pick] / times[best]}
                    rows.append(row)
                    if json_path:  # kept after every shape: a long run stopped early still counts
                        with open(json_path, "w") as file:
                            json.dump(rows, file, indent=1)
                    print(f"  {batch}x{size}x{size}x{channels} * {k}x{ks}x{ks}: "
                          + ", ".join(f"{e} {v * 1e3:.1f} ms" for e, v in times.items())
                          + f"; auto {pick} ({row['auto_over_best']:.2f})", file=sys.stderr)
    _print_map(rows)


def _timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    fn()
    return clock() - start


def _best_time(images: np.ndarray, bank: np.ndarray, out: np.ndarray, *, threads: int, engine: str,
               clock: Callable[[], float]) -> float:
    """Best of 3 runs (1 when the first is over BUDGET_SECONDS)."""
    best = float("inf")
    for attempt in range(3):
        best = min(best, _timed(lambda: correlate_valid_batch(images, bank, out, threads=threads,
                                                              engine=engine), clock))
        if attempt == 0 and best > BUDGET_SECONDS:
            break
    return best


def _print_map(rows: list[dict]) -> None:
    """One table per image size: rows C x K, columns kernel sizes; cells 'fastest (auto pick, slowdown)'."""
    letter = {"lowering": "L", "direct": "D", "fft": "F"}
    worst = max((row["auto_over_best"] for row in rows), default=1.0)
    within = sum(row["auto_over_best"] <= 1.05 for row in rows)
    print(f"\ncrossover map (L lowering, D direct, F fft = fastest; [X 1.23] = auto picked X, 1.23x slower); "
          f"auto within 5 % of the best on {within}/{len(rows)} shapes, worst {worst:.2f}x")
    reference = [row for row in rows if isinstance(row["size"], list)]
    if reference:
        print("\n1 image 720x1280x1 (the reference job is 128 x 11x11): "
              + ", ".join(f"{row['kernels']} x {row['kernel']}x{row['kernel']} {letter[row['best']]}"
                          + (f" [{letter[row['auto']]} {row['auto_over_best']:.2f}]"
                             if row["auto"] != row["best"] else "") for row in reference))
    for size, batch in SIZES.items():
        mine = [row for row in rows if row["size"] == size]
        if not mine:
            continue
        sizes = [ks for ks in KERNEL_SIZES if ks <= size]
        print(f"\n{batch} images {size}x{size}")
        print("| C | K | " + " | ".join(f"{ks}x{ks}" for ks in sizes) + " |")
        print("|---:|---:|" + "---|" * len(sizes))
        for channels in CHANNELS:
            for k in BANKS:
                cells = []
                for ks in sizes:
                    row = next((r for r in mine
                                if (r["channels"], r["kernels"], r["kernel"]) == (channels, k, ks)), None)
                    if row is None:  # not measured (a run stopped early)
                        cells.append("-")
                        continue
                    cell = letter[row["best"]]
                    if row["auto"] != row["best"]:
                        cell += f" [{letter[row['auto']]} {row['auto_over_best']:.2f}]"
                    cells.append(cell)
                print(f"| {channels} | {k} | " + " | ".join(cells) + " |")


FIXED = {"fft": {"copies": 1.0}, "lowering": {"tiny": 2.4}}
"""Terms held at a set value in the fit: copies and inverse transforms grow alike, so a free fit trades
one for the other; the map has no kernel of depth under 9, which is where "tiny" counts (1x1 kernels:
fitted on the single-channel crossover, `--crossover`)."""


def fit(json_path: str) -> None:
    """Refit the cost model's ns per work term to a crossover map (--map --cpu-time --threads 1 --json).

    Least squares on log(predicted / measured), engine by engine (ratios are what decide the engine);
    prints the constants for rmidl/kernels/_cost.py and how often auto, so refitted, lands within 5 % of
    the fastest engine.
    """
    from scipy.optimize import least_squares

    from rmidl.kernels import _cost

    with open(json_path) as file:
        rows = json.load(file)
    tables = {"lowering": _cost.LOWERING_NS, "direct": _cost.DIRECT_NS, "fft": _cost.FFT_NS}
    for engine, table in tables.items():
        fixed = FIXED.get(engine, {})
        free = [name for name in table if name not in fixed]
        matrix, seconds, held = [], [], []
        for row in rows:
            measured = row["seconds"].get(engine)
            if measured is None:
                continue
            terms = _cost.work_terms(engine, *_shape(row))
            matrix.append([terms.get(name, 0.0) * 1e-9 for name in free])
            held.append(sum(value * terms.get(name, 0.0) * 1e-9 for name, value in fixed.items()))
            seconds.append(measured)
        if not matrix:
            continue
        a, t, b = np.array(matrix), np.array(seconds), np.array(held)
        start = np.log([max(table[name], 1e-3) for name in free])
        solution = least_squares(lambda p, a=a, t=t, b=b: np.log((a @ np.exp(p) + b) / t), start)
        table.update(dict(zip(free, np.exp(solution.x).tolist(), strict=True)))
        print(f"{engine.upper()}_NS = {{{', '.join(f'{k!r}: {v:.4g}' for k, v in table.items())}}}  "
              f"({len(matrix)} shapes)")
    within, worst = 0, 1.0
    for row in rows:
        pick = _cost.choose_engine(*_shape(row)[:2], row["threads"], batch=row["batch"])
        times = row["seconds"]
        if pick in times:
            ratio = times[pick] / min(times.values())
            within += ratio <= 1.05
            worst = max(worst, ratio)
    print(f"refitted auto: within 5 % of the fastest on {within}/{len(rows)} shapes, worst {worst:.2f}x")


def _shape(row: dict) -> tuple[tuple[int, int], tuple[int, int, int, int], int]:
    size = row["size"]
    hw = (size[0], size[1]) if isinstance(size, list) else (size, size)
    return hw, (row["kernels"], row["kernel"], row["kernel"], row["channels"]), row["batch"]
