"""Element-wise activations of feature maps (relu, tanh, abstanh, sigmoid) by numpy ufuncs or numexpr."""

from __future__ import annotations

import functools
import logging
import math
import os

import numpy as np

from rmidl.errors import OptionError
from rmidl.kernels import available_cores
from rmidl.validate import check_out, check_real

__all__ = ["ACTIVATIONS", "ENGINES", "activate"]

log = logging.getLogger(__name__)

ENGINES = ("numpy", "numexpr")
_BLOCK = 1 << 15  # elements per block: 128 KiB of float32 stays in L2 between passes

# fn -> numexpr expression of `y` (= lam * x); written so that NaN propagates as it does in numpy.
ACTIVATIONS: dict[str, str] = {
    "relu": "where(y < 0, 0, y)",
    "tanh": "tanh(y)",
    "abstanh": "abs(tanh(y))",
    "sigmoid": "1 / (1 + exp(-y))",
}


@functools.cache
def _pin_numexpr_threads() -> int:
    """Once per process: cap numexpr's pool at the cores this process may run on (not all the host's).

    numexpr sizes its pool from the host's core count (up to 16), which oversubscribes a worker confined
    by affinity or a container; NUMEXPR_NUM_THREADS / OMP_NUM_THREADS set by the user win.
    """
    import numexpr  # imported on first use: it costs ~0.2 s and numpy is the default engine

    current = numexpr.get_num_threads()
    if os.environ.get("NUMEXPR_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return current
    cores = available_cores()
    if current > cores:
        numexpr.set_num_threads(cores)
        log.debug("numexpr threads %d -> %d (cores available to this process)", current, cores)
    return min(current, cores)


def _result_dtype(x: np.ndarray) -> np.dtype:
    check_real(x, "activation input")
    return np.dtype(np.float64 if x.dtype == np.float64 else np.float32)


def _check_lam(lam: object) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)):
        raise OptionError(f"lam={lam!r} must be a real number")
    if not math.isfinite(float(lam)):
        raise OptionError(f"lam={lam!r} must be finite")
    return float(lam)


def _numpy_passes(src: np.ndarray, out: np.ndarray, fn: str, lam: float) -> None:
    """out = fn(lam * src) with in-place ufunc passes (no temporaries); src may be out."""
    if lam != 1.0 or fn == "sigmoid":
        np.multiply(src, out.dtype.type(-lam if fn == "sigmoid" else lam), out=out)
        src = out
    if fn == "relu":
        np.maximum(src, 0, out=out)  # propagates NaN, unlike a comparison
    elif fn == "tanh":
        np.tanh(src, out=out)
    elif fn == "abstanh":
        np.tanh(src, out=out)
        np.abs(out, out=out)
    else:
        np.exp(out, out=out)
        out += 1
        np.reciprocal(out, out=out)


def _numpy(src: np.ndarray, out: np.ndarray, fn: str, lam: float) -> None:
    # Several passes over cache-sized blocks run at the speed of one fused pass over memory.
    with np.errstate(over="ignore", invalid="ignore"):  # e^(-λx) -> inf gives sigmoid 0, as it should
        if src.size > _BLOCK and src.flags.c_contiguous and out.flags.c_contiguous:
            flat_src, flat_out = src.reshape(-1), out.reshape(-1)
            for start in range(0, flat_src.size, _BLOCK):
                block = slice(start, start + _BLOCK)
                _numpy_passes(flat_src[block], flat_out[block], fn, lam)
        else:
            _numpy_passes(src, out, fn, lam)


def _numexpr(src: np.ndarray, out: np.ndarray, fn: str, lam: float) -> None:
    import numexpr

    _pin_numexpr_threads()
    expression = ACTIVATIONS[fn]
    operands: dict[str, object] = {"y": src}
    if lam != 1.0:
        expression = expression.replace("y", "(lam * x)")
        # a numpy scalar of the array's dtype keeps float32 work in float32 (a Python float would not)
        operands = {"x": src, "lam": out.dtype.type(lam)}
    numexpr.evaluate(expression, local_dict=operands, out=out, casting="same_kind")


def activate(
    x: object, fn: str, *, lam: float = 1.0, out: np.ndarray | None = None, engine: str = "numpy"
) -> np.ndarray:
    """Apply `fn` element-wise to `lam * x` and return the result (any shape).

    fn: "relu" max(λx, 0), "tanh" tanh(λx), "abstanh" |tanh(λx)|, "sigmoid" 1/(1+e^(-λx)).
    The result is float64 for float64 input, else float32 (integers are converted; bool, complex and
    object arrays are refused). NaN stays NaN. `out=` writes into a caller's array of the input's shape
    and the result dtype; `out=x` works in place.

    engine="numpy" (default) runs in-place ufunc passes over cache-sized blocks; engine="numexpr" uses
    numexpr's pool (capped once at this process's cores). numpy 2's SIMD float32 exp/tanh made the numpy
    engine 4-30x faster than numexpr without Intel VML on our 2-core AVX2 machine (see the commit).
    """
    if not isinstance(fn, str) or fn not in ACTIVATIONS:  # a list would not even hash
        raise OptionError(f"activation {fn!r} is not one of {', '.join(ACTIVATIONS)}")
    if engine not in ENGINES:
        raise OptionError(f"activation engine {engine!r} is not one of {', '.join(ENGINES)}")
    lam = _check_lam(lam)
    array = np.asarray(x)
    dtype = _result_dtype(array)
    if out is None:
        out = np.empty(array.shape, dtype)
    else:
        out = check_out(out, array.shape, dtype)
        # both engines stream blocks, so an input that only partly overlaps the output would be read
        # after being overwritten; the identical view (out is x, or the same buffer) is safe.
        same_view = (
            out.__array_interface__["data"][0] == array.__array_interface__["data"][0]
            and out.strides == array.strides
        )
        if not same_view and np.may_share_memory(array, out):
            array = array.copy()
    if array.dtype != dtype:
        array = array.astype(dtype)
    (_numpy if engine == "numpy" else _numexpr)(array, out, fn, lam)
    return out
