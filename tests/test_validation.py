"""What validation accepts and makes canonical (the table of what it refuses is in test_bad_input.py)."""

from __future__ import annotations

import numpy as np

import rmidl
from rmidl.validate import prepare

IMAGE = np.ones((8, 9), np.float32)


def test_a_kernel_larger_than_the_image_is_fine_outside_valid_mode() -> None:
    for mode in ("same", "full"):
        assert rmidl.correlate(IMAGE, np.ones((1, 12, 2)), mode=mode).shape[0] == 1


def test_prepare_canonicalises_dtypes_and_shapes() -> None:
    p = prepare(np.ones((5, 6), np.uint16), np.ones((3, 3), np.float16), "same")
    assert p.image.shape == (5, 6, 1) and p.kernels.shape == (1, 3, 3, 1)
    assert p.dtype == np.float32 and p.image.flags.c_contiguous and p.out_shape == (1, 5, 6)
    p = prepare(np.ones((5, 6, 3)), np.ones((2, 3, 3, 3)), "full")
    assert p.dtype == np.float64 and p.out_shape == (2, 7, 8)
    assert prepare(np.ones((5, 6)), np.ones((2, 3, 3), np.float32)).dtype == np.float32
