"""Public correlate/convolve: check and canonicalise inputs, pad for the mode, run a valid-mode engine."""

from __future__ import annotations

import logging

import numpy as np

from rmidl._memory import empty
from rmidl.geometry import pad_for_mode
from rmidl.kernels import KernelSpectra, correlate_valid, correlate_valid_batch
from rmidl.validate import check_engine, check_out, check_threads, prepare_any

__all__ = ["convolve", "correlate", "correlate_batch_cached"]

logger = logging.getLogger(__name__)


def correlate(image: object, kernels: object, *, batch: bool = False, mode: str = "valid",
              threads: int | None = None, engine: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """Correlate an image (H, W[, C]) with a bank (K, kh, kw[, C]) or one (kh, kw) kernel -> (K, OH, OW).

    Matches scipy.signal.correlate(image, kernel, mode) per kernel, summed over channels. With
    `batch=True` the first argument is a batch of images (N, H, W[, C]) and the result (N, K, OH, OW).
    The result is float32 unless both inputs are float64. `threads=None` uses every core; `engine` is
    "auto" or one of rmidl.kernels.ENGINES; `out` is a caller's buffer of the result's shape and dtype.
    """
    return _run(image, kernels, batch=batch, mode=mode, threads=threads, engine=engine, out=out, flip=False)


def convolve(image: object, kernels: object, *, batch: bool = False, mode: str = "valid",
             threads: int | None = None, engine: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """True convolution (kernels flipped), matching scipy.signal.convolve; otherwise as `correlate`."""
    return _run(image, kernels, batch=batch, mode=mode, threads=threads, engine=engine, out=out, flip=True)


def correlate_batch_cached(images: object, kernels: object, spectra: KernelSpectra, *, mode: str = "valid",
                           threads: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """`correlate(images, kernels, batch=True, ...)` with the bank's kernel spectra kept by the caller
    (a Network's stage keeps its own): the FFT engine then transforms the bank once per size, not per call."""
    return _run(images, kernels, batch=True, mode=mode, threads=threads, engine="auto", out=out, flip=False,
                spectra=spectra)


def _run(image: object, kernels: object, *, batch: bool, mode: str, threads: int | None, engine: str,
         out: np.ndarray | None, flip: bool, spectra: KernelSpectra | None = None) -> np.ndarray:
    n_threads = check_threads(threads)
    engine = check_engine(engine)
    prepared = prepare_any(image, kernels, mode, batch=batch, flip=flip)
    bank, dtype, out_shape = prepared.kernels, prepared.dtype, prepared.out_shape
    padded = pad_for_mode(prepared.images, bank.shape[1:3], mode, batch=True)
    result = empty(out_shape, dtype) if out is None else check_out(out, out_shape, dtype)
    target4 = result if batch else result[None]
    # The engines write rows straight into `out`; any other layout, or an `out` that overlaps the inputs
    # (engines read input rows after writing earlier outputs), gets a temporary and one copy.
    direct = _rows_contiguous(target4) and not (np.may_share_memory(result, padded)
                                                or np.may_share_memory(result, bank))
    target = target4 if direct else np.empty(target4.shape, dtype)
    if batch:
        correlate_valid_batch(padded, bank, target, threads=n_threads, engine=engine, spectra=spectra)
    else:
        correlate_valid(padded[0], bank, target[0], threads=n_threads, engine=engine)
    if target is not target4:
        target4[...] = target
    return result


def _rows_contiguous(array: np.ndarray) -> bool:
    """True if each output row is contiguous and the rows of one map follow each other."""
    item = array.itemsize
    *_, rows, cols = array.shape
    return (cols <= 1 or array.strides[-1] == item) and (rows <= 1 or array.strides[-2] == cols * item)
