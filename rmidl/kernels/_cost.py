"""The "auto" cost model: predicted seconds per engine, and a quick calibration of this machine's rate.

The constants were fitted to single-thread CPU-time measurements on the development machine (Xeon,
AVX-512, OpenBLAS) over the crossover map of `scripts/bench_engines.py --multichannel --map --cpu-time
--threads 1 --json FILE` (C in 1..64, K in 8..128, kernels 3..15, images 16..200 in batches, and the
single-channel 720x1280 reference job), refitted with `--fit FILE`. Only their ratios decide the
engine; `measure_gflops` rescales absolute times to the machine at hand.
"""

from __future__ import annotations

import math
import time
from functools import cache

import numpy as np

from rmidl.errors import OptionError
from rmidl.kernels._fft import fft_plan
from rmidl.kernels._lowering import plan_tiles

__all__ = [
    "DIRECT_NS",
    "FFT_NS",
    "LOWERING_NS",
    "NOMINAL_GFLOPS",
    "choose_engine",
    "engine_seconds",
    "estimate_seconds",
    "measure_gflops",
    "work_terms",
]

# Each engine's one-thread time is a sum of work terms (counted as the engine plans the work) times ns
# per unit of each. Lowering: column-matrix elements (depth x output pixels: shifted-row copies and the
# GEMM's fixed cost per element), GEMM multiply-adds (the bank is the GEMM's M), output elements (more
# when the GEMM's inner dimension is tiny), GEMM calls (one per row of a tile, which holds several narrow
# images side by side).
LOWERING_NS = {"columns": 0.7088, "gemm": 0.03289, "outputs": 1.328, "tiny": 2.4, "calls": 2924.0}
# Direct: multiply-add pass elements.
DIRECT_NS = {"passes": 1.325}
# FFT: n*log2(n) of (fh x fw) transforms, forward per tile and channel and inverse per tile and kernel
# (pruned to the output rows); spectrum elements copied between phases; kernel spectra (row transforms
# and the DFT matmul of the column pass); per-bin matmul calls and their complex multiply-adds, or the
# multiply-adds of plain products.
FFT_NS = {"forward": 1.013, "inverse": 0.7645, "copies": 1.0, "kernels": 0.09797, "calls": 941.3,
          "macs": 0.6361, "products": 2.003}
_CALL_SECONDS = 1e-4
# What each thread beyond the first adds.
_THREAD_EFFICIENCY = {"lowering": 0.9, "direct": 0.8, "fft": 0.8}

NOMINAL_GFLOPS = 40.2
"""One thread's lowering rate on the reference job (720x1280, 128 kernels 11x11) implied by the constants
above (GFLOP/s); a test keeps the two in step."""


