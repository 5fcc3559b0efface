"""The image and kernel bank that `rmidl run` and `rmidl bench` convolve, read in the order that lets a named
bank (`gabor:100000x301`) be refused from its spec, in one line, before minutes and gigabytes of building."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rmidl._files import clipped
from rmidl.banks import bank_shape, load_kernels
from rmidl.config import Config
from rmidl.errors import BudgetExceeded, KernelTooLarge
from rmidl.geometry import output_shape

__all__ = ["check_planned_bank", "image_and_bank"]


def image_and_bank(spec: str, read_image: Callable[[bool], np.ndarray], mode: str,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`read_image(gray)` (grayscale for a (K, kh, kw) bank, colour for a (K, kh, kw, C) one) and the bank
    `spec` names; a named bank is built only once check_planned_bank has passed it."""
    planned = bank_shape(spec)
    if planned is None:  # a file: its header tells, and load_kernels reads it bounded
        kernels = load_kernels(spec)
        return read_image(kernels.ndim == 3), kernels
    image = read_image(len(planned) == 3)
    check_planned_bank(spec, planned, image.shape[:2], mode, Config().memory_budget)
    return image, load_kernels(spec)


def check_planned_bank(spec: str, shape: tuple[int, ...], image_hw: tuple[int, ...], mode: str,
                       budget: int) -> None:
    """Refuse the bank `spec` plans (`shape`) when its kernels do not fit the image in valid mode or its
    float32 maps would be over `budget` bytes: what the job would refuse later, after the bank was built."""
    (k, kh, kw), (h, w) = shape[:3], image_hw[:2]
    if mode == "valid" and (kh > h or kw > w):
        raise KernelTooLarge(f"kernel bank {clipped(spec)}: kernel {kw}x{kh} does not fit image {w}x{h} "
                             "in valid mode")
    oh, ow = output_shape((h, w), (kh, kw), mode)
    nbytes = 4 * k * oh * ow
    if nbytes > budget:
        raise BudgetExceeded(f"kernel bank {clipped(spec)} ({k} kernels {kw}x{kh}) makes {k} maps {ow}x{oh} "
                             f"float32 of {nbytes} bytes, more than memory_budget={budget}")
