"""Element-wise activations for feature maps (relu, tanh, abstanh, sigmoid), evaluated by numexpr."""

from __future__ import annotations

import functools
import logging
import math
import os

import numexpr
import numpy as np

from rmidl.errors import DTypeError, OptionError, ShapeError

__all__ = ["ACTIVATIONS", "activate"]

log = logging.getLogger(__name__)

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
    current = numexpr.get_num_threads()
    if os.environ.get("NUMEXPR_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return current
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if current > cores:
        numexpr.set_num_threads(cores)
        log.debug("numexpr threads %d -> %d (cores available to this process)", current, cores)
    return min(current, cores)


def _result_dtype(x: np.ndarray) -> np.dtype:
    kind = x.dtype.kind
    if kind not in "iuf":
        raise DTypeError(f"activation input dtype {x.dtype} is not supported (use an integer or float array)")
    return np.dtype(np.float64 if x.dtype == np.float64 else np.float32)


def _check_lam(lam: object) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.integer, np.floating)):
        raise OptionError(f"lam={lam!r} must be a real number")
    if not math.isfinite(float(lam)):
        raise OptionError(f"lam={lam!r} must be finite")
    return float(lam)


def _check_out(out: object, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise OptionError(f"out must be a numpy array, got {type(out).__name__}")
    if out.shape != shape:
        raise ShapeError(f"out has shape {out.shape} but the input has shape {shape}")
    if out.dtype != dtype:
        raise DTypeError(f"out has dtype {out.dtype} but the result is {dtype}")
    if not out.flags.writeable:
        raise OptionError("out is read-only")
    return out


def activate(x: object, fn: str, *, lam: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
    """Apply `fn` element-wise to `lam * x` and return the result (any shape).

    fn: "relu" max(λx, 0), "tanh" tanh(λx), "abstanh" |tanh(λx)|, "sigmoid" 1/(1+e^(-λx)).
    The result is float64 for float64 input, else float32 (integers are converted; bool, complex and
    object arrays are refused). NaN stays NaN. `out=` writes into a caller's array of the input's shape
    and the result dtype; `out=x` works in place. numexpr's pool (capped once at this process's cores)
    does the work.
    """
    if fn not in ACTIVATIONS:
        raise OptionError(f"activation {fn!r} is not one of {', '.join(ACTIVATIONS)}")
    lam = _check_lam(lam)
    array = np.asarray(x)
    dtype = _result_dtype(array)
    if out is not None:
        out = _check_out(out, array.shape, dtype)
        # numexpr streams blocks, so an input that only partly overlaps the output would be read after
        # being overwritten; the identical view (out is x, or the same buffer) is safe.
        same_view = (
            out.__array_interface__["data"][0] == array.__array_interface__["data"][0]
            and out.strides == array.strides
        )
        if not same_view and np.may_share_memory(array, out):
            array = array.copy()
    if array.dtype != dtype:
        array = array.astype(dtype)
    _pin_numexpr_threads()
    expression = ACTIVATIONS[fn]
    operands: dict[str, object] = {"y": array}
    if lam != 1.0:
        expression = expression.replace("y", "(lam * x)")
        # a numpy scalar of the array's dtype keeps float32 work in float32 (a Python float would not)
        operands = {"x": array, "lam": dtype.type(lam)}
    if out is None:
        return numexpr.evaluate(expression, local_dict=operands)
    numexpr.evaluate(expression, local_dict=operands, out=out, casting="same_kind")
    return out
