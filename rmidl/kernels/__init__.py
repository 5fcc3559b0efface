"""Convolution engines behind one dispatch: the fast, unchecked valid correlation workers call per task.

`correlate_valid` (one image) and `correlate_valid_batch` (N images) take canonical arrays only (images
(H, W, C) or (N, H, W, C), kernels (K, kh, kw, C), one float dtype, C-contiguous) and a valid-mode output
whose rows are contiguous; `rmidl.correlate` does the checking. A worker serving batch tasks keeps one
`KernelSpectra(bank)` beside each cached bank and passes `spectra=spectra.select(k0, k1)` with the
kernel group `bank[k0:k1]`: the fft engine then transforms the bank once per FFT size, not per task.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from rmidl.errors import OptionError
from rmidl.geometry import split_range
from rmidl.kernels._cost import choose_engine, engine_seconds, estimate_seconds, measure_gflops
from rmidl.kernels._depthwise import DepthwiseSpectra, correlate_depthwise_fft
from rmidl.kernels._direct import correlate_direct
from rmidl.kernels._fft import correlate_fft
from rmidl.kernels._lowering import correlate_lowering
from rmidl.kernels._spectra import SPECTRA_CACHE_BYTES, KernelSpectra
from rmidl.kernels._threads import available_cores, blas_pinned, resolve_threads, run_tiles
from rmidl.validate import check_engine

__all__ = [
    "CENTRED_BYTES",
    "ENGINES",
    "SPECTRA_CACHE_BYTES",
    "DepthwiseSpectra",
    "KernelSpectra",
    "available_cores",
    "blas_pinned",
    "choose_engine",
    "correlate_depthwise_batch",
    "correlate_valid",
    "correlate_valid_batch",
    "engine_seconds",
    "estimate_seconds",
    "measure_gflops",
]

logger = logging.getLogger(__name__)

ENGINES = ("lowering", "direct", "fft")
"""Engine names `engine=` accepts, besides "auto"."""
SAMPLE_VALUES = 1 << 16
"""Values sampled to decide whether a batch's images need centring (see `_offsets`)."""
CENTRED_BYTES = 32 << 20
"""Bytes of centred images (see `_remove_offset`) made at once: larger batches are centred in slices."""


def correlate_valid(image: np.ndarray, kernels: np.ndarray, out: np.ndarray, *,
                    threads: int | None = None, engine: str = "auto",
                    spectra: KernelSpectra | None = None) -> np.ndarray:
    """Valid correlation of image (H, W, C) with kernels (K, kh, kw, C) into out (K, OH, OW); returns out.

    No array checks (only the engine name): `out` may be a view (e.g. rows of a shared-memory output) as
    long as each output row is contiguous, rows follow each other (row stride OW * itemsize) and it does
    not overlap the inputs. `spectra`: the bank's cached kernel spectra for the fft engine (optional).
    """
    correlate_valid_batch(image[None], kernels, out[None], threads=threads, engine=engine, spectra=spectra)
    return out


