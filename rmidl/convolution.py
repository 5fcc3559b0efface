"""Public correlate/convolve: check and canonicalise inputs, pad for the mode, run a valid-mode engine."""

from __future__ import annotations

import logging

import numpy as np

from rmidl._memory import empty
from rmidl.geometry import pad_for_mode
from rmidl.kernels import correlate_valid
from rmidl.validate import check_engine, check_out, check_threads, prepare

__all__ = ["convolve", "correlate"]

logger = logging.getLogger(__name__)


def correlate(image: object, kernels: object, *, mode: str = "valid", threads: int | None = None,
              engine: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """Correlate an image (H, W[, C]) with a bank (K, kh, kw[, C]) or one (kh, kw) kernel -> (K, OH, OW).

    Matches scipy.signal.correlate(image, kernel, mode) per kernel, summed over channels. The result is
    float32 unless both inputs are float64. `threads=None` uses every core; `engine` is "auto" or one of
    rmidl.kernels.ENGINES; `out` is a caller's buffer of the result's shape and dtype.
    """
    return _run(image, kernels, mode=mode, threads=threads, engine=engine, out=out, flip=False)


def convolve(image: object, kernels: object, *, mode: str = "valid", threads: int | None = None,
             engine: str = "auto", out: np.ndarray | None = None) -> np.ndarray:
    """True convolution (kernels flipped), matching scipy.signal.convolve; otherwise as `correlate`."""
    return _run(image, kernels, mode=mode, threads=threads, engine=engine, out=out, flip=True)


def _run(image: object, kernels: object, *, mode: str, threads: int | None, engine: str,
         out: np.ndarray | None, flip: bool) -> np.ndarray:
    n_threads = check_threads(threads)
    engine = check_engine(engine)
    p = prepare(image, kernels, mode)
    if flip:
        p = p.flipped()
    bank = p.kernels
    padded = pad_for_mode(p.image, bank.shape[1:3], p.mode)
    result = empty(p.out_shape, p.dtype) if out is None else check_out(out, p.out_shape, p.dtype)
    # The engines write rows straight into `out`; any other layout, or an `out` that overlaps the inputs
    # (engines read input rows after writing earlier outputs), gets a temporary and one copy.
    direct = _rows_contiguous(result) and not (np.may_share_memory(result, padded)
                                               or np.may_share_memory(result, bank))
    target = result if direct else np.empty(p.out_shape, p.dtype)
    correlate_valid(padded, bank, target, threads=n_threads, engine=engine)
    if target is not result:
        result[...] = target
    return result


def _rows_contiguous(array: np.ndarray) -> bool:
    """True if each output row is contiguous and the rows of one kernel follow each other."""
    item = array.itemsize
    _, rows, cols = array.shape
    return (cols <= 1 or array.strides[2] == item) and (rows <= 1 or array.strides[1] == cols * item)
