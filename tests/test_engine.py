"""The convolution engines against a float64 scipy reference: random shapes, every mode, engine and dtype."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from reference import assert_close, reference
from threadpoolctl import threadpool_info

import rmidl
from rmidl import kernels as engines
from rmidl.kernels._threads import POOL_THREADS, blas_pinned, run_tiles

MODES = ("valid", "same", "full")


def random_cases(count: int, seed: int) -> list[tuple[tuple[int, int, int], tuple[int, int], int]]:
    """Sampled (image HWC, kernel hw, K): kernels from 1x1 to the image size, odd/even/non-square."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        h, w = (int(x) for x in rng.integers(1, 23, size=2))
        channels = int(rng.choice([1, 3]))
        kh, kw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        k = int(rng.choice([1, 2, 3, 8, 33, 130]))
        cases.append(((h, w, channels), (kh, kw), k))
    # Edge shapes the sampler may miss: kernel = image, 1xN and Nx1 kernels, a single pixel, wide banks.
    cases += [((7, 5, 1), (7, 5), 130), ((1, 9, 3), (1, 4), 2), ((9, 1, 1), (3, 1), 5),
              ((1, 1, 1), (1, 1), 1), ((16, 16, 3), (16, 1), 64), ((6, 11, 3), (2, 2), 129)]
    return cases


@pytest.mark.parametrize("case", random_cases(36, seed=2026), ids=str)
def test_every_engine_and_mode_matches_scipy(case) -> None:
    hwc, khw, k = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    image = rng.standard_normal(hwc).astype(np.float32)
    bank = rng.standard_normal((k, *khw, hwc[2])).astype(np.float32)
    for i, mode in enumerate(MODES):
        want = reference(image, bank, mode)
        want_flipped = reference(image, bank, mode, flip=True)
        for j, engine in enumerate(("auto", *engines.ENGINES)):
            threads = 1 + (i + j) % 2  # alternate 1 and 2 threads across the mode x engine grid
            assert_close(rmidl.correlate(image, bank, mode=mode, engine=engine, threads=threads), want)
            assert_close(rmidl.convolve(image, bank, mode=mode, engine=engine, threads=threads),
                         want_flipped)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [((45, 31, 3), (5, 4), 11), ((64, 40, 1), (9, 9), 6),
                                  ((30, 17, 1), (1, 1), 3), ((64, 40, 3), (3, 2), 5)], ids=str)
def test_tiled_and_chunked_paths_match_scipy(case, engine, threads) -> None:
    hwc, khw, k = case
    rng = np.random.default_rng(7)
    image = rng.standard_normal(hwc).astype(np.float32)
    bank = rng.standard_normal((k, *khw, hwc[2])).astype(np.float32)
    for mode in MODES:
        assert_close(rmidl.correlate(image, bank, mode=mode, engine=engine, threads=threads),
                     reference(image, bank, mode))


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_float64_in_float64_out_and_integers_convert(rng, engine) -> None:
    image = rng.standard_normal((19, 23, 3))
    bank = rng.standard_normal((5, 4, 6, 3))
    got = rmidl.correlate(image, bank, mode="same", engine=engine)
    assert got.dtype == np.float64
    assert_close(got, reference(image, bank, "same"))
    pixels = rng.integers(0, 256, (12, 10), dtype=np.uint8)
    ints = rng.integers(-3, 4, (2, 3, 3), dtype=np.int16)
    got = rmidl.correlate(pixels, ints, engine=engine)
    assert got.dtype == np.float32
    if engine == "fft":
        assert_close(got, reference(pixels, ints, "valid"))
    else:  # small integers: every partial sum is exact in float32, whatever the order of summation
        np.testing.assert_array_equal(got, reference(pixels, ints, "valid"))
    assert rmidl.correlate(image, bank.astype(np.float32), engine=engine).dtype == np.float32


# Hand-worked: S[i, j] = sum_a sum_b I[i + a, j + b] K[a, b] (valid), zero padding otherwise.
HAND_IMAGE = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], np.float32)
HAND_CASES = [
    ("valid", [[1, 0], [0, -1]], False, [[-4, -4], [-4, -4]]),
    ("valid", [[1, 1, 1]], False, [[6], [15], [24]]),
    ("full", [[1, 2]], False, [[2, 5, 8, 3], [8, 14, 17, 6], [14, 23, 26, 9]]),
    ("same", [[1, 2]], False, [[2, 5, 8], [8, 14, 17], [14, 23, 26]]),
    ("full", [[1, 2]], True, [[1, 4, 7, 6], [4, 13, 16, 12], [7, 22, 25, 18]]),
    ("valid", [[0, 0, 0], [0, 1, 0], [0, 0, 0]], True, [[5]]),
    ("same", [[2]], True, [[2, 4, 6], [8, 10, 12], [14, 16, 18]]),
]


