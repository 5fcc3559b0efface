"""The fft engine: image spectra once per row tile, times the conjugate spectra of each kernel chunk.

A circular correlation of an FFT size at least the band's rows and the image's width has no wrap-around
in the valid region, so no overlap beyond the kernel's halo is needed. Its cost hardly depends on the
kernel size, which is why it wins for large kernels only.
"""

from __future__ import annotations

import numpy as np

from rmidl.geometry import split_range
from rmidl.kernels._threads import run_tiles

__all__ = ["correlate_fft", "fft_plan"]

TILE_ELEMENTS = 1 << 18
"""Real elements of one FFT tile (about 1 MiB in float32): big enough for FFT efficiency."""
SPECTRA_BYTES = 6 << 20
"""Bytes of one chunk of kernel spectra; each thread's scratch is about twice this."""
BANDS_BYTES = 16 << 20
"""Bytes of image-band spectra held at once (all of them for images up to about 8 Mpixel)."""


def fft_plan(image_hw: tuple[int, int], kernel_hw: tuple[int, int], n_kernels: int, channels: int,
             itemsize: int) -> tuple[int, int, int, int]:
    """(output rows per tile, FFT rows, FFT columns, kernels per chunk) for a valid correlation."""
    import scipy.fft  # on first use: importing it costs ~0.3 s of every CLI start

    (h, w), (kh, _) = image_hw, kernel_hw
    out_h = h - kh + 1
    fw = scipy.fft.next_fast_len(w, real=True)
    rows = max(kh, TILE_ELEMENTS // fw - kh + 1)
    rows = min(out_h, rows)
    fh = scipy.fft.next_fast_len(rows + kh - 1, real=True)
    spectrum_bytes = fh * (fw // 2 + 1) * 2 * itemsize
    chunk = max(1, min(n_kernels, SPECTRA_BYTES // (channels * spectrum_bytes)))
    return rows, fh, fw, chunk


def _kernel_spectra(kernels: np.ndarray, shape: tuple[int, int], threads: int) -> np.ndarray:
    """Conjugate 2-D spectra (K, C, fh, fw//2+1) of zero-padded kernels (K, C, kh, kw).

    The row transform runs on the kh kernel rows only, not on the fh - kh rows of padding zeros.
    """
    import scipy.fft  # on first use: importing it costs ~0.3 s of every CLI start

    fh, fw = shape
    spectra = scipy.fft.rfft(kernels, n=fw, axis=-1, workers=threads)
    spectra = scipy.fft.fft(spectra, n=fh, axis=-2, overwrite_x=True, workers=threads)
    return np.conjugate(spectra, out=spectra)


def correlate_fft(image: np.ndarray, kernels: np.ndarray, out: np.ndarray, threads: int) -> None:
    """Valid correlation of image (H, W, C) with kernels (K, C, kh, kw) into out (K, OH, OW)."""
    height, width, channels = image.shape
    n_kernels, _, kh, kw = kernels.shape
    out_h = out.shape[1]
    rows, fh, fw, chunk = fft_plan((height, width), (kh, kw), n_kernels, channels, out.itemsize)
    tiles = split_range(out_h, size=rows)
    shape = (fh, fw)
    band_bytes = channels * fh * (fw // 2 + 1) * 2 * out.itemsize
    # Band spectra are kept for every kernel chunk, so a group of tiles is bounded by BANDS_BYTES;
    # a huge image then recomputes kernel spectra once per group.
    per_group = max(1, BANDS_BYTES // band_bytes)
    for g0, g1 in split_range(len(tiles), size=per_group):
        _correlate_tiles(image, kernels, out, tiles[g0:g1], shape=shape, chunk=chunk, threads=threads)


def _correlate_tiles(image: np.ndarray, kernels: np.ndarray, out: np.ndarray, tiles: list[tuple[int, int]], *,
                     shape: tuple[int, int], chunk: int, threads: int) -> None:
    import scipy.fft  # on first use: importing it costs ~0.3 s of every CLI start

    channels = image.shape[2]
    n_kernels, _, kh, _ = kernels.shape
    out_w = out.shape[2]
    bands = {tile: scipy.fft.rfft2(image[tile[0] : tile[1] + kh - 1], s=shape, axes=(0, 1), workers=threads)
             for tile in tiles}  # (fh, fw//2+1, C) each
    # With fewer tiles than threads, kernels of a chunk are split too so that every thread has work.
    parts = max(1, -(-2 * threads // len(tiles))) if threads > 1 else 1
    for k0, k1 in split_range(n_kernels, size=chunk):
        spectra = _kernel_spectra(kernels[k0:k1], shape, threads)
        units = [(tile, group) for tile in tiles for group in split_range(k1 - k0, parts)]

        def work(unit: tuple[tuple[int, int], tuple[int, int]], scratch: np.ndarray,
                 spectra: np.ndarray = spectra, k0: int = k0) -> None:
            (r0, r1), (g0, g1) = unit
            band = bands[(r0, r1)]
            product = scratch[: g1 - g0]
            np.multiply(spectra[g0:g1, 0], band[:, :, 0], out=product)
            for c in range(1, channels):
                product += spectra[g0:g1, c] * band[:, :, c]
            # Inverse by axes, so the last pass transforms only the rows that land in the output.
            columns = scipy.fft.ifft(product, axis=-2, overwrite_x=True)
            result = scipy.fft.irfft(columns[:, : r1 - r0], n=shape[1], axis=-1, overwrite_x=True)
            out[k0 + g0 : k0 + g1, r0:r1, :] = result[:, :, :out_w]

        def make_scratch(spectra: np.ndarray = spectra) -> np.ndarray:
            return np.empty((-(-chunk // parts), *spectra.shape[2:]), spectra.dtype)

        run_tiles(units, work, make_scratch, threads)
