"""What validation accepts and makes canonical (the table of what it refuses is in test_bad_input.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import rmidl
from rmidl import errors
from rmidl.validate import prepare

IMAGE = np.ones((8, 9), np.float32)
BANK = np.ones((2, 3, 3), np.float32)


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


@pytest.mark.parametrize("function", [rmidl.correlate, rmidl.convolve], ids=["correlate", "convolve"])
def test_threads_minus_one_means_every_core(function, monkeypatch: pytest.MonkeyPatch) -> None:
    """joblib's and scipy.fft's habit (issue 13): -1 is every core this process may use; the engines get
    that count. Other negatives and 0 stay refused (test_bad_input.py's table)."""
    from rmidl import convolution
    from rmidl.kernels import available_cores

    seen: list[int | None] = []
    engine = convolution.correlate_valid

    def recording(*args: Any, threads: int | None, **kwargs: Any) -> None:
        seen.append(threads)
        engine(*args, threads=threads, **kwargs)

    monkeypatch.setattr(convolution, "correlate_valid", recording)
    expected = function(IMAGE, BANK, threads=1)
    np.testing.assert_array_equal(function(IMAGE, BANK, threads=-1), expected)
    assert seen == [1, available_cores()]


def test_a_coordinator_takes_threads_minus_one() -> None:
    from rmidl.client import Coordinator

    with Coordinator(local_threads=1) as coordinator:
        expected = rmidl.correlate(IMAGE, BANK)
        np.testing.assert_array_equal(coordinator.correlate(IMAGE, BANK, threads=-1), expected)
        with pytest.raises(errors.OptionError, match=r"threads=-3 must be a positive integer, -1 \(every"):
            coordinator.correlate(IMAGE, BANK, threads=-3)
