"""pool() against a plain-loop float64 reference over many shapes, windows and strides; bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from rmidl import DTypeError, OptionError, ShapeError, pool
from rmidl.pooling import pool_shape


def reference(x: np.ndarray, size: tuple[int, int], stride: tuple[int, int], kind: str) -> np.ndarray:
    (ph, pw), (sh, sw) = size, stride
    h, w = x.shape[-2:]
    rows = [i * sh for i in range(h) if i * sh + ph <= h]
    cols = [j * sw for j in range(w) if j * sw + pw <= w]
    out = np.empty((*x.shape[:-2], len(rows), len(cols)))
    for a, top in enumerate(rows):
        for b, left in enumerate(cols):
            window = x[..., top : top + ph, left : left + pw].astype(np.float64)
            out[..., a, b] = window.max(axis=(-2, -1)) if kind == "max" else window.mean(axis=(-2, -1))
    return out


def pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return value if isinstance(value, tuple) else (value, value)


HW = [(1, 1), (5, 5), (7, 10), (16, 16), (9, 4), (33, 2)]
LEADING = [(), (3,), (2, 3)]
WINDOWS = [(1, None), (2, None), (3, None), ((2, 3), None), (2, 1), (3, 2), ((3, 2), (1, 2)), (4, 4), (5, 3)]


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint8])
@pytest.mark.parametrize(("size", "stride"), WINDOWS)
def test_matches_loop_reference(rng: np.random.Generator, kind: str, dtype: type, size, stride) -> None:
    checked = 0
    for hw in HW:
        for leading in LEADING:
            shape = (*leading, *hw)
            x = (rng.standard_normal(shape) * 50).astype(dtype)
            ph, pw = pair(size)
            if ph > hw[0] or pw > hw[1]:
                continue
            got = pool(x, size, stride=stride, kind=kind)
            expected = reference(x, pair(size), pair(stride or size), kind)
            assert got.shape == expected.shape == pool_shape(shape, size, stride)
            if kind == "max":
                assert got.dtype == x.dtype
                np.testing.assert_array_equal(got, expected)
            else:
                assert got.dtype == (np.float64 if dtype == np.float64 else np.float32)
                np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())
            checked += 1
    assert checked > 0


def test_hand_worked_example_and_ragged_edges_dropped() -> None:
    x = np.arange(16.0).reshape(4, 4)
    np.testing.assert_array_equal(pool(x, 2), [[5, 7], [13, 15]])
    np.testing.assert_array_equal(pool(x, 2, kind="avg"), [[2.5, 4.5], [10.5, 12.5]])
    five = np.arange(25.0).reshape(5, 5)  # last row and column belong to no full window
    np.testing.assert_array_equal(pool(five, 2), [[6, 8], [16, 18]])
    np.testing.assert_array_equal(pool(five, 3, stride=1), [[12, 13, 14], [17, 18, 19], [22, 23, 24]])


def test_feature_map_stack_strided_and_fresh(rng: np.random.Generator) -> None:
    stack = rng.standard_normal((8, 64, 96)).astype(np.float32)
    view = stack[:, ::2, 1::3]  # a strided input view
    got = pool(view, 3, stride=2, kind="avg")
    np.testing.assert_allclose(got, reference(view, (3, 3), (2, 2), "avg"), rtol=1e-6, atol=1e-6)
    assert not np.shares_memory(pool(stack, 1), stack)


@pytest.mark.parametrize("tile_bytes", [64, 700, 1 << 20])
@pytest.mark.parametrize("kind", ["max", "avg"])
def test_tiles_and_threads_give_the_same_bits(rng: np.random.Generator, monkeypatch, kind: str,
                                              tile_bytes: int) -> None:
    """Tiles of row bands (a map bigger than a tile) or of map groups, on 1-3 threads: the loop reference
    and, between thread counts, bitwise the same result."""
    from rmidl import pooling

    monkeypatch.setattr(pooling, "TILE_BYTES", tile_bytes)
    for shape, size, stride in [((5, 3, 37, 29), 2, None), ((2, 64, 50), (3, 2), (2, 1)), ((9, 9), 3, 1),
                                ((40, 12, 12), 2, None)]:
        x = rng.standard_normal(shape).astype(np.float32)
        results = [pool(x, size, stride=stride, kind=kind, threads=t) for t in (1, 2, 3, None)]
        expected = reference(x, pair(size), pair(stride or size), kind)
        np.testing.assert_allclose(results[0], expected, rtol=1e-6, atol=1e-6)
        for other in results[1:]:
            np.testing.assert_array_equal(other, results[0])


def test_no_maps_pool_to_no_maps() -> None:
    assert pool(np.zeros((0, 4, 10, 12), np.float32), 2).shape == (0, 4, 5, 6)
    out = np.empty((0, 4, 5, 6), np.float32)
    assert pool(np.zeros((0, 4, 10, 12), np.float32), 2, out=out, threads=2) is out


@pytest.mark.parametrize("threads", [1, 2])
def test_an_out_overlapping_the_input_gets_the_input_as_it_was(rng: np.random.Generator, monkeypatch,
                                                                threads: int) -> None:
    from rmidl import pooling

    monkeypatch.setattr(pooling, "TILE_BYTES", 512)  # many tiles: one would overwrite another's input
    x = rng.standard_normal((3, 40, 64)).astype(np.float32)
    expected = reference(x, (2, 2), (2, 2), "max")
    out = x[:, :20, :32]  # inside the input itself
    assert pool(x, 2, threads=threads, out=out) is out
    np.testing.assert_array_equal(out, expected)


def test_nan_propagates_in_max() -> None:
    x = np.zeros((4, 4), np.float32)
    x[0, 1] = np.nan
    got = pool(x, 2)
    assert np.isnan(got[0, 0]) and not np.isnan(got[1:, :]).any() and not np.isnan(got[0, 1])


x2 = np.zeros((6, 6), np.float32)

BAD = [
    ((x2, 0), {}, OptionError, "size=0"),
    ((x2, -2), {}, OptionError, "size=-2"),
    ((x2, 2.0), {}, OptionError, "size=2.0"),
    ((x2, True), {}, OptionError, "size=True"),
    ((x2, (2,)), {}, OptionError, r"size=\(2,\)"),
    ((x2, (2, 2, 2)), {}, OptionError, "size="),
    ((x2, 2), {"stride": 0}, OptionError, "stride=0"),
    ((x2, 2), {"stride": (1, "a")}, OptionError, "stride="),
    ((x2, 2), {"kind": "min"}, OptionError, "min"),
    ((x2, 7), {}, ShapeError, "7x7 does not fit input 6x6"),
    ((x2, (2, 7)), {}, ShapeError, "window 7x2 does not fit input 6x6"),  # W x H
    ((np.zeros(6), 2), {}, ShapeError, r"\(6,\)"),
    ((np.zeros((0, 4)), 1), {}, ShapeError, "4x0"),
    ((np.zeros((4, 4), bool), 2), {}, DTypeError, "bool"),
    ((np.zeros((4, 4), complex), 2), {"kind": "avg"}, DTypeError, "complex128"),
]


@pytest.mark.parametrize(("args", "kwargs", "error", "message"), BAD)
def test_bad_input(args: tuple, kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        pool(*args, **kwargs)
