"""The lowering engine: im2col per row tile, then one GEMM with the whole bank as M (Chellapilla 2006).

For output rows [r0, r1) the column matrix holds, for every (channel, a, b), the image rows
r0 + a ... shifted by b: kh*kw*C contiguous copies of (rows, OW). One GEMM
(K, kh*kw*C) @ (kh*kw*C, rows*OW) then writes straight into the output view out[:, r0:r1, :].
Tiles keep the column matrix near SCRATCH_BYTES per thread (rows, or parts of one row for huge kernels).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from rmidl.kernels._threads import run_tiles
from rmidl.tiling import split_range

__all__ = ["SCRATCH_BYTES", "correlate_lowering", "tile_rows"]

SCRATCH_BYTES = 2 << 20
"""Column-matrix bytes per thread: small enough to stay in L2/L3 while the GEMM streams it."""
MIN_TILE_FLOPS = 4_000_000
"""Below this a tile is not worth handing to another thread (~50 us of work)."""


def tile_rows(out_hw: tuple[int, int], depth: int, n_kernels: int, itemsize: int, threads: int) -> int:
    """Output rows per tile: a column matrix of about SCRATCH_BYTES, and a few tiles per thread unless
    that would make tiles too small to be worth a thread (under MIN_TILE_FLOPS)."""
    out_h, out_w = out_hw
    rows = max(1, SCRATCH_BYTES // max(1, depth * out_w * itemsize))
    if threads > 1:
        worth = -(-MIN_TILE_FLOPS // (2 * n_kernels * depth * out_w))
        rows = min(rows, max(worth, -(-out_h // (4 * threads))))
    return max(1, min(rows, out_h))


def correlate_lowering(image: np.ndarray, weights: np.ndarray, out: np.ndarray, threads: int) -> None:
    """Valid correlation of image (H, W, C) with weights (K, C*kh*kw) ordered (c, a, b) into
    out (K, OH, OW), whose rows must be contiguous; `kh` and `kw` are implied by the shapes."""
    k, out_h, out_w = out.shape
    height, width, channels = image.shape
    kh, kw = height - out_h + 1, width - out_w + 1
    depth = channels * kh * kw
    rows = tile_rows((out_h, out_w), depth, k, out.itemsize, threads)
    # A single output row whose column matrix exceeds the budget (huge kernels) is split by columns too.
    span = min(out_w, max(1, SCRATCH_BYTES // (depth * out.itemsize)))
    tiles = [(r0, r1, j0, j1) for r0, r1 in split_range(out_h, size=rows)
             for j0, j1 in split_range(out_w, size=span)]

    def make_scratch() -> tuple[np.ndarray, np.ndarray]:
        # Colour bands are made planar (C, rows, W) per tile, so every shifted copy reads contiguous rows
        # without a planar copy of the whole image.
        band_size = channels * (rows + kh - 1) * (span + kw - 1) if channels > 1 else 0
        return np.empty(depth * rows * span, out.dtype), np.empty(band_size, out.dtype)

    def work(tile: tuple[int, int, int, int], scratch: tuple[np.ndarray, np.ndarray]) -> None:
        r0, r1, j0, j1 = tile
        n = (r1 - r0) * (j1 - j0)
        cols = scratch[0][: depth * n].reshape(channels, kh, kw, r1 - r0, j1 - j0)
        band = image[r0 : r1 + kh - 1, j0 : j1 + kw - 1].transpose(2, 0, 1)
        if channels > 1:
            planar = scratch[1][: band.size].reshape(band.shape)
            np.copyto(planar, band)
            band = planar
        # windows[c, a, b] is band[c, a:a+rows, b:b+span]: the kh*kw shifted copies, in one strided copy.
        np.copyto(cols, sliding_window_view(band, (r1 - r0, j1 - j0), axis=(1, 2)))
        target = np.reshape(out[:, r0:r1, j0:j1], (k, n), copy=False)
        np.matmul(weights, cols.reshape(depth, n), out=target)

    run_tiles(tiles, work, make_scratch, threads)
