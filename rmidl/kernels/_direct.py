"""The direct engine: shift-and-accumulate over row tiles small enough to stay in cache.

For tiny banks and tiny kernels the column matrix of the lowering engine costs more than it saves:
here each output tile is built from kh*kw*C scaled shifted views of the image, in place.
"""

from __future__ import annotations

import numpy as np

from rmidl.kernels._threads import run_tiles
from rmidl.tiling import split_range

__all__ = ["correlate_direct"]

TILE_BYTES = 64 << 10
"""Bytes of one kernel's output tile: it and its scratch stay in L2 across the kh*kw*C passes."""


def correlate_direct(planar: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int) -> None:
    """Valid correlation of planar image (C, H, W) with kernels (K, C, kh, kw) into out (K, OH, OW)."""
    n_kernels, out_h, out_w = out.shape
    _, channels, kh, kw = kernels.shape
    rows = max(1, min(out_h, TILE_BYTES // (out_w * out.itemsize)))
    if threads > 1:
        rows = min(rows, max(1, -(-out_h // (2 * threads))))
    taps = [(c, a, b) for c in range(channels) for a in range(kh) for b in range(kw)]
    # Python floats keep the arithmetic in the image dtype (a numpy float64 scalar would not).
    weights = kernels.tolist()

    def make_scratch() -> np.ndarray:
        return np.empty((rows, out_w), out.dtype)

    def work(tile: tuple[int, int], scratch: np.ndarray) -> None:
        r0, r1 = tile
        term = scratch[: r1 - r0]
        for k in range(n_kernels):
            acc = out[k, r0:r1]
            w = weights[k]
            for i, (c, a, b) in enumerate(taps):
                shifted = planar[c, r0 + a : r1 + a, b : b + out_w]
                if i == 0:
                    np.multiply(shifted, w[c][a][b], out=acc)
                else:
                    np.multiply(shifted, w[c][a][b], out=term)
                    acc += term

    run_tiles(split_range(out_h, size=rows), work, make_scratch, threads)
