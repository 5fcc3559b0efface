"""Bad input to correlate/convolve: a table of cases, each with the rmidl error class it must raise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import rmidl
from rmidl import errors
from rmidl.validate import prepare

IMAGE = np.ones((8, 9), np.float32)
BANK = np.ones((2, 3, 3), np.float32)


def with_value(array: np.ndarray, index: tuple[int, ...], value: float) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


def read_only_out() -> np.ndarray:
    out = np.empty((2, 6, 7), np.float32)
    out.flags.writeable = False
    return out


# (case id, call arguments (image, kernels, keyword options), error class, text the message must name)
BAD_INPUT: list[tuple[str, Callable[[], tuple[Any, Any, dict[str, Any]]], type[errors.RmidlError], str]] = [
    ("image 1-d", lambda: (np.ones(5), BANK, {}), errors.ShapeError, r"\(5,\)"),
    ("image 4-d", lambda: (np.ones((2, 3, 4, 1)), BANK, {}), errors.ShapeError, r"\(2, 3, 4, 1\)"),
    ("kernels 1-d", lambda: (IMAGE, np.ones(3), {}), errors.ShapeError, r"\(3,\)"),
    ("kernels 5-d", lambda: (IMAGE, np.ones((1, 1, 1, 1, 1)), {}), errors.ShapeError, r"\(1, 1, 1, 1, 1\)"),
    ("empty image", lambda: (np.ones((0, 5)), BANK, {}), errors.ShapeError, r"\(0, 5\)"),
    ("empty image width", lambda: (np.ones((4, 0, 3)), np.ones((1, 1, 1, 3)), {}), errors.ShapeError,
     r"\(4, 0, 3\)"),
    ("empty bank", lambda: (IMAGE, np.ones((0, 3, 3)), {}), errors.ShapeError, r"\(0, 3, 3, 1\)"),
    ("empty kernel", lambda: (IMAGE, np.ones((2, 0, 3)), {}), errors.ShapeError, r"\(2, 0, 3, 1\)"),
    ("channel mismatch", lambda: (np.ones((8, 9, 3)), np.ones((2, 3, 3, 2)), {}), errors.ShapeError,
     "2 channel.* 3"),
    ("gray image, colour bank", lambda: (IMAGE, np.ones((2, 3, 3, 3)), {}), errors.ShapeError, "3 channel"),
    ("kernel taller than image", lambda: (IMAGE, np.ones((1, 9, 3)), {}), errors.KernelTooLarge, "9x3.*8x9"),
    ("kernel wider than image", lambda: (IMAGE, np.ones((1, 2, 10)), {}), errors.KernelTooLarge, "2x10.*8x9"),
    ("NaN in image", lambda: (with_value(IMAGE, (3, 4), np.nan), BANK, {}), errors.NonFiniteInput,
     r"image contains NaN.*\(3, 4, 0\)"),
    ("Inf in image", lambda: (with_value(IMAGE, (0, 1), -np.inf), BANK, {}), errors.NonFiniteInput,
     "image contains Inf"),
    ("Inf before NaN", lambda: (with_value(with_value(IMAGE, (3, 4), np.nan), (0, 1), np.inf), BANK, {}),
     errors.NonFiniteInput, r"image contains Inf \(first at index \(0, 1, 0\)\)"),
    ("float64 image beyond float32", lambda: (with_value(IMAGE.astype(np.float64), (1, 1), -1e300), BANK, {}),
     errors.NonFiniteInput, r"image has values beyond the float32 range \(max \|value\| 1e\+300\)"),
    ("float64 kernels beyond float32",
     lambda: (IMAGE, with_value(BANK.astype(np.float64), (0, 0, 0), 1e39), {}), errors.NonFiniteInput,
     "kernels ha.* values beyond the float32 range"),
    ("NaN in kernels", lambda: (IMAGE, with_value(BANK, (1, 2, 0), np.nan), {}), errors.NonFiniteInput,
     r"kernels contain.*NaN.*\(1, 2, 0, 0\)"),
    ("Inf in kernels", lambda: (IMAGE, with_value(BANK, (0, 0, 0), np.inf), {}), errors.NonFiniteInput,
     "kernels contain.*Inf"),
    ("bool image", lambda: (IMAGE > 0, BANK, {}), errors.DTypeError, "bool"),
    ("complex image", lambda: (IMAGE.astype(np.complex64), BANK, {}), errors.DTypeError, "complex64"),
    ("object kernels", lambda: (IMAGE, BANK.astype(object), {}), errors.DTypeError, "object"),
    ("string image", lambda: (np.full((4, 4), "a"), BANK, {}), errors.DTypeError, "<U1"),
    ("bad mode", lambda: (IMAGE, BANK, {"mode": "circular"}), errors.OptionError, "'circular'"),
    ("bad engine", lambda: (IMAGE, BANK, {"engine": "gpu"}), errors.OptionError, "'gpu'"),
    ("array as mode", lambda: (IMAGE, BANK, {"mode": np.array(["valid", "same"])}), errors.OptionError,
     "valid"),
    ("engine not text", lambda: (IMAGE, BANK, {"engine": 3}), errors.OptionError, "engine 3"),
    ("zero threads", lambda: (IMAGE, BANK, {"threads": 0}), errors.OptionError, "threads=0"),
    ("negative threads", lambda: (IMAGE, BANK, {"threads": -2}), errors.OptionError, "threads=-2"),
    ("fractional threads", lambda: (IMAGE, BANK, {"threads": 1.5}), errors.OptionError, "threads=1.5"),
    ("bool threads", lambda: (IMAGE, BANK, {"threads": True}), errors.OptionError, "threads=True"),
    ("text threads", lambda: (IMAGE, BANK, {"threads": "2"}), errors.OptionError, "threads='2'"),
    ("out of wrong shape", lambda: (IMAGE, BANK, {"out": np.empty((2, 6, 6), np.float32)}), errors.ShapeError,
     r"\(2, 6, 6\).*\(2, 6, 7\)"),
    ("out of wrong dtype", lambda: (IMAGE, BANK, {"out": np.empty((2, 6, 7), np.float64)}), errors.DTypeError,
     "float64.*float32"),
    ("out not an array", lambda: (IMAGE, BANK, {"out": [[0.0]]}), errors.OptionError, "list"),
    ("read-only out", lambda: (IMAGE, BANK, {"out": read_only_out()}), errors.OptionError, "read-only"),
]


@pytest.mark.parametrize("function", [rmidl.correlate, rmidl.convolve], ids=["correlate", "convolve"])
@pytest.mark.parametrize(("case", "make", "error", "message"), BAD_INPUT, ids=[row[0] for row in BAD_INPUT])
def test_bad_input_raises_its_class_naming_the_value(case, make, error, message, function) -> None:
    image, kernels, options = make()
    with pytest.raises(error, match=message) as raised:
        function(image, kernels, **options)
    # Input errors are also ValueErrors (TypeError for dtypes), so callers of numpy-like APIs catch them.
    assert isinstance(raised.value, errors.InputError) and isinstance(raised.value, ValueError)


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
    that count. Other negatives and 0 stay refused (the table above)."""
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
