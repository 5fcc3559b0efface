"""The fft engine for batches: overlap-save tiles, the channel sum as one small matmul per frequency bin.

Every tile (an image, or a row band of a large one) is transformed once per input map, every kernel once
per bank (`KernelSpectra`, which a worker keeps beside its cached bank); output map k of a tile is then
sum_c X[c] * conj(S[c, k]) in the frequency domain - at each bin a (tiles x C) @ (C x K) complex matmul
over a whole group of tiles - followed by one inverse transform per output map, pruned to the rows that
land in the output. A circular correlation at least as large as the tile has no wrap-around in the valid
region, so tiles overlap by the kernel's halo only. Work runs in three phases per group of tiles
(forward transforms by tile, products by bin range, inverse transforms by tile), each split over our
threads, with temporaries bounded by TEMP_BYTES.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from rmidl.errors import OptionError
from rmidl.geometry import split_range
from rmidl.kernels._threads import run_tiles

__all__ = ["KernelSpectra", "FFTPlan", "correlate_fft", "fft_plan", "kernel_spectra"]

TEMP_BYTES = 64 << 20
"""Bytes of temporaries one call may hold beyond its inputs and output (uncached kernel spectra included)."""
TILE_ELEMENTS = 1 << 18
"""Real elements of one FFT tile of a large image (about 1 MiB in float32): big enough for FFT efficiency."""
BINS_PER_UNIT = 256
"""Frequency bins per product work unit: each unit is that many small matmuls."""
SPECTRA_CACHE_BYTES = 256 << 20
"""Default bound of one bank's cached spectra (all FFT sizes together)."""


