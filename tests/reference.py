"""The float64 reference every exactness test compares with, and the one bar a result must clear.

Shared by the engine, worker, coordinator, fault, security and CLI tests (import it as `reference`:
pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import numpy as np
import scipy.signal

__all__ = ["assert_close", "batch_reference", "reference"]

FLOAT32_BAR = 1e-5
"""float32 results: max|result - reference| <= FLOAT32_BAR x max|reference| (the engine's exactness bar)."""
FLOAT64_BAR = 1e-12
"""float64 results (both inputs float64) are held to this instead."""


def reference(
    image: np.ndarray, kernels: np.ndarray, mode: str = "valid", *, flip: bool = False
) -> np.ndarray:
    """(K, OH, OW) in float64: scipy.signal.correlate (convolve with `flip`) per kernel, summed over channels.

    image (H, W) or (H, W, C); kernels (kh, kw), (K, kh, kw) or (K, kh, kw, C), as rmidl.correlate takes.
    """
    fn = scipy.signal.convolve if flip else scipy.signal.correlate
    image = np.asarray(image, np.float64)
    kernels = np.asarray(kernels, np.float64)
    if image.ndim == 2:
        image = image[:, :, None]
    if kernels.ndim == 2:
        kernels = kernels[None]
    if kernels.ndim == 3:
        kernels = kernels[..., None]
    return np.stack([
        sum(fn(image[:, :, c], kernel[:, :, c], mode=mode) for c in range(image.shape[2]))
        for kernel in kernels
    ])


def batch_reference(images: np.ndarray, kernels: np.ndarray, mode: str = "valid", *,
                    flip: bool = False) -> np.ndarray:
    """(N, K, OH, OW) in float64 for a batch (N, H, W[, C]): `reference`, image by image."""
    return np.stack([reference(image, kernels, mode, flip=flip) for image in images])


def assert_close(result: np.ndarray, expected: np.ndarray) -> None:
    """Same shape, and within the bar of its dtype times max|expected| of the float64 reference."""
    assert result.shape == expected.shape, f"shape {result.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    bar = FLOAT64_BAR if result.dtype == np.float64 else FLOAT32_BAR
    error = float(np.abs(result - expected).max(initial=0.0))
    assert error <= bar * scale, f"max error {error:.3g} > {bar:g} x {scale:.3g}"
