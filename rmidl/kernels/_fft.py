"""The fft engine for batches: overlap-save tiles, the channel sum as one small matmul per frequency bin.

Every tile (an image, or a row band of a large one) is transformed once per input map, every kernel once
per bank (`KernelSpectra`, which a worker keeps beside its cached bank); output map k of a tile is then
sum_c X[c] * conj(S[c, k]) in the frequency domain - at each bin a (tiles x C) @ (C x K) complex matmul
over a unit of a few tiles - followed by one inverse transform per output map, pruned to the rows that
land in the output. A circular correlation at least as large as the tile has no wrap-around in the valid
region, so tiles overlap by the kernel's halo only. Per group of tiles, two phases split over our
threads: forward transforms (a few tiles per work item), then products and inverse transforms (a
(tiles x kernels) unit per work item, in that thread's scratch); temporaries stay within TEMP_BYTES.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rmidl.geometry import split_range
from rmidl.kernels._spectra import KernelSpectra, process_spectra
from rmidl.kernels._threads import run_tiles

__all__ = ["FFTPlan", "correlate_fft", "fft_plan", "sums_by_matmul"]

TEMP_BYTES = 64 << 20
"""Bytes of temporaries one call may hold beyond its inputs and output (uncached kernel spectra included)."""
TILE_ELEMENTS = 1 << 18
"""Real elements of one FFT tile of a large image (about 1 MiB in float32): big enough for FFT efficiency."""
MATMUL_WORK = 32
"""Complex multiply-adds per bin from which a matmul per bin beats plain products."""
UNIT_TILES = 6
"""Tiles of one unit of plain products and inverse transforms at most (more spill out of L2)."""
BINS_PER_UNIT = 256
"""Frequency bins of one work unit of matmul channel sums."""
TILES_PER_CALL = 2
"""Tiles one forward or inverse transform call covers at most."""


@dataclass(frozen=True)
class FFTPlan:
    """How one batch runs: output rows per tile, the FFT size, tiles per group (whose image spectra are
    held at once), kernels per chunk (whose spectra are held at once), whether the channel sums are
    matmuls over the whole group (`by_matmul`, products held for the group) or plain products in units
    of (unit_tiles x unit_kernels) fused with their inverse transforms."""

    rows: int
    fh: int
    fw: int
    tiles: int
    group: int
    chunk: int
    by_matmul: bool
    unit_tiles: int
    unit_kernels: int

    @property
    def bins(self) -> int:
        """Frequency bins of one real 2-D transform (fh x (fw//2 + 1))."""
        return self.fh * (self.fw // 2 + 1)


def fft_plan(batch: int, image_hw: tuple[int, int], kernel_shape: tuple[int, ...], itemsize: int,
             threads: int = 1, *, cached: bool = False) -> FFTPlan:
    """The plan for a valid correlation of `batch` images (H, W) with a (K, kh, kw[, C]) bank.

    Temporaries within TEMP_BYTES: kernel spectra of a chunk (at most 3/8 of it; none if `cached`: a
    `KernelSpectra` holds them), each thread's transform scratch, and per tile of a group its image
    spectra (and, for matmuls, its products). Matmul channel sums run over the whole group, bins split
    between threads: one BLAS call per bin and group, with M = the group's tiles, because OpenBLAS
    serialises concurrent small calls (a lock per call), so per-thread units of a few tiles would not
    scale.
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
        rows = max(kh, -(-out_h // -(-threads // batch)))
        tiles_per_image = -(-out_h // rows)
    fh = scipy.fft.next_fast_len(rows + kh - 1, real=True)
    spectrum = fh * (fw // 2 + 1) * 2 * itemsize  # bytes of one map's spectrum
    n_tiles = batch * tiles_per_image
    chunk = n_kernels if cached else _even(n_kernels, (3 * TEMP_BYTES // 8) // (channels * spectrum))
    held = 0 if cached else chunk * channels * spectrum
    # Each thread: a padded tile pair and its row transforms, then an inverse call's output.
    scratch = threads * TILES_PER_CALL * spectrum * (channels + chunk)
    by_matmul = False
    if channels > 1:
        group = _even(n_tiles, max(1, (TEMP_BYTES - held - scratch) // ((channels + chunk) * spectrum)))
        by_matmul = sums_by_matmul(group, channels, chunk)
    if by_matmul:
        return FFTPlan(rows=rows, fh=fh, fw=fw, tiles=n_tiles, group=group, chunk=chunk, by_matmul=True,
                       unit_tiles=group, unit_kernels=chunk)
    # Plain products: each thread's unit holds its products and its inverse transform's output (about
    # half as big) for up to UNIT_TILES tiles; a quarter of the budget at least stays for the group.
    unit_tiles = min(UNIT_TILES, n_tiles)
    unit_kernels = chunk

    def too_big() -> bool:
        return held + threads * unit_tiles * unit_kernels * spectrum * 2 > 3 * TEMP_BYTES // 4

    while unit_kernels > 1 and too_big():
        unit_kernels = -(-unit_kernels // 2)
    while unit_tiles > 1 and too_big():
        unit_tiles -= 1
    unit_kernels = _even(chunk, unit_kernels)
    rest = TEMP_BYTES - held - threads * unit_tiles * unit_kernels * spectrum * 2
    group = _even(n_tiles, rest // (channels * spectrum))
    unit_tiles = _even(group, unit_tiles)
    # Enough units per chunk for every thread (twice over, for balance), as long as units stay whole tiles.
    if -(-group // unit_tiles) * -(-chunk // unit_kernels) < 2 * threads:
        unit_tiles = _even(group, -(-group // (2 * threads)))
    return FFTPlan(rows=rows, fh=fh, fw=fw, tiles=n_tiles, group=group, chunk=chunk, by_matmul=False,
                   unit_tiles=unit_tiles, unit_kernels=unit_kernels)


def _even(n: int, most: int) -> int:
    """The size of near-equal parts of n, each at most `most` (at least 1)."""
    parts = -(-n // max(1, min(n, most)))
    return -(-n // parts)


def correlate_fft(images: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int,
                  spectra: KernelSpectra | None = None) -> None:
    """Valid correlation of images (N, H, W, C) with kernels (K, kh, kw, C) into out (N, K, OH, OW)."""
    batch, height, width = images.shape[:3]
    n_kernels, kh = kernels.shape[:2]
    out_h = out.shape[2]
    plan = fft_plan(batch, (height, width), kernels.shape, out.itemsize, threads, cached=spectra is not None)
    if spectra is not None and not spectra.keeps((plan.fh, plan.fw)):
        # Too big for its cache: chunks made aside, so plan them within the temporaries budget.
        plan = fft_plan(batch, (height, width), kernels.shape, out.itemsize, threads)
    tiles = [(n, r0, r1) for n in range(batch) for r0, r1 in split_range(out_h, size=plan.rows)]
    chunks = split_range(n_kernels, size=plan.chunk)
    if spectra is not None:
        cached = spectra
    elif len(chunks) == 1:  # the whole bank's spectra are one chunk this call holds anyway: keep them
        cached = process_spectra(kernels)
    else:
        cached = KernelSpectra(kernels, max_bytes=0)
    shape = (plan.fh, plan.fw)
    # One chunk serves every group (made before the first group's spectra: a lower peak); several are
    # made again for each group, or they would break the budget.
    whole = cached.chunk(shape, 0, n_kernels, threads) if len(chunks) == 1 else None
    for g0, g1 in split_range(len(tiles), size=plan.group):
        group = tiles[g0:g1]
        x = _forward(images, group, plan, kh, threads)
        for k0, k1 in chunks:
            s = whole if whole is not None else cached.chunk(shape, k0, k1, threads)
            if plan.by_matmul:
                y = _sums(x, s, threads)
                del s
                _inverse(y, group, out, k0=k0, plan=plan, threads=threads)
                del y
            else:
                _products_and_inverse(x, s, group, out, k0=k0, plan=plan, threads=threads)
                del s
        del x


def sums_by_matmul(tiles: int, channels: int, kernels: int) -> bool:
    """Whether the channel sums of a (tiles x kernels) unit run as one matmul per bin (each call costs
    ~0.7 us) rather than as C passes of plain products over all bins (~8 ns per multiply-add, strided)."""
    return channels > 1 and tiles * channels * kernels >= MATMUL_WORK


def _units(n_tiles: int, threads: int) -> list[tuple[int, int]]:
    """Tile ranges transformed per call: a few tiles amortise the per-call cost, ~4 units per thread."""
    return split_range(n_tiles, size=max(1, min(TILES_PER_CALL, n_tiles // (4 * threads))))


def _forward(images: np.ndarray, tiles: list[tuple[int, int, int]], plan: FFTPlan, kh: int,
             threads: int) -> np.ndarray:
    """Spectra (tiles, fh, fw//2+1, C) of zero-padded input bands, a few tiles per work unit."""
    import scipy.fft

    _, _, width, channels = images.shape
    spectrum_type = np.result_type(images.dtype, np.complex64)
    x = np.empty((len(tiles), plan.fh, plan.fw // 2 + 1, channels), spectrum_type)
    units = _units(len(tiles), threads)
    per_unit = max(i1 - i0 for i0, i1 in units)

    def make_scratch() -> np.ndarray:
        return np.zeros((per_unit, plan.fh, plan.fw, channels), images.dtype)

    def work(unit: tuple[int, int], padded: np.ndarray) -> None:
        i0, i1 = unit
        tallest = 0
        for j, (n, r0, r1) in enumerate(tiles[i0:i1]):
            rows = r1 - r0 + kh - 1
            padded[j, :rows, :width] = images[n, r0 : r0 + rows]
            padded[j, rows:] = 0  # a shorter last band must not see the rows of the previous tile
            tallest = max(tallest, rows)
        # The padding rows transform to zeros: the row pass skips them; the column pass runs in place.
        target = x[i0:i1]
        target[:, :tallest] = scipy.fft.rfft(padded[: i1 - i0, :tallest], axis=2)
        target[:, tallest:] = 0
        result = scipy.fft.fft(target, axis=1, overwrite_x=True)
        if result.ctypes.data != target.ctypes.data:  # scipy may decline to work in place
            target[...] = result

    run_tiles(units, work, make_scratch, threads)
    return x


def _sums(x: np.ndarray, spectra: np.ndarray, threads: int) -> np.ndarray:
    """Channel sums (tiles, fh, fw//2+1, K) of a group: one (tiles x C) @ (C x K) matmul per bin, the
    bins split between threads."""
    n_tiles, fh, half, channels = x.shape
    n_kernels = spectra.shape[2]
    bins = fh * half
    y = np.empty((n_tiles, fh, half, n_kernels), x.dtype)
    xb = x.reshape(n_tiles, bins, channels).transpose(1, 0, 2)  # (bins, tiles, C): BLAS reads it in place
    yb = y.reshape(n_tiles, bins, n_kernels).transpose(1, 0, 2)

    def work(unit: tuple[int, int], scratch: None) -> None:
        f0, f1 = unit
        np.matmul(xb[f0:f1], spectra[f0:f1], out=yb[f0:f1])

    run_tiles(split_range(bins, size=BINS_PER_UNIT), work, lambda: None, threads)
    return y


def _inverse(y: np.ndarray, tiles: list[tuple[int, int, int]], out: np.ndarray, *, k0: int, plan: FFTPlan,
             threads: int) -> None:
    """Output maps from a group's channel sums (overwritten): inverse transforms by axes, so the last
    pass computes output rows only."""
    import scipy.fft

    n_kernels = y.shape[3]
    out_w = out.shape[3]

    def work(unit: tuple[int, int], scratch: None) -> None:
        i0, i1 = unit
        rows = max(r1 - r0 for _, r0, r1 in tiles[i0:i1])
        columns = scipy.fft.ifft(y[i0:i1], axis=1, overwrite_x=True)[:, :rows]
        maps = scipy.fft.irfft(columns, n=plan.fw, axis=2)  # (tiles, rows, fw, k)
        for t, (n, r0, r1) in enumerate(tiles[i0:i1]):
            out[n, k0 : k0 + n_kernels, r0:r1, :] = maps[t, : r1 - r0, :out_w].transpose(2, 0, 1)

    run_tiles(_units(len(tiles), threads), work, lambda: None, threads)


def _products_and_inverse(x: np.ndarray, spectra: np.ndarray, tiles: list[tuple[int, int, int]],
                          out: np.ndarray, *, k0: int, plan: FFTPlan, threads: int) -> None:
    """Output maps of a group's tiles for one chunk of kernels when the channel sums are plain products
    (a single channel, or too little work per bin for a matmul): a (tiles x kernels) unit per work item,
    its products and then its inverse transforms in that thread's scratch."""
    import scipy.fft

    n_tiles, fh, half, channels = x.shape
    n_kernels = spectra.shape[2]
    bins = fh * half
    out_w = out.shape[3]
    xb = x.reshape(n_tiles, bins, channels).transpose(1, 0, 2)  # (bins, tiles, C)
    units = [(i, j) for i in split_range(n_tiles, size=plan.unit_tiles)
             for j in split_range(n_kernels, size=plan.unit_kernels)]

    def make_scratch() -> tuple[np.ndarray, np.ndarray]:
        term = np.empty(0 if channels == 1 else bins * plan.unit_kernels, x.dtype)
        return np.empty(plan.unit_tiles * bins * plan.unit_kernels, x.dtype), term

    def work(unit: tuple[tuple[int, int], tuple[int, int]], scratch: tuple[np.ndarray, np.ndarray]) -> None:
        (i0, i1), (j0, j1) = unit
        m, k = i1 - i0, j1 - j0
        y = scratch[0][: m * bins * k].reshape(m, fh, half, k)
        for t in range(m):  # tile by tile: every pass over contiguous (bins x k) products
            xt, yt = xb[:, i0 + t], y[t].reshape(bins, k)
            np.multiply(xt[:, 0, None], spectra[:, 0, j0:j1], out=yt)
            for c in range(1, channels):
                term = scratch[1][: bins * k].reshape(bins, k)
                np.multiply(xt[:, c, None], spectra[:, c, j0:j1], out=term)
                yt += term
        rows = max(r1 - r0 for _, r0, r1 in tiles[i0:i1])
        columns = scipy.fft.ifft(y, axis=1, overwrite_x=True)[:, :rows]
        maps = scipy.fft.irfft(columns, n=plan.fw, axis=2)  # (m, rows, fw, k)
        for t, (n, r0, r1) in enumerate(tiles[i0:i1]):
            out[n, k0 + j0 : k0 + j1, r0:r1, :] = maps[t, : r1 - r0, :out_w].transpose(2, 0, 1)

    run_tiles(units, work, make_scratch, threads)