@dataclass(frozen=True)
class FFTPlan:
    """How one batch runs: output rows per tile, the FFT size, tiles per group, kernels per chunk."""

    rows: int
    fh: int
    fw: int
    group: int
    chunk: int
    tiles: int

    @property
    def bins(self) -> int:
        """Frequency bins of one real 2-D transform (fh x (fw//2 + 1))."""
        return self.fh * (self.fw // 2 + 1)


def fft_plan(batch: int, image_hw: tuple[int, int], kernel_shape: tuple[int, ...], itemsize: int,
             threads: int = 1, *, cached: bool = False) -> FFTPlan:
    """The plan for a valid correlation of `batch` images (H, W) with a (K, kh, kw[, C]) bank.

    `cached`: the kernel spectra live in a `KernelSpectra` and do not count against TEMP_BYTES.
    """
    import scipy.fft  # on first use: importing it costs ~0.3 s of every CLI start

    (h, w), (n_kernels, kh) = image_hw, kernel_shape[:2]
    channels = int(kernel_shape[3]) if len(kernel_shape) > 3 else 1
    out_h = h - kh + 1
    fw = scipy.fft.next_fast_len(w, real=True)
    rows = min(out_h, max(kh, TILE_ELEMENTS // fw - kh + 1))
    tiles_per_image = -(-out_h // rows)
    if batch * tiles_per_image < threads and out_h >= 2 * kh:
        # Too few tiles to keep every thread busy: cut bands, as long as the halo stays under the band.
        want = -(-threads // batch)
        rows = max(kh, -(-out_h // want))
        tiles_per_image = -(-out_h // rows)
    fh = scipy.fft.next_fast_len(rows + kh - 1, real=True)
    complex_size = 2 * itemsize
    spectrum = fh * (fw // 2 + 1) * complex_size  # bytes of one map's spectrum
    n_tiles = batch * tiles_per_image
    # Kernel spectra take at most 3/8 of the budget when they are ours to hold; chunks are even.
    chunk = n_kernels
    if not cached:
        chunk = max(1, min(n_kernels, (3 * TEMP_BYTES // 8) // (channels * spectrum)))
        chunk = -(-n_kernels // -(-n_kernels // chunk))
    held = 0 if cached else chunk * channels * spectrum
    scratch = threads * (fh * fw * channels * itemsize + 2 * spectrum * max(channels, chunk))
    per_tile = (channels + chunk) * spectrum  # its image spectra and its products
    group = max(1, min(n_tiles, (TEMP_BYTES - held - scratch) // per_tile))
    group = -(-n_tiles // -(-n_tiles // group))  # even groups
    return FFTPlan(rows=rows, fh=fh, fw=fw, group=group, chunk=chunk, tiles=n_tiles)


def kernel_spectra(kernels: np.ndarray, shape: tuple[int, int], threads: int = 1) -> np.ndarray:
    """Conjugate spectra (fh * (fw//2 + 1), C, K) of kernels (K, kh, kw, C) zero-padded to `shape`.

    The row transform runs on the kh kernel rows only, not on the fh - kh rows of padding zeros.
    """
    import scipy.fft

    fh, fw = shape
    n_kernels, _, _, channels = kernels.shape
    planar = kernels.transpose(1, 2, 3, 0)  # (kh, kw, C, K): the matmul's C x K at every bin
    spectra = scipy.fft.rfft(planar, n=fw, axis=1, workers=threads)
    spectra = scipy.fft.fft(spectra, n=fh, axis=0, overwrite_x=True, workers=threads)
    np.conjugate(spectra, out=spectra)
    return spectra.reshape(-1, channels, n_kernels)


class KernelSpectra:
    """One bank's kernel spectra, cached per FFT size (least recently used first out, bounded in bytes).

    A worker keeps one beside each cached bank and passes it (or `select(k0, k1)` of it for a kernel
    group) to `correlate_valid_batch`; safe to share between threads.
    """

    def __init__(self, kernels: np.ndarray, max_bytes: int = SPECTRA_CACHE_BYTES) -> None:
        self.kernels = kernels
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._parent = self
        self._k0 = 0

    def select(self, k0: int, k1: int) -> KernelSpectra:
        """The spectra of kernels [k0, k1), sharing this bank's cache."""
        if not 0 <= k0 < k1 <= self.kernels.shape[0]:
            raise OptionError(f"kernels [{k0}, {k1}) are not in a bank of {self.kernels.shape[0]}")
        view = KernelSpectra.__new__(KernelSpectra)
        view.kernels, view.max_bytes = self.kernels[k0:k1], self.max_bytes
        view._parent, view._k0 = self._parent, self._k0 + k0
        return view

    @property
    def nbytes(self) -> int:
        """Bytes of spectra held now."""
        parent = self._parent
        with parent._lock:
            return sum(s.nbytes for s in parent._cache.values())

    def matches(self, kernels: np.ndarray) -> bool:
        """True if these are the spectra of `kernels` (same shape, dtype, and the very same values)."""
        mine = self.kernels
        return (mine.shape == kernels.shape and mine.dtype == kernels.dtype
                and (np.may_share_memory(mine, kernels) or np.array_equal(mine, kernels)))

    def chunk(self, shape: tuple[int, int], k0: int, k1: int, threads: int = 1) -> np.ndarray:
        """Spectra (bins, C, k1 - k0) of kernels [k0, k1) of this selection; computed aside if too big."""
        parent, start = self._parent, self._k0
        k0, k1 = start + k0, start + k1
        bank = parent.kernels
        full_bytes = bank.shape[0] * bank.shape[3] * shape[0] * (shape[1] // 2 + 1) * 2 * bank.itemsize
        if full_bytes > parent.max_bytes:
            return kernel_spectra(bank[k0:k1], shape, threads)
        with parent._lock:
            spectra = parent._cache.get(shape)
            if spectra is None:
                spectra = kernel_spectra(bank, shape, threads)
                parent._cache[shape] = spectra
                while sum(s.nbytes for s in parent._cache.values()) > parent.max_bytes:
                    parent._cache.popitem(last=False)
            else:
                parent._cache.move_to_end(shape)
        return spectra[:, :, k0:k1]


def correlate_fft(images: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int,
                  spectra: KernelSpectra | None = None) -> None:
    """Valid correlation of images (N, H, W, C) with kernels (K, kh, kw, C) into out (N, K, OH, OW)."""
    batch, height, width = images.shape[:3]
    n_kernels, kh = kernels.shape[:2]
    out_h = out.shape[2]
    plan = fft_plan(batch, (height, width), kernels.shape, out.itemsize, threads, cached=spectra is not None)
    tiles = [(n, r0, r1) for n in range(batch) for r0, r1 in split_range(out_h, size=plan.rows)]
    cached = spectra if spectra is not None else KernelSpectra(kernels, max_bytes=0)
    chunks = split_range(n_kernels, size=plan.chunk)
    held: dict[tuple[int, int], np.ndarray] = {}
    for g0, g1 in split_range(len(tiles), size=plan.group):
        group = tiles[g0:g1]
        x = _forward(images, group, plan, kh, threads)
        for k0, k1 in chunks:
            s = held.get((k0, k1))
            if s is None:
                s = cached.chunk((plan.fh, plan.fw), k0, k1, threads)
                if len(chunks) == 1:  # one chunk serves every group; more would break the budget
                    held[(k0, k1)] = s
            y = _products(x, s, threads)
            del s
            _inverse(y, group, out, k0, plan, threads=threads)
        del x


def _forward(images: np.ndarray, tiles: list[tuple[int, int, int]], plan: FFTPlan, kh: int,
             threads: int) -> np.ndarray:
    """Spectra (tiles, fh, fw//2+1, C) of zero-padded input bands, one tile per work unit."""
    import scipy.fft

    _, _, width, channels = images.shape
    spectrum_type = np.result_type(images.dtype, np.complex64)
    x = np.empty((len(tiles), plan.fh, plan.fw // 2 + 1, channels), spectrum_type)

    def make_scratch() -> np.ndarray:
        return np.zeros((plan.fh, plan.fw, channels), images.dtype)

    def work(i: int, padded: np.ndarray) -> None:
        n, r0, r1 = tiles[i]
        rows = r1 - r0 + kh - 1
        padded[:rows, :width] = images[n, r0 : r0 + rows]
        padded[rows:] = 0  # a shorter last band must not see the rows of the previous tile
        half = scipy.fft.rfft(padded[:rows], axis=1)  # the padding rows transform to zeros: skip them
        x[i] = scipy.fft.fft(half, n=plan.fh, axis=0, overwrite_x=True)

    run_tiles(range(len(tiles)), work, make_scratch, threads)
    return x


def _products(x: np.ndarray, spectra: np.ndarray, threads: int) -> np.ndarray:
    """Products (tiles, fh, fw//2+1, k) summed over channels: one (tiles x C) @ (C x k) matmul per bin."""
    n_tiles, fh, half, channels = x.shape
    n_kernels = spectra.shape[2]
    bins = fh * half
    y = np.empty((n_tiles, fh, half, n_kernels), x.dtype)
    xb = x.reshape(n_tiles, bins, channels).transpose(1, 0, 2)  # (bins, tiles, C): BLAS reads it in place
    yb = y.reshape(n_tiles, bins, n_kernels).transpose(1, 0, 2)
    # A matmul per bin pays ~1 us of call overhead; below this much work per bin plain products are faster.
    by_matmul = n_tiles * channels * n_kernels >= 512 and channels > 1

    def work(unit: tuple[int, int], scratch: np.ndarray | None) -> None:
        f0, f1 = unit
        if by_matmul:
            np.matmul(xb[f0:f1], spectra[f0:f1], out=yb[f0:f1])
            return
        target = yb[f0:f1]
        np.multiply(xb[f0:f1, :, 0, None], spectra[f0:f1, None, 0, :], out=target)
        for c in range(1, channels):
            assert scratch is not None
            term = scratch[: f1 - f0]
            np.multiply(xb[f0:f1, :, c, None], spectra[f0:f1, None, c, :], out=term)
            target += term

    def make_scratch() -> np.ndarray | None:
        return None if by_matmul or channels == 1 else np.empty((BINS_PER_UNIT, n_tiles, n_kernels), x.dtype)

    run_tiles(split_range(bins, size=BINS_PER_UNIT), work, make_scratch, threads)
    return y


def _inverse(y: np.ndarray, tiles: list[tuple[int, int, int]], out: np.ndarray, k0: int, plan: FFTPlan, *,
             threads: int) -> None:
    """Inverse transforms of the products, by axes so that the last pass computes output rows only."""
    import scipy.fft

    n_kernels = y.shape[3]
    out_w = out.shape[3]

    def work(i: int, scratch: None) -> None:
        n, r0, r1 = tiles[i]
        columns = scipy.fft.ifft(y[i], axis=0, overwrite_x=True)[: r1 - r0]
        maps = scipy.fft.irfft(columns, n=plan.fw, axis=1)  # (rows, fw, k)
        out[n, k0 : k0 + n_kernels, r0:r1, :] = maps[:, :out_w].transpose(2, 0, 1)

    run_tiles(range(len(tiles)), work, lambda: None, threads)