@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize(("mode", "kernel", "flip", "expected"), HAND_CASES)
def test_hand_worked_examples(mode, kernel, flip, expected, engine) -> None:
    fn = rmidl.convolve if flip else rmidl.correlate
    got = fn(HAND_IMAGE, np.array(kernel, np.float32), mode=mode, engine=engine)
    np.testing.assert_allclose(got, np.array([expected], np.float32), rtol=0, atol=1e-5)


def test_channels_are_summed_by_hand() -> None:
    image = np.stack([np.ones((2, 3)), np.full((2, 3), 2.0)], axis=-1)
    kernels = np.array([[[[3.0, 4.0]]], [[[1.0, -1.0]]]])  # two 1x1 kernels over 2 channels
    for engine in engines.ENGINES:
        got = rmidl.correlate(image, kernels, engine=engine)
        np.testing.assert_array_equal(got, [np.full((2, 3), 11.0), np.full((2, 3), -1.0)])


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_out_view_of_a_larger_output_is_written_in_place(rng, engine) -> None:
    """The worker's shared-memory path: a task writes big[k0:k1, r0:r1, :] of the whole job's output."""
    image = rng.standard_normal((40, 33, 3)).astype(np.float32)
    bank = rng.standard_normal((9, 5, 4, 3)).astype(np.float32)
    want = reference(image, bank, "valid")
    big = np.full(want.shape, -7.0, np.float32)
    (k0, k1), (r0, r1) = (2, 7), (10, 25)
    view = big[k0:k1, r0:r1, :]
    band = np.ascontiguousarray(image[r0 : r1 + bank.shape[1] - 1])
    assert engines.correlate_valid(band, np.ascontiguousarray(bank[k0:k1]), view, threads=2,
                                   engine=engine) is view
    assert_close(big[k0:k1, r0:r1], want[k0:k1, r0:r1])
    untouched = np.ones(want.shape, bool)
    untouched[k0:k1, r0:r1] = False
    assert (big[untouched] == -7.0).all()


def test_out_buffers_of_any_layout(rng) -> None:
    image = rng.standard_normal((20, 24)).astype(np.float32)
    bank = rng.standard_normal((4, 3, 5)).astype(np.float32)
    want = reference(image, bank, "full")
    out = np.empty(want.shape, np.float32)
    assert rmidl.correlate(image, bank, mode="full", out=out) is out
    assert_close(out, want)
    # Not row-contiguous (every other column of a wider buffer): computed aside, then copied in.
    wide = np.zeros((*want.shape[:2], 2 * want.shape[2]), np.float32)
    strided = wide[:, :, ::2]
    assert rmidl.correlate(image, bank, mode="full", out=strided) is strided
    assert_close(strided, want)
    assert (wide[:, :, 1::2] == 0).all()


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_out_overlapping_the_image_gets_the_right_result(rng, engine) -> None:
    """`out` whose first map is the image itself: the engines must not read rows they already wrote."""
    buffer = rng.standard_normal((3, 12, 9)).astype(np.float32)
    bank = rng.standard_normal((3, 1, 1)).astype(np.float32)
    want = reference(buffer[0], bank, "valid")
    assert rmidl.correlate(buffer[0], bank, engine=engine, threads=2, out=buffer) is buffer
    assert_close(buffer, want)

def test_threads_none_uses_every_core_and_matches(rng) -> None:
    image = rng.standard_normal((50, 60)).astype(np.float32)
    bank = rng.standard_normal((6, 7, 7)).astype(np.float32)
    assert_close(rmidl.correlate(image, bank, threads=None), reference(image, bank, "valid"))
    assert engines.available_cores() >= 1


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_concurrent_calls_share_one_blas_pin(rng) -> None:
    """Several correlate calls in one process at once: all exact, BLAS pinned meanwhile, restored after."""
    before = blas_threads()
    image = rng.standard_normal((60, 70, 3)).astype(np.float32)
    bank = rng.standard_normal((16, 5, 5, 3)).astype(np.float32)
    want = reference(image, bank, "same")
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def call(i: int) -> None:
        try:
            start.wait(timeout=30)
            for _ in range(3):
                results[i] = rmidl.correlate(image, bank, mode="same", threads=2, engine="lowering")
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors and len(results) == 4
    for got in results.values():
        assert_close(got, want)
    assert blas_threads() == before


def test_blas_pin_nests_and_restores() -> None:
    before = blas_threads()
    with blas_pinned():
        assert set(blas_threads()) == {1}
        with blas_pinned():
            assert set(blas_threads()) == {1}
        assert set(blas_threads()) == {1}
    assert blas_threads() == before


