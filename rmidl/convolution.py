"""PLACEHOLDER (engine helper replaces this): public correlate/convolve."""

from __future__ import annotations

import numpy as np
import scipy.signal

from rmidl.tiling import pad_for_mode
from rmidl.validate import check_threads, prepare


def correlate(image, kernels, *, mode="valid", threads=None, engine="auto", out=None):  # type: ignore[no-untyped-def]
    check_threads(threads)
    p = prepare(image, kernels, mode)
    padded = pad_for_mode(p.image, p.kernels.shape[1:3], mode)
    result = np.empty(p.out_shape, p.dtype) if out is None else out
    for k in range(p.kernels.shape[0]):
        result[k] = scipy.signal.correlate(padded, p.kernels[k], mode="valid")[:, :, 0]
    return result


def convolve(image, kernels, **kw):  # type: ignore[no-untyped-def]
    p = prepare(image, kernels, kw.get("mode", "valid"))
    return correlate(p.image, p.kernels[:, ::-1, ::-1, :], **kw)
