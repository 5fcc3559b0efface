"""The lowering engine: a column matrix per output row, then GEMMs with the whole bank as M
(Chellapilla et al. 2006, the way CNN layers run on BLAS).

The column matrix of output row r holds, for every tap (a, c, b), the image row r + a of channel c
shifted by b. Laid out as Z[y, c, b, :] = image[y, b : b + OW, c] for the rows y of a band, the matrix
of row r is the contiguous block Z[r + a] over (a, c, b): kh*kw*C rows at one stride, which BLAS reads
in place. So a band of R output rows costs (R + kh - 1)*kw*C shifted row copies instead of the
R*kh*kw*C of a plain im2col, and each GEMM (K, kh*kw*C) @ (kh*kw*C, OW) writes straight into out[:, r, :].
Small images of a batch sit side by side in Z's last axis (Z[y, c, b, n, :] for image n), so one GEMM
computes row r of several images: narrow outputs would otherwise make GEMMs too thin to run fast.
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
_Scratch = tuple[np.ndarray, np.ndarray | None]  # shifted copies, and products when images share GEMMs
GEMM_COLUMNS = 256
"""Output columns one GEMM should have at least: narrower images of a batch share GEMMs up to this."""


def plan_tiles(batch: int, out_hw: tuple[int, int], kernel_shape: tuple[int, int, int, int], itemsize: int,
               threads: int) -> tuple[int, int, int]:
    """(images, output rows, output columns) per tile: a shifted-copy band of about SCRATCH_BYTES, images
    side by side up to GEMM_COLUMNS, ~8 tiles per thread unless they would be under MIN_TILE_FLOPS."""
    out_h, out_w = out_hw
    k, kh, kw, channels = kernel_shape
    row_bytes = channels * kw * itemsize  # per output column, per band row
    if kh * row_bytes * out_w > SCRATCH_BYTES:
        # Huge kernels: even one output row's band is too big, so split it by columns.
        return 1, 1, max(1, min(out_w, SCRATCH_BYTES // (kh * row_bytes)))
    # Images share GEMMs only while each keeps a band of 4*kh output rows: thinner bands would repeat
    # the kh - 1 halo rows of shifted copies more often than wider GEMMs save.
    band = min(out_h, 4 * kh) + kh - 1
    images = max(1, min(batch, -(-GEMM_COLUMNS // out_w), SCRATCH_BYTES // (band * row_bytes * out_w)))
    columns = images * out_w
    rows = SCRATCH_BYTES // (row_bytes * columns) - kh + 1
    if threads > 1:
        worth = -(-MIN_TILE_FLOPS // (2 * k * kh * kw * channels * columns))
        rows = min(rows, max(worth, -(-out_h * -(-batch // images) // (8 * threads))))
    return images, max(1, min(rows, out_h)), out_w


def correlate_lowering(images: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int) -> None:
    """Valid correlation of images (N, H, W, C) with kernels (K, kh, kw, C) into out (N, K, OH, OW), whose
    rows must be contiguous (any stride between kernels and images)."""
    batch, k, out_h, out_w = out.shape
    _, kh, kw, channels = kernels.shape
    depth = kh * kw * channels
    # Tap order (a, c, b) matches the rows of Z.
    weights = np.ascontiguousarray(kernels.transpose(0, 1, 3, 2)).reshape(k, depth)
    per_tile, rows, span = plan_tiles(batch, (out_h, out_w), kernels.shape, out.itemsize, threads)
    tiles = [(n0, n1, r0, r1, j0, j1) for n0, n1 in split_range(batch, size=per_tile)
             for r0, r1 in split_range(out_h, size=rows) for j0, j1 in split_range(out_w, size=span)]
    step = channels * kw  # rows of Z per image row

    def make_scratch() -> _Scratch:
        z = np.empty((rows + kh - 1) * step * per_tile * span, out.dtype)
        return z, np.empty((rows, k, per_tile * span), out.dtype) if per_tile > 1 else None

    def work(tile: tuple[int, int, int, int, int, int], scratch: _Scratch) -> None:
        n0, n1, r0, r1, j0, j1 = tile
        n, m, width = r1 - r0, n1 - n0, j1 - j0
        band = images[n0:n1, r0 : r1 + kh - 1, j0 : j1 + kw - 1]
        z = scratch[0][: (n + kh - 1) * step * m * width].reshape(n + kh - 1, channels, kw, m, width)
        # windows[i, y, b, c, :] = band[i, y, b : b + width, c]
        np.copyto(z, sliding_window_view(band, width, axis=2).transpose(1, 3, 2, 0, 4))
        # columns[i] is Z[(i + a), c, b] over (a, c, b): the (depth, m * width) matrix of output row r0 + i.
        columns = sliding_window_view(z.reshape(-1, m * width), depth, axis=0)[::step].transpose(0, 2, 1)
        if m == 1:
            np.matmul(weights, columns, out=out[n0, :, r0:r1, j0:j1].transpose(1, 0, 2))
            return
        assert scratch[1] is not None
        product = scratch[1][:n, :, : m * width]
        np.matmul(weights, columns, out=product)
        out[n0:n1, :, r0:r1, j0:j1] = product.reshape(n, k, m, width).transpose(2, 1, 0, 3)

    run_tiles(tiles, work, make_scratch, threads)
