"""activate() against float64 numpy references, in place and out=, and its table of bad inputs."""

from __future__ import annotations

import os

import numexpr
import numpy as np
import pytest
import scipy.special

from rmidl import DTypeError, OptionError, ShapeError, activate

SHAPES = [(), (1,), (7,), (3, 5), (4, 17, 33), (2, 3, 4, 5)]


def reference(x: np.ndarray, fn: str, lam: float) -> np.ndarray:
    y = lam * x.astype(np.float64)
    return {
        "relu": lambda: np.maximum(y, 0),
        "tanh": lambda: np.tanh(y),
        "abstanh": lambda: np.abs(np.tanh(y)),
        "sigmoid": lambda: scipy.special.expit(y),
    }[fn]()


def sample(rng: np.random.Generator, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(shape) * 4).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -50), min(info.max, 50), shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("fn", ["relu", "tanh", "abstanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int16, np.uint8, np.int64])
@pytest.mark.parametrize("lam", [1.0, 0.5, -2.0, 3])
@pytest.mark.parametrize("engine", ["numpy", "numexpr"])
def test_matches_float64_reference(
    rng: np.random.Generator, fn: str, dtype: type, lam: float, engine: str
) -> None:
    for shape in [*SHAPES, (3, 12001)]:  # the last spans several blocks and a ragged one
        x = sample(rng, shape, dtype)
        got = activate(x, fn, lam=lam, engine=engine)
        expected_dtype = np.float64 if dtype == np.float64 else np.float32
        assert got.dtype == expected_dtype and got.shape == x.shape
        tolerance = 1e-12 if dtype == np.float64 else 2e-6
        np.testing.assert_allclose(got, reference(x, fn, lam), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("fn", ["relu", "tanh", "abstanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("engine", ["numpy", "numexpr"])
def test_in_place_and_out(rng: np.random.Generator, fn: str, dtype: type, engine: str) -> None:
    x = sample(rng, (64, 1048), dtype)
    expected = reference(x, fn, 1.5)
    out = np.empty_like(x)
    assert activate(x, fn, lam=1.5, out=out, engine=engine) is out
    np.testing.assert_allclose(out, expected, rtol=2e-6, atol=2e-6)
    assert activate(x, fn, lam=1.5, out=x, engine=engine) is x
    np.testing.assert_allclose(x, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("engine", ["numpy", "numexpr"])
def test_partly_overlapping_out_reads_the_input_first(rng: np.random.Generator, engine: str) -> None:
    buffer = sample(rng, (100_001,), np.float32)
    expected = reference(buffer[:-1], "sigmoid", 2.0)
    activate(buffer[:-1], "sigmoid", lam=2.0, out=buffer[1:], engine=engine)
    np.testing.assert_allclose(buffer[1:], expected, rtol=2e-6, atol=2e-6)


def test_strided_input_and_out(rng: np.random.Generator) -> None:
    x = sample(rng, (40, 60), np.float32)
    view = x[::3, ::-2].T
    out = np.zeros((60, 40), np.float32)[::2, ::3]
    activate(view, "sigmoid", out=out)
    np.testing.assert_allclose(out, reference(view, "sigmoid", 1.0), rtol=2e-6, atol=2e-6)


def test_numexpr_pool_is_capped_at_available_cores(rng: np.random.Generator) -> None:
    x = sample(rng, (512, 1024), np.float32)  # well above numexpr's serial threshold
    got = activate(x, "abstanh", lam=0.3, engine="numexpr")
    np.testing.assert_allclose(got, reference(x, "abstanh", 0.3), atol=2e-6)
    if not (os.environ.get("NUMEXPR_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        assert numexpr.get_num_threads() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("engine", ["numpy", "numexpr"])
def test_extremes_and_nan_without_warnings(engine: str) -> None:
    x = np.array([-1e4, -100.0, 0.0, 100.0, 1e4, np.inf, np.nan], np.float32)
    sig = activate(x, "sigmoid", engine=engine)
    np.testing.assert_array_equal(sig[:6], [0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(activate(x, "relu", lam=1e38, engine=engine)[3:6], np.inf)
    for fn in ("relu", "tanh", "abstanh", "sigmoid"):
        assert np.isnan(activate(x, fn, engine=engine)[-1]), fn


def test_hand_worked_values() -> None:
    x = np.array([-2.0, 0.0, 1.0])
    np.testing.assert_allclose(activate(x, "relu", lam=2), [0.0, 0.0, 2.0])
    np.testing.assert_allclose(activate(x, "sigmoid", lam=np.log(3)), [0.1, 0.5, 0.75])
    np.testing.assert_allclose(activate(x, "abstanh", lam=0.5), [np.tanh(1), 0.0, np.tanh(0.5)])


def test_input_is_not_modified_without_out(rng: np.random.Generator) -> None:
    x = sample(rng, (5, 6), np.float32)
    before = x.copy()
    activate(x, "relu")
    np.testing.assert_array_equal(x, before)


x32 = np.zeros((3, 4), np.float32)
frozen = np.zeros((3, 4), np.float32)
frozen.flags.writeable = False

BAD = [
    ({"x": x32, "fn": "softmax"}, OptionError, "softmax"),
    ({"x": x32, "fn": "RELU"}, OptionError, "RELU"),
    ({"x": x32, "fn": ["relu"]}, OptionError, r"\['relu'\]"),
    ({"x": x32, "fn": "relu", "engine": "torch"}, OptionError, "engine 'torch'"),
    ({"x": x32, "fn": "relu", "lam": "2"}, OptionError, "lam='2'"),
    ({"x": x32, "fn": "relu", "lam": float("nan")}, OptionError, "finite"),
    ({"x": x32, "fn": "tanh", "lam": float("inf")}, OptionError, "finite"),
    ({"x": x32, "fn": "relu", "lam": True}, OptionError, "lam=True"),
    ({"x": np.zeros(3, bool), "fn": "relu"}, DTypeError, "bool"),
    ({"x": np.zeros(3, complex), "fn": "tanh"}, DTypeError, "complex128"),
    ({"x": np.array([1, "a"], object), "fn": "tanh"}, DTypeError, "object"),
    ({"x": ["a", "b"], "fn": "tanh"}, DTypeError, "<U1"),
    ({"x": x32, "fn": "relu", "out": np.zeros((4, 3), np.float32)}, ShapeError, r"\(4, 3\)"),
    ({"x": x32, "fn": "relu", "out": np.zeros((3, 4), np.float64)}, DTypeError, "float64"),
    ({"x": np.zeros((3, 4)), "fn": "relu", "out": x32}, DTypeError, "float32"),
    ({"x": np.zeros((3, 4), np.int32), "fn": "relu", "out": np.zeros((3, 4), np.int32)}, DTypeError, "int32"),
    ({"x": x32, "fn": "relu", "out": frozen}, OptionError, "read-only"),
    ({"x": x32, "fn": "relu", "out": [[0.0] * 4] * 3}, OptionError, "list"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD)
def test_bad_input(kwargs: dict, error: type[Exception], message: str) -> None:
    kwargs = dict(kwargs)
    with pytest.raises(error, match=message):
        activate(kwargs.pop("x"), kwargs.pop("fn"), **kwargs)
