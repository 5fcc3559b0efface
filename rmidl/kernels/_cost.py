"""The "auto" cost model: predicted seconds per engine, and a quick calibration of this machine's rate.

The constants were fitted to single-thread timings on the development machine (Xeon 2.8 GHz, AVX-512,
OpenBLAS SkylakeX; `scripts/bench_engines.py --crossover` re-measures them). Only their ratios decide
the engine; `measure_gflops` rescales absolute times to the machine at hand.
"""

from __future__ import annotations

import math
import time
from functools import cache

import numpy as np

from rmidl.errors import OptionError
from rmidl.kernels._fft import fft_plan, sums_by_matmul
from rmidl.kernels._lowering import plan_tiles

__all__ = ["NOMINAL_GFLOPS", "choose_engine", "engine_seconds", "estimate_seconds", "measure_gflops"]

# Lowering, ns per column-matrix element (depth x output pixels): the shifted-row copies (about kh times
# fewer than a plain im2col) and GEMM work whose rate falls for small banks (the bank is the GEMM's M);
# plus ns per output element, larger when the GEMM's inner dimension is tiny; plus one GEMM call per row
# of a tile (a tile holds several narrow images side by side).
_COPY_NS = 0.04
_GEMM_GFLOPS = 80.0
_GEMM_HALF_K = 4.0
_OUTPUT_NS = 0.8
_TINY_DEPTH_NS = 2.4
_ROW_CALL_SECONDS = 3e-6
# Direct: ns per multiply-add pass element.
_DIRECT_NS = 0.8
# FFT: ns per n*log2(n) of one (fh x fw) real transform, forward (per tile and channel) and inverse (per
# tile and kernel, pruned to the output rows); kernel spectra per kernel and channel; the per-bin
# channel sums: ns per matmul call and per complex multiply-add (or per element of plain products when
# there is a single channel); ns per spectrum element copied between phases.
_FFT_FORWARD_NS = 0.37
_FFT_INVERSE_NS = 0.42
_FFT_KERNEL_NS = 0.2
_FFT_CALL_NS = 700.0
_FFT_MAC_NS = 0.06
_FFT_PRODUCT_NS = 0.9
_FFT_COPY_NS = 0.25
_CALL_SECONDS = 1e-4
# What each thread beyond the first adds.
_THREAD_EFFICIENCY = {"lowering": 0.9, "direct": 0.8, "fft": 0.8}

NOMINAL_GFLOPS = 60.0
"""One thread's lowering rate on the reference shape implied by the constants above (GFLOP/s)."""


def _dims(image_hw: tuple[int, int], kernel_shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    h, w = (int(x) for x in image_hw)
    k, kh, kw = (int(x) for x in kernel_shape[:3])
    channels = int(kernel_shape[3]) if len(kernel_shape) > 3 else 1
    return h, w, k, kh, kw, channels


def _one_thread_seconds(engine: str, image_hw: tuple[int, int], kernel_shape: tuple[int, ...],
                        batch: int = 1) -> float:
    """Model seconds on one thread of the development machine."""
    h, w, k, kh, kw, channels = _dims(image_hw, kernel_shape)
    batch = max(1, int(batch))
    out_h, out_w = max(0, h - kh + 1), max(0, w - kw + 1)
    n = out_h * out_w
    if n == 0:  # an empty output (kernel taller or wider than the input): nothing to run
        return 0.0
    depth = kh * kw * channels
    if engine == "lowering":
        images, _, _ = plan_tiles(batch, (out_h, out_w), (k, kh, kw, channels), 4, 1)
        per_column = _COPY_NS + 2.0 * (k + _GEMM_HALF_K) / _GEMM_GFLOPS
        ns = batch * n * (depth * per_column + k * (_OUTPUT_NS + _TINY_DEPTH_NS / depth))
        ns += -(-batch // images) * out_h * _ROW_CALL_SECONDS * 1e9
    elif engine == "direct":
        ns = batch * n * k * depth * _DIRECT_NS
    elif engine == "fft":
        ns = _fft_ns(batch, h, w, k, kh, kw, channels)
    else:
        raise OptionError(f"engine {engine!r} is not one of lowering, direct, fft")
    return ns * 1e-9


def _fft_ns(batch: int, h: int, w: int, k: int, kh: int, kw: int, channels: int) -> float:
    """The fft engine's work as `correlate_fft` plans it (one thread, spectra not cached)."""
    plan = fft_plan(batch, (h, w), (k, kh, kw, channels), 4)
    size = plan.fh * plan.fw
    transform = size * math.log2(max(2, size))
    groups, chunks = -(-plan.tiles // plan.group), -(-k // plan.chunk)
    ns = plan.tiles * transform * (channels * _FFT_FORWARD_NS + k * _FFT_INVERSE_NS)
    ns += plan.tiles * plan.bins * (channels + 2 * k) * _FFT_COPY_NS
    ns += k * channels * (kh * plan.fw + plan.bins * kh) * _FFT_KERNEL_NS * (groups if chunks > 1 else 1)
    if sums_by_matmul(plan.unit_tiles, channels, plan.unit_kernels):  # as the engine decides
        calls = -(-plan.tiles // plan.unit_tiles) * -(-k // plan.unit_kernels) * plan.bins
        ns += calls * _FFT_CALL_NS + plan.tiles * plan.bins * channels * k * _FFT_MAC_NS
    else:
        ns += plan.tiles * plan.bins * channels * k * _FFT_PRODUCT_NS
    return ns


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
