"""The float64 reference every exactness test compares with, and the one bar a result must clear.

Shared by the engine, worker, coordinator, fault, security and CLI tests (import it as `reference`:
pytest puts tests/ on sys.path); `network_reference` is the same for a Network's features.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import scipy.signal

if TYPE_CHECKING:
    from rmidl.network import Network

__all__ = ["ACTIVATIONS", "assert_close", "batch_reference", "network_reference", "pool_reference",
           "reference"]

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


ACTIVATIONS = {
    None: lambda y: y,
    "relu": lambda y: np.maximum(y, 0.0),
    "tanh": np.tanh,
    "abstanh": lambda y: np.abs(np.tanh(y)),
    "sigmoid": lambda y: 1.0 / (1.0 + np.exp(-y)),
}


def pool_reference(maps: np.ndarray, kind: str, size: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """Pooling of (K, H, W) by explicit windows in float64."""
    (ph, pw), (sh, sw) = size, stride
    _, h, w = maps.shape
    rows, cols = range(0, h - ph + 1, sh), range(0, w - pw + 1, sw)
    reduce = np.max if kind == "max" else np.mean
    return np.array([[[reduce(m[r : r + ph, c : c + pw]) for c in cols] for r in rows] for m in maps])


def network_reference(net: Network, image: np.ndarray) -> np.ndarray:
    """The features of `image` (H, W[, C]) computed in float64 with scipy.signal.correlate per map pair."""
    x = image.astype(np.float64)
    maps = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    for stage in net.stages:
        bank = stage.bank.astype(np.float64)
        k, c = len(bank), len(maps)
        if stage.depthwise:
            out = [scipy.signal.correlate(maps[i // (k // c)], bank[i, :, :, 0], mode=stage.mode)
                   for i in range(k)]
        else:
            out = [sum(scipy.signal.correlate(maps[j], bank[i, :, :, j], mode=stage.mode) for j in range(c))
                   for i in range(k)]
        maps = ACTIVATIONS[stage.activation](np.array(out))
        if stage.pool in ("global_avg", "global_max"):
            reduce = np.mean if stage.pool == "global_avg" else np.max
            maps = np.array([[[reduce(m)]] for m in maps])
        elif stage.pool is not None:
            maps = pool_reference(maps, stage.pool, stage.pool_size, stage.pool_stride or stage.pool_size)
    return maps.reshape(-1)
