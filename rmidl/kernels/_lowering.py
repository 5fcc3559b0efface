"""The lowering engine: a column matrix per output row, then GEMMs with the whole bank as M
(Chellapilla et al. 2006, the way CNN layers run on BLAS).

The column matrix of output row r holds, for every tap (a, c, b), the image row r + a of channel c
shifted by b. Laid out as Z[y, c, b, :] = image[y, b : b + OW, c] for the rows y of a band, the matrix
of row r is the contiguous block Z[r + a] over (a, c, b): kh*kw*C rows at one stride, which BLAS reads
in place. So a band of R output rows costs (R + kh - 1)*kw*C shifted row copies instead of the
R*kh*kw*C of a plain im2col, and each GEMM (K, kh*kw*C) @ (kh*kw*C, OW) writes straight into out[:, r, :].
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from rmidl.geometry import split_range
from rmidl.kernels._threads import run_tiles

__all__ = ["SCRATCH_BYTES", "correlate_lowering", "plan_tiles"]

SCRATCH_BYTES = 4 << 20
"""Shifted-copy band bytes per thread: small enough to stay in L2/L3 while the GEMMs read it."""
MIN_TILE_FLOPS = 4_000_000
"""Below this a tile is not worth handing to another thread (~50 us of work)."""


def plan_tiles(out_hw: tuple[int, int], kernel_shape: tuple[int, int, int, int], itemsize: int,
               threads: int) -> tuple[int, int]:
    """(output rows, output columns) per tile: a shifted-copy band of about SCRATCH_BYTES, ~8 tiles
    per thread unless they would be too small to be worth a thread (under MIN_TILE_FLOPS)."""
    out_h, out_w = out_hw
    k, kh, kw, channels = kernel_shape
    row_bytes = channels * kw * itemsize  # per output column, per band row
    if kh * row_bytes * out_w > SCRATCH_BYTES:
        # Huge kernels: even one output row's band is too big, so split it by columns.
        return 1, max(1, min(out_w, SCRATCH_BYTES // (kh * row_bytes)))
    rows = SCRATCH_BYTES // (row_bytes * out_w) - kh + 1
    if threads > 1:
        worth = -(-MIN_TILE_FLOPS // (2 * k * kh * kw * channels * out_w))
        rows = min(rows, max(worth, -(-out_h // (8 * threads))))
    return max(1, min(rows, out_h)), out_w


def correlate_lowering(image: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int) -> None:
    """Valid correlation of image (H, W, C) with kernels (K, kh, kw, C) into out (K, OH, OW), whose
    rows must be contiguous (any stride between kernels)."""
    k, out_h, out_w = out.shape
    _, kh, kw, channels = kernels.shape
    depth = kh * kw * channels
    # Tap order (a, c, b) matches the rows of Z.
    weights = np.ascontiguousarray(kernels.transpose(0, 1, 3, 2)).reshape(k, depth)
    rows, span = plan_tiles((out_h, out_w), kernels.shape, out.itemsize, threads)
    tiles = [(r0, r1, j0, j1) for r0, r1 in split_range(out_h, size=rows)
             for j0, j1 in split_range(out_w, size=span)]
    step = channels * kw  # rows of Z per image row

    def make_scratch() -> np.ndarray:
        return np.empty((rows + kh - 1) * step * span, out.dtype)

    def work(tile: tuple[int, int, int, int], scratch: np.ndarray) -> None:
        r0, r1, j0, j1 = tile
        n, width = r1 - r0, j1 - j0
        band = image[r0 : r1 + kh - 1, j0 : j1 + kw - 1]
        z = scratch[: (n + kh - 1) * step * width].reshape(n + kh - 1, channels, kw, width)
        # windows[y, b, c, :] = band[y, b : b + width, c]
        np.copyto(z, sliding_window_view(band, width, axis=1).transpose(0, 2, 1, 3))
        # columns[i] is Z[(i + a), c, b, :] over (a, c, b): the (depth, width) matrix of output row r0 + i.
        columns = sliding_window_view(z.reshape(-1, width), depth, axis=0)[::step].transpose(0, 2, 1)
        np.matmul(weights, columns, out=out[:, r0:r1, j0:j1].transpose(1, 0, 2))

    run_tiles(tiles, work, make_scratch, threads)
