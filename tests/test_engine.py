"""The convolution engines against a float64 scipy reference: random shapes, every mode and engine."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

import rmidl


def reference(image: np.ndarray, kernels: np.ndarray, mode: str, flip: bool = False) -> np.ndarray:
    """float64 scipy.signal correlate/convolve per kernel, summed over channels: (K, OH, OW)."""
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


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1e-30)
    tolerance = 1e-5 if got.dtype == np.float32 else 1e-12
    assert float(np.abs(got - want).max()) <= tolerance * scale


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mode", ["valid", "same", "full"])
@pytest.mark.parametrize("case", [((20, 30, 1), (3, 4), 5), ((17, 9, 3), (5, 5), 7),
                                  ((9, 8, 3), (9, 8), 130), ((5, 5, 1), (1, 1), 1)])
def test_correlate_and_convolve_match_scipy(rng, case, mode, threads) -> None:
    hwc, khw, k = case
    image = rng.standard_normal(hwc).astype(np.float32)
    kernels = rng.standard_normal((k, *khw, hwc[2])).astype(np.float32)
    assert_close(rmidl.correlate(image, kernels, mode=mode, threads=threads), reference(image, kernels, mode))
    assert_close(rmidl.convolve(image, kernels, mode=mode, threads=threads),
                 reference(image, kernels, mode, flip=True))