def test_auto_cost_model_picks_by_shape() -> None:
    reference_job = ((720, 1280), (128, 11, 11, 1))
    assert engines.choose_engine(*reference_job, 2) == "lowering"
    assert engines.choose_engine((720, 1280), (128, 41, 41, 1), 2) == "fft"
    assert engines.choose_engine((720, 1280), (64, 1, 1, 1), 2) == "direct"
    assert set(engines.ENGINES) >= {engines.choose_engine((h, h), (k, s, s), t)
                                    for h in (8, 300) for k in (1, 130) for s in (1, 3, 8) for t in (1, 2)}
    # Work grows with the bank; a faster machine finishes sooner.
    small = engines.estimate_seconds(reference_job[0], (8, 11, 11, 1), 2)
    large = engines.estimate_seconds(*reference_job, 2)
    assert 0 < small < large
    assert engines.estimate_seconds(*reference_job, 2, gflops=200) < engines.estimate_seconds(
        *reference_job, 2, gflops=20)


@pytest.mark.parametrize(("image_hw", "kernel_shape"),
                         [((5, 5), (1, 6, 6, 1)), ((0, 5), (1, 1, 1)), ((4, 4), (2, 1, 5))])
def test_cost_model_of_an_empty_output_costs_less_than_one_pixel(image_hw, kernel_shape) -> None:
    """A kernel that does not fit leaves nothing to compute; the model must say so, not divide by zero."""
    assert engines.choose_engine(image_hw, kernel_shape, 2) in engines.ENGINES
    one_pixel = engines.estimate_seconds((1, 1), (1, 1, 1, 1), 2)
    assert 0 < engines.estimate_seconds(image_hw, kernel_shape, 2) < one_pixel


def test_measure_gflops_is_quick_and_positive() -> None:
    rate = engines.measure_gflops(threads=1)
    assert 0.1 < rate < 10_000


@pytest.mark.parametrize("threads", [1, 2])
def test_a_failing_tile_fails_the_call_and_stops_the_rest(threads) -> None:
    done: list[int] = []

    def work(tile: int, scratch: object) -> None:
        if tile == 3:
            raise ZeroDivisionError(f"tile {tile}")
        done.append(tile)

    with pytest.raises(ZeroDivisionError, match="tile 3"):
        run_tiles(list(range(1000)), work, lambda: None, threads)
    assert 3 not in done and len(done) < 999


def test_tiles_run_on_shared_helpers_every_tile_once_nested_and_concurrent() -> None:
    """Helper threads are made once for the process, not per call; a call inside a tile (or many calls
    at once, more than there are helpers) still runs every tile exactly once and returns."""
    seen: list[tuple[str, int]] = []
    lock = threading.Lock()

    def inner(tile: int, scratch: object) -> None:
        with lock:
            seen.append(("inner", tile))

    def outer(tile: int, scratch: object) -> None:
        run_tiles(list(range(4)), inner, lambda: None, 3)
        with lock:
            seen.append(("outer", tile))

    run_tiles(list(range(8)), outer, lambda: None, 2)  # the helpers exist from here on
    before = threading.active_count()
    seen.clear()
    callers = [threading.Thread(target=run_tiles, args=(list(range(8)), outer, lambda: None, 4))
               for _ in range(20)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(60)
    assert not any(caller.is_alive() for caller in callers)
    expected = [("outer", t) for t in range(8)] * 20 + [("inner", t) for t in range(4)] * 160
    assert sorted(seen) == sorted(expected)
    assert threading.active_count() <= before + POOL_THREADS  # helpers are bounded, whoever calls


def test_correlate_valid_refuses_an_unknown_engine() -> None:
    out = np.empty((1, 2, 2), np.float32)
    with pytest.raises(rmidl.OptionError, match="'gpu'"):
        engines.correlate_valid(np.ones((3, 3, 1), np.float32), np.ones((1, 2, 2, 1), np.float32), out,
                                engine="gpu")


@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("offset", [255.0, 1e4])
def test_large_offset_against_zero_mean_kernels_stays_exact(rng, engine, offset) -> None:
    """8-bit-like pixels (or worse) with edge/Gabor-like zero-mean kernels: float32 sums would cancel."""
    image = (offset + rng.standard_normal((40, 50, 3))).astype(np.float32)
    bank = rng.standard_normal((3, 13, 13, 3))
    bank = (bank - bank.mean(axis=(1, 2, 3), keepdims=True)).astype(np.float32)
    for mode in MODES:
        assert_close(rmidl.correlate(image, bank, mode=mode, engine=engine), reference(image, bank, mode))
