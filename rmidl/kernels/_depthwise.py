"""The depthwise FFT engine: every map of a batch correlated with its own kernels in three batched calls --
forward transforms of all maps, products with each map's kernel spectra, inverse transforms.

A depthwise stage used to make one engine call per map, each spending more time in Python (checks,
planning, centring) than in its FFTs: seed004's CNP2 (25 maps 95x95, 11x11 kernels) took 3.1 ms per
image that way and takes 1.5 here (1.0 at 2 threads). Valid correlation of maps (N, C, H, W) with
kernels (C * m, kh, kw), kernel k on map k // m; circular correlation at an FFT size of at least (H, W)
leaves the valid outputs free of wrap-around. The maps go through in chunks (whole images, or groups of
a big image's maps), each thread taking chunks of its own, all threads' temporaries within about
DEPTHWISE_TEMP_BYTES; a map's transforms do not depend on the chunk it is in, so neither do the bits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from rmidl.kernels._threads import run_tiles

__all__ = ["DEPTHWISE_TEMP_BYTES", "DepthwiseSpectra", "correlate_depthwise_fft", "depthwise_fft_shape",
           "depthwise_temp_bytes"]

DEPTHWISE_TEMP_BYTES = 32 << 20
"""Bytes of map and product spectra held at once: the images of a batch go through in chunks of this."""
MIN_THREADED_BYTES = 1 << 20
"""A call whose temporaries come to less than this runs on one thread: splitting it cost more than it saved
(measured on 2 threads: 32 maps of 32x32, 0.29 ms on one of them, 0.66 ms on both; 100 maps of 42x42,
1.98 ms on one, 1.30 on both)."""


def depthwise_fft_shape(maps_hw: tuple[int, int]) -> tuple[int, int]:
    """The FFT size for maps (H, W): the next fast lengths, the width even for a real transform."""
    import scipy.fft

    h, w = maps_hw
    return scipy.fft.next_fast_len(h, real=True), scipy.fft.next_fast_len(w, real=True)


def _chunking(maps_hw: tuple[int, int], per_map: int, itemsize: int = 4) -> tuple[tuple[int, int], int, int]:
    """(FFT size, temporaries of one input map -- its spectra, its kernels' products, the inverse
    transform's own complex copy of them and its result --, input maps one chunk takes) for maps (H, W)
    of `itemsize`-byte floats."""
    shape = depthwise_fft_shape(maps_hw)
    bins = shape[0] * (shape[1] // 2 + 1)
    per_map_bytes = (1 + 2 * per_map) * bins * 2 * itemsize + per_map * shape[0] * shape[1] * itemsize
    return shape, per_map_bytes, max(1, DEPTHWISE_TEMP_BYTES // per_map_bytes)


def depthwise_temp_bytes(batch: int, maps: int, per_map: int, maps_hw: tuple[int, int],
                         threads: int = 1) -> int:
    """The most bytes of temporaries one call on `threads` threads holds for `batch` images of `maps`
    float32 maps (H, W), padded already, with `per_map` kernels each (a memory budget reserves it)."""
    _, per_map_bytes, maps_per_chunk = _chunking(maps_hw, per_map)
    return min(batch * maps, max(threads, maps_per_chunk)) * per_map_bytes


class DepthwiseSpectra:
    """The conjugate spectra (C, m, fh, fw//2 + 1) of a depthwise bank (C * m, kh, kw), kept per FFT size
    (least recently used first out, within `max_bytes`; a bank too big for it is transformed per call).
    Safe to share between threads."""

    def __init__(self, kernels: np.ndarray, maps: int, max_bytes: int) -> None:
        self.kernels = kernels
        self.maps = int(maps)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(spectra.nbytes for spectra in self._cache.values())

    def matches(self, kernels: np.ndarray, maps: int) -> bool:
        """True if these are the spectra of `kernels` on `maps` input maps (the very same values)."""
        mine = self.kernels
        if self.maps != maps or mine.shape != kernels.shape or mine.dtype != kernels.dtype:
            return False
        same_view = mine.ctypes.data == kernels.ctypes.data and mine.strides == kernels.strides
        return same_view or np.array_equal(mine, kernels)

    def at(self, shape: tuple[int, int]) -> np.ndarray:
        """The bank's conjugate spectra at FFT size `shape`."""
        with self._lock:
            spectra = self._cache.get(shape)
            if spectra is not None:
                self._cache.move_to_end(shape)
                return spectra
        spectra = _spectra(self.kernels, self.maps, shape)
        if spectra.nbytes <= self.max_bytes:
            with self._lock:
                self._cache[shape] = spectra
                while sum(s.nbytes for s in self._cache.values()) > self.max_bytes:
                    self._cache.popitem(last=False)
        return spectra


def _spectra(kernels: np.ndarray, maps: int, shape: tuple[int, int]) -> np.ndarray:
    import scipy.fft

    k, kh, kw = kernels.shape
    spectra = scipy.fft.rfft2(kernels.reshape(maps, k // maps, kh, kw), s=shape)
    return np.conjugate(spectra, out=spectra)


def correlate_depthwise_fft(maps: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int,
                            spectra: DepthwiseSpectra | None = None) -> None:
    """Valid correlation of maps (N, C, H, W) with kernels (C * m, kh, kw), kernel k on map k // m, into
    out (N, C * m, OH, OW); `spectra`: the bank's kept spectra (made here when None)."""
    import scipy.fft

    batch, channels, h, w = maps.shape
    per_map = kernels.shape[0] // channels
    _, _, out_h, out_w = out.shape
    shape, per_map_bytes, maps_per_chunk = _chunking((h, w), per_map, out.itemsize)
    kernel_spectra = (spectra or DepthwiseSpectra(kernels, channels, 0)).at(shape)
    if batch * channels * per_map_bytes < MIN_THREADED_BYTES:
        threads = 1
    # Each thread takes chunks of its own, of at most maps_per_chunk / threads maps (all threads' temporaries
    # together stay within the budget), two chunks per thread where the batch has the maps for it.
    parts = 2 * threads if threads > 1 else 1
    per_chunk = max(1, min(maps_per_chunk // threads, -(-batch * channels // parts)))
    images = max(1, per_chunk // channels)
    group = channels if images > 1 else min(channels, per_chunk)  # a big image goes by map groups
    chunks = [(n0, min(batch, n0 + images), c0, min(channels, c0 + group))
              for n0 in range(0, batch, images) for c0 in range(0, channels, group)]

    def work(chunk: tuple[int, int, int, int], scratch: None) -> None:
        n0, n1, c0, c1 = chunk
        transformed = scipy.fft.rfft2(maps[n0:n1, c0:c1], s=shape)  # (n, c, fh, fw//2 + 1)
        products = transformed[:, :, None] * kernel_spectra[None, c0:c1]  # (n, c, m, fh, fw//2 + 1)
        del transformed
        correlated = scipy.fft.irfft2(products.reshape(n1 - n0, (c1 - c0) * per_map, *products.shape[3:]),
                                      s=shape)
        out[n0:n1, c0 * per_map : c1 * per_map] = correlated[:, :, :out_h, :out_w]

    run_tiles(chunks, work, lambda: None, threads)
