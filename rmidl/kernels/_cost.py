"""The "auto" cost model: predicted seconds per engine, and a quick calibration of this machine's rate."""

from __future__ import annotations

import time
from functools import cache

import numpy as np

__all__ = ["NOMINAL_GFLOPS", "choose_engine", "estimate_seconds", "measure_gflops"]

NOMINAL_GFLOPS = 50.0
"""Lowering GFLOP/s per thread assumed when the caller has not measured one (a modest AVX2/AVX-512 core)."""


def _flops(image_hw: tuple[int, int], kernel_shape: tuple[int, ...]) -> float:
    h, w = image_hw
    k, kh, kw = kernel_shape[:3]
    channels = kernel_shape[3] if len(kernel_shape) > 3 else 1
    return 2.0 * k * kh * kw * channels * max(0, h - kh + 1) * max(0, w - kw + 1)


def _engine_seconds(engine: str, image_hw: tuple[int, int], kernel_shape: tuple[int, ...], threads: int,
                    gflops: float) -> float:
    rate = gflops * 1e9 * threads
    return _flops(image_hw, kernel_shape) / rate


def estimate_seconds(image_hw: tuple[int, int], kernel_shape: tuple[int, ...], threads: int,
                     gflops: float | None = None) -> float:
    """Predicted seconds of the "auto" engine for a valid correlation of an (H, W) input.

    `gflops` is the lowering rate of one thread (from `measure_gflops`); kernel_shape is (K, kh, kw[, C]).
    """
    rate = NOMINAL_GFLOPS if gflops is None else gflops
    engine = choose_engine(image_hw, kernel_shape, threads)
    return _engine_seconds(engine, image_hw, kernel_shape, max(1, threads), rate)


def choose_engine(image_hw: tuple[int, int], kernel_shape: tuple[int, ...], threads: int) -> str:
    """The engine "auto" runs for a valid correlation of an (H, W) input with a (K, kh, kw[, C]) bank."""
    return "lowering"


@cache
def _calibration_problem(dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((96, 256, 1)).astype(dtype)
    kernels = rng.standard_normal((128, 11, 11, 1)).astype(dtype)
    out = np.empty((128, 86, 246), dtype)
    return image, kernels, out


def measure_gflops(threads: int = 1) -> float:
    """This machine's lowering rate in GFLOP/s on `threads` threads (about 0.1 s; best of a few runs)."""
    from rmidl.kernels import correlate_valid

    image, kernels, out = _calibration_problem("float32")
    flops = _flops(image.shape[:2], kernels.shape)
    best = float("inf")
    deadline = time.perf_counter() + 0.15
    runs = 0
    while runs < 2 or (time.perf_counter() < deadline and runs < 20):
        start = time.perf_counter()
        correlate_valid(image, kernels, out, threads=threads, engine="lowering")
        best = min(best, time.perf_counter() - start)
        runs += 1
    return flops / best / 1e9