def _dims(image_hw: tuple[int, int], kernel_shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    h, w = (int(x) for x in image_hw)
    k, kh, kw = (int(x) for x in kernel_shape[:3])
    channels = int(kernel_shape[3]) if len(kernel_shape) > 3 else 1
    return h, w, k, kh, kw, channels


def work_terms(engine: str, image_hw: tuple[int, int], kernel_shape: tuple[int, ...],
               batch: int = 1) -> dict[str, float]:
    """The work terms of `engine` (keys of LOWERING_NS, DIRECT_NS or FFT_NS), as the engine plans it.

    Empty for an empty output (a kernel taller or wider than the input): nothing to run.
    """
    h, w, k, kh, kw, channels = _dims(image_hw, kernel_shape)
    batch = max(1, int(batch))
    out_h, out_w = max(0, h - kh + 1), max(0, w - kw + 1)
    pixels = batch * out_h * out_w
    if pixels == 0:
        return {}
    depth = kh * kw * channels
    if engine == "lowering":
        images, _, _ = plan_tiles(batch, (out_h, out_w), (k, kh, kw, channels), 4, 1)
        return {"columns": pixels * depth, "gemm": pixels * depth * k, "outputs": pixels * k,
                "tiny": pixels * k / depth, "calls": -(-batch // images) * out_h}
    if engine == "direct":
        return {"passes": pixels * k * depth}
    if engine == "fft":
        return _fft_terms(batch, h, w, k, kh, channels=channels)
    raise OptionError(f"engine {engine!r} is not one of lowering, direct, fft")


def _fft_terms(batch: int, h: int, w: int, k: int, kh: int, *, channels: int) -> dict[str, float]:
    plan = fft_plan(batch, (h, w), (k, kh, kh, channels), 4)
    size = plan.fh * plan.fw
    transform = plan.tiles * size * math.log2(max(2, size))
    groups, chunks = -(-plan.tiles // plan.group), -(-k // plan.chunk)
    macs = plan.tiles * plan.bins * channels * k
    terms = {"forward": transform * channels, "inverse": transform * k,
             "copies": plan.tiles * plan.bins * (channels + 2 * k),
             "kernels": k * channels * (kh * plan.fw + plan.bins * kh) * (groups if chunks > 1 else 1)}
    if plan.by_matmul:  # one matmul per bin, group and chunk
        terms["calls"] = groups * chunks * plan.bins
        terms["macs"] = macs
    else:
        terms["products"] = macs
    return terms


_NS = {"lowering": LOWERING_NS, "direct": DIRECT_NS, "fft": FFT_NS}


def _one_thread_seconds(engine: str, image_hw: tuple[int, int], kernel_shape: tuple[int, ...],
                        batch: int = 1) -> float:
    """Model seconds on one thread of the development machine."""
    terms = work_terms(engine, image_hw, kernel_shape, batch)
    ns = _NS[engine]
    return sum(ns[name] * amount for name, amount in terms.items()) * 1e-9


def _speedup(engine: str, threads: int) -> float:
    return 1 + _THREAD_EFFICIENCY[engine] * (max(1, int(threads)) - 1)


def engine_seconds(engine: str, image_hw: tuple[int, int], kernel_shape: tuple[int, ...], threads: int,
                   gflops: float | None = None, *, batch: int = 1) -> float:
    """Predicted seconds of `engine` for a valid correlation of `batch` (H, W) inputs with a (K, kh, kw[, C])
    bank. `gflops` is what `measure_gflops(threads)` returned on the target machine (None: the nominal rate).
    """
    seconds = _one_thread_seconds(engine, image_hw, kernel_shape, batch) / _speedup(engine, threads)
    if gflops is not None:
        # `gflops` is this machine's lowering rate on `threads` threads; rescale the model's to it.
        seconds *= NOMINAL_GFLOPS * _speedup("lowering", threads) / max(gflops, 1e-3)
    return seconds + _CALL_SECONDS


def choose_engine(image_hw: tuple[int, int], kernel_shape: tuple[int, ...], threads: int, *,
                  batch: int = 1) -> str:
    """The engine "auto" runs for a valid correlation of `batch` (H, W) inputs with a (K, kh, kw[, C])
    bank."""
    engines = ("lowering", "direct", "fft")
    return min(engines,
               key=lambda e: _one_thread_seconds(e, image_hw, kernel_shape, batch) / _speedup(e, threads))


def estimate_seconds(image_hw: tuple[int, int], kernel_shape: tuple[int, ...], threads: int,
                     gflops: float | None = None, *, batch: int = 1) -> float:
    """Predicted seconds of the engine "auto" picks (see `engine_seconds`)."""
    engine = choose_engine(image_hw, kernel_shape, threads, batch=batch)
    return engine_seconds(engine, image_hw, kernel_shape, threads, gflops, batch=batch)


@cache
def _calibration_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    # The reference job's bank on a 128 x 512 image: ~30 ms on one core, enough rows for two threads.
    image = rng.standard_normal((128, 512, 1)).astype(np.float32)
    kernels = rng.standard_normal((128, 11, 11, 1)).astype(np.float32)
    return image, kernels, np.empty((128, 118, 502), np.float32)


def measure_gflops(threads: int = 1) -> float:
    """This machine's lowering rate in GFLOP/s on `threads` threads: best of a few runs, about 0.1 s."""
    from rmidl.kernels import correlate_valid

    image, kernels, out = _calibration_problem()
    flops = 2.0 * kernels.size * out.shape[1] * out.shape[2]
    best = math.inf
    deadline = time.perf_counter() + 0.12
    runs = 0
    while runs < 2 or (runs < 10 and time.perf_counter() < deadline):
        start = time.perf_counter()
        correlate_valid(image, kernels, out, threads=threads, engine="lowering")
        best = min(best, time.perf_counter() - start)
        runs += 1
    return flops / best / 1e9
