"""The direct engine: shift-and-accumulate over row tiles small enough to stay in cache.

For tiny kernels (1x1, a few taps) the column matrix of the lowering engine costs more than it saves:
here each kernel's output tile is the sum of its kh*kw*C taps times shifted views of the image.
"""

from __future__ import annotations

import numpy as np

from rmidl.geometry import split_range
from rmidl.kernels._threads import run_tiles

__all__ = ["correlate_direct"]

TILE_BYTES = 64 << 10
"""Bytes of one kernel's output tile: it and its scratch stay in L2 across the kh*kw*C passes."""


def correlate_direct(images: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int) -> None:
    """Valid correlation of images (N, H, W, C) with kernels (K, C, kh, kw) into out (N, K, OH, OW)."""
    batch, n_kernels, out_h, out_w = out.shape
    _, channels, kh, kw = kernels.shape
    width = images.shape[2]
    rows = max(1, min(out_h, TILE_BYTES // (out_w * out.itemsize)))
    if threads > 1:
        rows = min(rows, max(1, -(-out_h * batch // (2 * threads))))
    taps = [(c, a, b) for c in range(channels) for a in range(kh) for b in range(kw)]
    # Python floats keep the arithmetic in the image's dtype (numpy float64 scalars would not).
    weights = kernels.tolist()

    def make_scratch() -> tuple[np.ndarray, np.ndarray]:
        band_size = channels * (rows + kh - 1) * width if channels > 1 else 0
        return np.empty((rows, out_w), out.dtype), np.empty(band_size, out.dtype)

    def work(tile: tuple[int, int, int], scratch: tuple[np.ndarray, np.ndarray]) -> None:
        image, r0, r1 = tile
        term = scratch[0][: r1 - r0]
        band = images[image, r0 : r1 + kh - 1].transpose(2, 0, 1)
        if channels > 1:  # planar per tile: contiguous shifted rows without a planar copy of the image
            planar = scratch[1][: band.size].reshape(band.shape)
            np.copyto(planar, band)
            band = planar
        for k in range(n_kernels):
            acc = out[image, k, r0:r1]
            w = weights[k]
            for i, (c, a, b) in enumerate(taps):
                shifted = band[c, a : a + r1 - r0, b : b + out_w]
                if i == 0:
                    np.multiply(shifted, w[c][a][b], out=acc)
                else:
                    np.multiply(shifted, w[c][a][b], out=term)
                    acc += term

    tiles = [(n, r0, r1) for n in range(batch) for r0, r1 in split_range(out_h, size=rows)]
    run_tiles(tiles, work, make_scratch, threads)