def correlate_valid_batch(images: np.ndarray, kernels: np.ndarray, out: np.ndarray, *,
                          threads: int | None = None, engine: str = "auto",
                          spectra: KernelSpectra | None = None) -> np.ndarray:
    """Valid correlation of images (N, H, W, C) with kernels (K, kh, kw, C) into out (N, K, OH, OW).

    As `correlate_valid`, for a batch: the rows of each output map must be contiguous and follow each
    other (any stride between maps and images). Returns out.
    """
    engine = check_engine(engine)  # before any work: the per-task path has no other check
    n_threads = resolve_threads(threads)
    batch = images.shape[0]
    if spectra is not None and not spectra.matches(kernels):
        raise OptionError(f"spectra are of a bank {spectra.kernels.shape}, not of kernels {kernels.shape}")
    if batch == 0 or out.size == 0:
        return out
    if engine == "auto":
        engine = choose_engine(images.shape[1:3], kernels.shape, n_threads, batch=batch)
    logger.debug("correlate_valid_batch %s * %s, %d thread(s), %s", images.shape, kernels.shape, n_threads,
                 engine)
    offsets = _offsets(images)
    if offsets is None:
        _run(engine, images, kernels, out, threads=n_threads, spectra=spectra)
        return out
    per_slice = max(1, CENTRED_BYTES // max(1, images[0].nbytes))
    for n0 in range(0, batch, per_slice):
        part = offsets[n0 : n0 + per_slice]
        centred = images[n0 : n0 + per_slice] - part[:, None, None, :]
        _run(engine, centred, kernels, out[n0 : n0 + per_slice], threads=n_threads, spectra=spectra)
        bias = np.einsum("khwc,nc->nk", kernels, part.astype(np.float64), dtype=np.float64)
        _add_bias(out[n0 : n0 + per_slice], bias.astype(out.dtype), threads=n_threads)
    return out


BIAS_TILE_BYTES = 4 << 20
"""Output bytes one thread adds a bias to at a time (a 462 MB output's single-threaded pass cost ~0.03 s)."""


def _add_bias(out: np.ndarray, bias: np.ndarray, *, threads: int) -> None:
    """out[n, k] += bias[n, k] for out (N, K, OH, OW), on `threads` threads in tiles of about
    BIAS_TILE_BYTES: rows of one map, whole maps of one image, or whole images where images are small
    (one numpy call for an output under one tile or on one thread: a tile costs ~10 us of Python)."""
    if threads == 1 or out.nbytes <= BIAS_TILE_BYTES:
        np.add(out, bias[:, :, None, None], out=out)
        return
    batch, k, out_h, out_w = out.shape
    row_bytes = max(1, out_w * out.itemsize)
    map_bytes = row_bytes * out_h
    rows = max(1, min(out_h, BIAS_TILE_BYTES // row_bytes))
    maps = max(1, min(k, BIAS_TILE_BYTES // map_bytes)) if rows == out_h else 1
    images = max(1, BIAS_TILE_BYTES // (map_bytes * k)) if maps == k else 1
    tiles = [(n0, n1, j0, j1, r0, r1) for n0, n1 in split_range(batch, size=images)
             for j0, j1 in split_range(k, size=maps) for r0, r1 in split_range(out_h, size=rows)]

    def work(tile: tuple[int, int, int, int, int, int], scratch: None) -> None:
        n0, n1, j0, j1, r0, r1 = tile
        part = out[n0:n1, j0:j1, r0:r1]
        np.add(part, bias[n0:n1, j0:j1, None, None], out=part)

    run_tiles(tiles, work, lambda: None, threads)


def correlate_depthwise_batch(maps: np.ndarray, kernels: np.ndarray, out: np.ndarray, *,
                              padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
                              threads: int | None = None,
                              spectra: DepthwiseSpectra | None = None) -> np.ndarray:
    """Depthwise correlation of maps (N, C, H, W), zero-padded by `padding` ((top, bottom), (left, right):
    how a mode becomes valid), with kernels (C * m, kh, kw), kernel k on map k // m, into out
    (N, C * m, OH, OW) by the depthwise FFT engine; returns out. No array checks (a Network's stage
    calls it). Maps whose mean dominates their spread are centred as in `correlate_valid_batch`; padded
    or centred maps are made at most CENTRED_BYTES at a time. `spectra`: the bank's kept ones."""
    batch, channels, h, w = maps.shape
    if spectra is not None and not spectra.matches(kernels, channels):
        raise OptionError(f"spectra are of a bank {spectra.kernels.shape} on {spectra.maps} maps, not of "
                          f"kernels {kernels.shape} on {channels}")
    n_threads = resolve_threads(threads)
    if batch == 0 or out.size == 0:
        return out
    offsets = _offsets(maps.transpose(0, 2, 3, 1))
    (top, bottom), (left, right) = padding
    if offsets is None and top == bottom == left == right == 0:
        correlate_depthwise_fft(maps, kernels, out, n_threads, spectra)
        return out
    shape = (channels, h + top + bottom, w + left + right)
    per_slice = max(1, CENTRED_BYTES // max(1, math.prod(shape) * maps.itemsize))
    sums = kernels.sum(axis=(1, 2), dtype=np.float64)
    for n0 in range(0, batch, per_slice):
        n1 = min(batch, n0 + per_slice)
        shift = np.zeros((n1 - n0, channels), maps.dtype) if offsets is None else offsets[n0:n1]
        ready = np.empty((n1 - n0, *shape), maps.dtype)
        # centring moves the padding's zeros too: corr(pad(I) - m, K) + m * sum(K) = corr(pad(I), K)
        border = -shift[:, :, None, None]
        ready[:, :, :top], ready[:, :, top + h :] = border, border
        ready[:, :, top : top + h, :left], ready[:, :, top : top + h, left + w :] = border, border
        np.subtract(maps[n0:n1], shift[:, :, None, None], out=ready[:, :, top : top + h, left : left + w])
        correlate_depthwise_fft(ready, kernels, out[n0:n1], n_threads, spectra)
        if offsets is not None:
            bias = np.repeat(shift.astype(np.float64), kernels.shape[0] // channels, axis=1) * sums
            _add_bias(out[n0:n1], bias.astype(out.dtype), threads=n_threads)
    return out


def _run(engine: str, images: np.ndarray, kernels: np.ndarray, out: np.ndarray, *, threads: int,
         spectra: KernelSpectra | None) -> None:
    with blas_pinned():
        if engine == "lowering":
            correlate_lowering(images, kernels, out, threads)
        elif engine == "direct":
            correlate_direct(images, np.ascontiguousarray(kernels.transpose(0, 3, 1, 2)), out, threads)
        else:
            correlate_fft(images, kernels, out, threads, spectra)


def _offsets(images: np.ndarray) -> np.ndarray | None:
    """Per image and channel, the offset to subtract from a float32 image whose mean dominates its spread.

    A large offset (8-bit pixels, say) against zero-mean kernels makes float32 sums cancel, and every
    engine would lose digits; correlate(I) = correlate(I - m) + m * sum(K) holds exactly for valid
    correlation, and I - m is exact in float32 for pixels within a factor 2 of m (Sterbenz) and for
    integer pixels (m has 8 significant bits). Returns (N, C) offsets (0 where an image needs none), or
    None when no image of the batch needs one.
    """
    if images.dtype != np.float32:
        return None
    # A sparse grid of at most ~64k values over the batch: the test needs magnitudes, not exact moments.
    n, h, w, channels = images.shape
    per_image = max(64, SAMPLE_VALUES // (n * channels))
    step = max(1, int(np.ceil(np.sqrt(h * w / per_image))))
    sample = images[:, ::step, ::step]
    mean = sample.mean(axis=(1, 2), dtype=np.float64)
    needed = np.abs(mean) > sample.std(axis=(1, 2), dtype=np.float64)
    if not needed.any():
        return None
    # Rounded to 8 significant bits, so that integer (8-bit, 16-bit) pixels stay exact after subtraction.
    fraction, exponent = np.frexp(np.where(needed.any(axis=1, keepdims=True), mean, 0.0))
    return np.ldexp(np.round(fraction * 256), exponent - 8).astype(np.float32)
