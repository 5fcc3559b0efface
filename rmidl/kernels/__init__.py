"""Convolution engines behind one dispatch: the fast, unchecked valid correlation workers call per task.

`correlate_valid` takes canonical arrays only (image (H, W, C), kernels (K, kh, kw, C), one float dtype,
C-contiguous) and a valid-mode output whose rows are contiguous; `rmidl.correlate` does the checking.
"""

from __future__ import annotations

import logging

import numpy as np

from rmidl.kernels._cost import choose_engine, engine_seconds, estimate_seconds, measure_gflops
from rmidl.kernels._direct import correlate_direct
from rmidl.kernels._fft import correlate_fft
from rmidl.kernels._lowering import correlate_lowering
from rmidl.kernels._threads import available_cores, blas_pinned, resolve_threads
from rmidl.validate import check_engine

__all__ = [
    "ENGINES",
    "available_cores",
    "blas_pinned",
    "choose_engine",
    "correlate_valid",
    "engine_seconds",
    "estimate_seconds",
    "measure_gflops",
]

logger = logging.getLogger(__name__)

ENGINES = ("lowering", "direct", "fft")
"""Engine names `engine=` accepts, besides "auto"."""


def correlate_valid(image: np.ndarray, kernels: np.ndarray, out: np.ndarray, *,
                    threads: int | None = None, engine: str = "auto") -> np.ndarray:
    """Valid correlation of image (H, W, C) with kernels (K, kh, kw, C) into out (K, OH, OW); returns out.

    No array checks (only the engine name): `out` may be a view (e.g. rows of a shared-memory output) as
    long as each output row is contiguous, rows follow each other (row stride OW * itemsize) and it does
    not overlap the inputs.
    """
    engine = check_engine(engine)  # before any work: the per-task path has no other check
    n_threads = resolve_threads(threads)
    if engine == "auto":
        engine = choose_engine(image.shape[:2], kernels.shape, n_threads)
    logger.debug("correlate_valid %s * %s, %d thread(s), %s", image.shape, kernels.shape, n_threads, engine)
    image, bias = _remove_offset(image, kernels)
    with blas_pinned():
        if engine == "lowering":
            correlate_lowering(image, kernels, out, n_threads)
        elif engine == "direct":
            correlate_direct(image, np.ascontiguousarray(kernels.transpose(0, 3, 1, 2)), out, n_threads)
        else:
            correlate_fft(image, np.ascontiguousarray(kernels.transpose(0, 3, 1, 2)), out, n_threads)
    if bias is not None:
        out += bias.astype(out.dtype)[:, None, None]
    return out


def _remove_offset(image: np.ndarray, kernels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Subtract each channel's mean from a float32 image whose mean dominates its spread.

    A large offset (8-bit pixels, say) against zero-mean kernels makes float32 sums cancel, and every
    engine would lose digits; correlate(I) = correlate(I - m) + m * sum(K) holds exactly for valid
    correlation, and I - m is exact in float32 for pixels within a factor 2 of m (Sterbenz) and for
    integer pixels (m has 8 significant bits). Returns the
    image to run and the per-kernel bias to add back (None when nothing is removed).
    """
    if image.dtype != np.float32:
        return image, None
    step_h, step_w = max(1, image.shape[0] // 64), max(1, image.shape[1] // 64)
    sample = image[::step_h, ::step_w]
    mean = sample.mean(axis=(0, 1), dtype=np.float64)
    if not np.any(np.abs(mean) > sample.std(axis=(0, 1), dtype=np.float64)):
        return image, None
    # Rounded to 8 significant bits, so that integer (8-bit, 16-bit) pixels stay exact after subtraction.
    fraction, exponent = np.frexp(mean)
    offset = np.ldexp(np.round(fraction * 256), exponent - 8).astype(np.float32)
    bias = np.einsum("khwc,c->k", kernels, offset.astype(np.float64), dtype=np.float64)
    return image - offset, bias
