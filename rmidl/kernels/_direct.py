"""The direct engine: shift-and-accumulate over row tiles small enough to stay in cache.

For tiny kernels (1x1, a few taps) the column matrix of the lowering engine costs more than it saves:
here each output tile is the sum of kh*kw*C shifted views of the image scaled by every kernel at once.
"""

from __future__ import annotations

import numpy as np

from rmidl.kernels._threads import run_tiles
from rmidl.tiling import split_range

__all__ = ["correlate_direct"]

TILE_BYTES = 512 << 10
"""Bytes of one output tile (all kernels); it and its scratch stay in L2 across the kh*kw*C passes."""


def correlate_direct(image: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int) -> None:
    """Valid correlation of image (H, W, C) with kernels (K, C, kh, kw) into out (K, OH, OW)."""
    n_kernels, out_h, out_w = out.shape
    _, channels, kh, kw = kernels.shape
    rows = max(1, min(out_h, TILE_BYTES // (n_kernels * out_w * out.itemsize)))
    if threads > 1:
        rows = min(rows, max(1, -(-out_h // (2 * threads))))
    taps = [(c, a, b) for c in range(channels) for a in range(kh) for b in range(kw)]
    # weights[i] is the (K, 1, 1) column of tap i: one multiply scales the shifted image by every kernel.
    weights = np.ascontiguousarray(kernels.reshape(n_kernels, -1).T)[:, :, None, None]

    def make_scratch() -> np.ndarray:
        return np.empty((n_kernels, rows, out_w), out.dtype)

    def work(tile: tuple[int, int], scratch: np.ndarray) -> None:
        r0, r1 = tile
        acc = out[:, r0:r1, :]
        term = scratch[:, : r1 - r0]
        for i, (c, a, b) in enumerate(taps):
            shifted = image[r0 + a : r1 + a, b : b + out_w, c]
            if i == 0:
                np.multiply(weights[i], shifted, out=acc)
            else:
                np.multiply(weights[i], shifted, out=term)
                acc += term

    run_tiles(split_range(out_h, size=rows), work, make_scratch, threads)
