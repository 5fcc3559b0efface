"""A stage on big maps in row bands: each band is correlated, activated and pooled while it is in cache.

A stage that makes more than BANDED_MAP_BYTES of maps per image (an HD frame through a bank of 128
kernels makes 462 MB) would otherwise write every map to memory, read it back to activate and pool, and
pay the page faults of a fresh array that size. In bands of pooled rows, each thread correlates the
conv rows a band needs (with the kernel's halo of input rows) into a scratch of BAND_BYTES it reuses,
activates and pools them into the output, and only the pooled maps reach memory. Rows the pooling never
reads (the ragged bottom) are not computed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import MutableMapping, Sequence
from typing import Protocol

import numpy as np

from rmidl.convolution import correlate_batch_cached
from rmidl.geometry import pad_for_mode, split_range
from rmidl.kernels import KernelSpectra
from rmidl.kernels._threads import run_tiles
from rmidl.pooling import POOL_KINDS

__all__ = ["BANDED_MAP_BYTES", "BAND_BYTES", "EngineCall", "banded", "forward_banded"]

EngineCall = tuple[slice, np.ndarray, slice, KernelSpectra]
"""One engine call of a stage: (its input maps, its bank, the output maps it makes, the bank's spectra)."""


class _Shapes(Protocol):
    """What a band needs of a stage's shapes (rmidl.network._stage.StageShapes)."""

    @property
    def conv(self) -> tuple[int, int, int]: ...

    @property
    def out(self) -> tuple[int, int, int]: ...


class _PooledStage(Protocol):
    """What a band needs of its stage (rmidl.network.Stage): the window, the mode, the post-processing."""

    pool: str | None
    pool_size: tuple[int, int]
    pool_stride: tuple[int, int] | None
    mode: str

    @property
    def kernel_hw(self) -> tuple[int, int]: ...

    def activate_and_pool(self, conv: np.ndarray, threads: int, timings: MutableMapping[str, float] | None,
                          name: str, *, out: np.ndarray | None = None) -> np.ndarray: ...

BANDED_MAP_BYTES = 64 << 20
"""Maps per image above which a pooled stage runs in bands (below, a batch's maps stay in L3 anyway and
one batched engine call shares more: plans, kernel spectra, wider GEMMs)."""
BAND_BYTES = 32 << 20
"""Correlation rows one thread holds at a time (its band's maps, before pooling)."""


def banded(stage: _PooledStage, shapes: _Shapes) -> bool:
    """Whether `stage` runs in bands on maps of `shapes` (windowed pooling and big maps per image)."""
    k, oh, ow = shapes.conv
    return stage.pool in POOL_KINDS and k * oh * ow * 4 > BANDED_MAP_BYTES


def forward_banded(stage: _PooledStage, maps: np.ndarray, shapes: _Shapes, *, calls: Sequence[EngineCall],
                   threads: int, timings: MutableMapping[str, float] | None, name: str) -> np.ndarray:
    """Maps (N, C, H, W) -> the stage's pooled maps (N, K, H', W'), band by band on `threads` threads.

    Each band's engine calls run on one thread (the bands are the parallel work); timings get the wall
    time split over .conv/.act/.pool in proportion to the threads' own seconds in each.
    """
    began = time.perf_counter()
    n = maps.shape[0]
    kh, kw = stage.kernel_hw
    ph, _ = stage.pool_size
    sh, _ = stage.pool_stride or stage.pool_size
    k, _, ow = shapes.conv
    images = pad_for_mode(maps.transpose(0, 2, 3, 1), (kh, kw), stage.mode, batch=True)
    rows = max(1, (BAND_BYTES // (k * ow * 4) - ph) // sh + 1)  # pooled rows per band
    tiles = [(i, p0, p1) for i in range(n) for p0, p1 in split_range(shapes.out[1], size=rows)]
    conv_rows = (rows - 1) * sh + ph
    out = np.empty((n, *shapes.out), np.float32)
    spent: dict[str, float] = {}
    lock = threading.Lock()

    def make_scratch() -> np.ndarray:
        return np.empty(k * conv_rows * ow, np.float32)

    def work(tile: tuple[int, int, int], scratch: np.ndarray) -> None:
        i, p0, p1 = tile
        c0, c1 = p0 * sh, (p1 - 1) * sh + ph  # the conv rows pooled rows [p0, p1) read
        start = time.perf_counter()
        conv = scratch[: k * (c1 - c0) * ow].reshape(1, k, c1 - c0, ow)
        for channels, bank, kernels, spectra in calls:
            correlate_batch_cached(images[i : i + 1, c0 : c1 + kh - 1, :, channels], bank, spectra, threads=1,
                                   out=conv[:, kernels])
        mine: dict[str, float] = {f"{name}.conv": time.perf_counter() - start}
        stage.activate_and_pool(conv, 1, mine, name, out=out[i : i + 1, :, p0:p1])
        with lock:
            for key, seconds in mine.items():
                spent[key] = spent.get(key, 0.0) + seconds

    run_tiles(tiles, work, make_scratch, threads)
    if timings is not None:
        wall, busy = time.perf_counter() - began, sum(spent.values()) or 1.0
        for key, seconds in spent.items():
            timings[key] = timings.get(key, 0.0) + wall * seconds / busy
    return out
