"""Max and average pooling over the last two axes of feature maps: strided ufunc passes over tiles that
stay in cache, on our own threads."""

from __future__ import annotations

import logging

import numpy as np

from rmidl.errors import OptionError, ShapeError
from rmidl.geometry import split_range
from rmidl.kernels import resolve_threads
from rmidl.kernels._threads import run_tiles
from rmidl.validate import check_out, check_real

__all__ = ["POOL_KINDS", "pool", "pool_shape", "window_pair"]

log = logging.getLogger(__name__)

POOL_KINDS = ("max", "avg")
TILE_BYTES = 1 << 20
"""Input bytes one tile reads: its row-reduced rows stay in L2 for the column pass."""


def window_pair(value: object, what: str) -> tuple[int, int]:
    """An int or a pair of ints, each >= 1, as (rows, cols); errors name the argument `what`."""
    items = value if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in items
    ):
        raise OptionError(f"{what}={value!r} must be a positive integer or a pair of them")
    return int(items[0]), int(items[1])


def _window(size: object, stride: object) -> tuple[int, int, int, int]:
    """(rows, cols) of the window and of the stride, which defaults to the window."""
    ph, pw = window_pair(size, "size")
    sh, sw = (ph, pw) if stride is None else window_pair(stride, "stride")
    return ph, pw, sh, sw


def pool_shape(
    shape: tuple[int, ...], size: int | tuple[int, int], stride: int | tuple[int, int] | None = None
) -> tuple[int, ...]:
    """The shape `pool` returns for an input of `shape` (checks the window fits)."""
    ph, pw, sh, sw = _window(size, stride)
    if len(shape) < 2:
        raise ShapeError(f"pool needs at least 2 dimensions (..., H, W), got shape {tuple(shape)}")
    h, w = shape[-2:]
    if ph > h or pw > w:
        raise ShapeError(f"pool window {pw}x{ph} does not fit input {w}x{h}")  # sizes W x H
    return (*shape[:-2], (h - ph) // sh + 1, (w - pw) // sw + 1)


def _combine(windows: list[np.ndarray], out: np.ndarray, kind: str) -> None:
    """out = op over the windows (max, or the sum for avg), pairwise into `out`: no temporaries."""
    op = np.maximum if kind == "max" else np.add
    if len(windows) == 1:
        np.copyto(out, windows[0])
        return
    op(windows[0], windows[1], out=out)
    for window in windows[2:]:
        op(out, window, out=out)


def _tiles(maps: int, oh: int, row_bytes: int, stride_rows: int) -> list[tuple[int, ...]]:
    """(first map, end map, first row, end row) of output tiles reading about TILE_BYTES each: whole
    maps together when a map is small, else bands of output rows of one map."""
    map_bytes = oh * stride_rows * row_bytes
    if map_bytes <= TILE_BYTES:
        per_tile = max(1, TILE_BYTES // max(1, map_bytes))
        return [(m0, m1, 0, oh) for m0, m1 in split_range(maps, size=per_tile)]
    rows = max(1, TILE_BYTES // max(1, stride_rows * row_bytes))
    return [(m, m + 1, r0, r1) for m in range(maps) for r0, r1 in split_range(oh, size=rows)]


def pool(
    x: object,
    size: int | tuple[int, int],
    *,
    stride: int | tuple[int, int] | None = None,
    kind: str = "max",
    threads: int | None = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Max or average pooling of `x` (..., H, W) over its last two axes with a `size` window.

    `size` and `stride` are an int or a (rows, cols) pair; stride defaults to size (non-overlapping).
    Like CNN frameworks (PyTorch, Keras "valid"), windows that would cross the bottom or right edge are
    dropped: the output is (..., (H - ph)//sh + 1, (W - pw)//sw + 1), so a 5x5 map pooled 2x2 gives 2x2.
    Max keeps the input dtype (integers included) and propagates NaN; avg returns float64 for float64
    input and float32 otherwise. bool, complex and object arrays are refused. `threads` (None: every
    core) share the tiles; the result is the same bits at any thread count. `out=` writes into a
    caller's array of the result's shape and dtype (any strides) and returns it.
    """
    if kind not in POOL_KINDS:
        raise OptionError(f"pool kind {kind!r} is not one of {', '.join(POOL_KINDS)}")
    array = np.asarray(x)
    check_real(array, "pool input")
    ph, pw, sh, sw = _window(size, stride)
    shape = pool_shape(array.shape, (ph, pw), (sh, sw))
    oh, ow = shape[-2:]
    if kind == "avg" and array.dtype != np.float64:
        array = array.astype(np.float32)
    h, w = array.shape[-2:]
    maps = array.reshape(-1, h, w)  # a view for the contiguous maps a stage makes
    given = None if out is None else check_out(out, shape, array.dtype)
    if maps.shape[0] == 0:
        return np.empty(shape, array.dtype) if given is None else given
    # An `out` overlapping the input would be read after being written (by another tile): a temporary.
    overlaps = given is not None and np.may_share_memory(given, array)
    target = None if given is None or overlaps else _maps_view(given, oh, ow)
    result = np.empty((maps.shape[0], oh, ow), array.dtype) if target is None else target
    used_w = sw * (ow - 1) + pw
    tiles = _tiles(maps.shape[0], oh, used_w * array.itemsize, sh)
    rows_per_tile = max(m1 - m0 for m0, m1, _, _ in tiles) * max(r1 - r0 for _, _, r0, r1 in tiles)

    def make_scratch() -> np.ndarray:
        return np.empty(rows_per_tile * used_w, array.dtype)

    def work(tile: tuple[int, ...], scratch: np.ndarray) -> None:
        # Separable: reduce rows first (fewer, contiguous rows) into cache-sized scratch, then its columns
        # into the output; 10-17x faster than reshape-and-reduce or sliding_window_view, whose reductions
        # walk tiny strided axes. The order of the sums is the same in every tile (avg: same bits).
        m0, m1, r0, r1 = tile
        rows = scratch[: (m1 - m0) * (r1 - r0) * used_w].reshape(m1 - m0, r1 - r0, used_w)
        first = r0 * sh
        _combine([maps[m0:m1, first + a : first + a + sh * (r1 - r0 - 1) + 1 : sh, :used_w]
                  for a in range(ph)], rows, kind)
        _combine([rows[:, :, b : b + sw * (ow - 1) + 1 : sw] for b in range(pw)], result[m0:m1, r0:r1],
                 kind)

    run_tiles(tiles, work, make_scratch, resolve_threads(threads))
    if kind == "avg":
        result /= ph * pw
    if given is None:
        return result.reshape(shape)
    if target is None:
        np.copyto(given, result.reshape(shape))
    return given


def _maps_view(out: np.ndarray, oh: int, ow: int) -> np.ndarray | None:
    """`out` (..., oh, ow) as (maps, oh, ow) without a copy, or None when its strides do not allow it."""
    try:
        return np.reshape(out, (-1, oh, ow), copy=False)  # raises rather than copy
    except ValueError:
        return None
