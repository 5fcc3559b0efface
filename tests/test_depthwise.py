"""The depthwise FFT engine (each map with its own kernels, batched) against a float64 loop, and the
depthwise stages that use it: where they use it, with what bits, and what they keep."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_close, network_reference

import rmidl.kernels as engines
from rmidl.errors import OptionError
from rmidl.kernels import DepthwiseSpectra, _depthwise, correlate_depthwise_batch
from rmidl.network import Network, Stage


def depthwise_reference(maps: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Valid correlation of maps (N, C, H, W) with kernels (C * m, kh, kw) in float64, one tap at a time."""
    n, channels, h, w = maps.shape
    k, kh, kw = kernels.shape
    x, bank = maps.astype(np.float64), kernels.astype(np.float64)
    source = x[:, np.arange(k) // (k // channels)]  # (N, K, H, W): each output map's input map
    out = np.zeros((n, k, h - kh + 1, w - kw + 1))
    for a in range(kh):
        for b in range(kw):
            out += bank[None, :, a, b, None, None] * source[:, :, a : a + h - kh + 1, b : b + w - kw + 1]
    return out


@pytest.mark.parametrize("seed", range(30))
def test_random_depthwise_correlations_match_the_float64_loop(seed: int, monkeypatch) -> None:
    rng = np.random.default_rng(seed)
    if seed % 3 < 2:  # one map per chunk, or a few maps or images: chunks and short last ones exercised
        monkeypatch.setattr(_depthwise, "DEPTHWISE_TEMP_BYTES", [1, 150_000][seed % 3])
    n, channels, per_map = (int(v) for v in rng.integers(1, [5, 6, 4]))
    h, w = (int(v) for v in rng.integers(5, 41, size=2))
    kh, kw = int(rng.integers(1, min(h, 14) + 1)), int(rng.integers(1, min(w, 14) + 1))
    maps = rng.standard_normal((n, channels, h, w)).astype(np.float32)
    if seed % 2:  # 8-bit-like maps against zero-mean kernels: they must be centred to stay exact
        maps += 255.0
    kernels = rng.standard_normal((channels * per_map, kh, kw))
    kernels = (kernels - kernels.mean(axis=(1, 2), keepdims=True)).astype(np.float32)
    sides = rng.integers(0, 4, (2, 2)) * (seed % 4 != 0)
    padding = ((int(sides[0, 0]), int(sides[0, 1])), (int(sides[1, 0]), int(sides[1, 1])))
    padded = np.pad(maps, [(0, 0), (0, 0), *padding])  # the zeros a mode adds: never centred away
    out = np.empty((n, channels * per_map, padded.shape[2] - kh + 1, padded.shape[3] - kw + 1), np.float32)
    correlate_depthwise_batch(maps, kernels, out, padding=padding, threads=int(rng.integers(1, 3)))
    assert_close(out, depthwise_reference(padded, kernels))


def test_spectra_of_another_bank_are_refused(rng: np.random.Generator) -> None:
    kernels = rng.standard_normal((6, 5, 5)).astype(np.float32)
    maps = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    out = np.empty((1, 6, 8, 8), np.float32)
    for other in (DepthwiseSpectra(kernels + 1, 3, 1 << 20), DepthwiseSpectra(kernels, 2, 1 << 20)):
        with pytest.raises(OptionError, match="spectra are of a bank"):
            correlate_depthwise_batch(maps, kernels, out, spectra=other)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_stage_holds_no_more_than_a_worker_reserves_for_it(rng: np.random.Generator, threads: int) -> None:
    """n * peak_bytes + scratch_bytes is what a worker reserves for a task of n images: the engine's
    padded, centred maps and its temporaries must fit in it (tracemalloc sees numpy's buffers)."""
    import tracemalloc

    net = Network([Stage(rng.standard_normal((25, 11, 11)).astype(np.float32), depthwise=True, mode="same",
                         pool=None, activation=None)], channels=25)
    maps = (50.0 + rng.standard_normal((16, 25, 95, 95))).astype(np.float32)  # centred and padded
    net.forward_stages(maps[:1], 0, 1, threads=threads)  # plans and spectra: kept, not per call
    peaks = []
    for _ in range(3):  # tracemalloc counts every thread's allocations: the least of 3 runs is the call's
        tracemalloc.start()
        try:
            net.forward_stages(maps, 0, 1, threads=threads)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    peak = min(peaks)
    scratch = net.scratch_bytes(maps.shape[1:], threads, batch=16)
    reserved = 16 * net.peak_bytes(maps.shape[1:]) + scratch
    assert scratch > 0
    assert peak <= reserved - maps.nbytes, f"{peak / 2**20:.0f} MiB beyond the maps > {reserved / 2**20:.0f}"


def test_the_bits_do_not_depend_on_the_thread_count(rng: np.random.Generator) -> None:
    maps = (3.0 + rng.standard_normal((5, 4, 33, 29))).astype(np.float32)
    kernels = rng.standard_normal((8, 9, 7)).astype(np.float32)
    runs = []
    for threads in (1, 2, 3):
        out = np.empty((5, 8, 25, 23), np.float32)
        runs.append(correlate_depthwise_batch(maps, kernels, out, threads=threads))
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])


def test_spectra_are_kept_per_fft_size_within_their_bound(rng: np.random.Generator, monkeypatch) -> None:
    made: list[tuple[int, int]] = []
    real = _depthwise._spectra
    monkeypatch.setattr(_depthwise, "_spectra", lambda k, m, shape: made.append(shape) or real(k, m, shape))
    kernels = rng.standard_normal((6, 5, 5)).astype(np.float32)
    kept = DepthwiseSpectra(kernels, 3, max_bytes=1 << 20)
    for hw in ((20, 20), (20, 20), (31, 24), (20, 20)):
        maps = rng.standard_normal((2, 3, *hw)).astype(np.float32)
        out = np.empty((2, 6, hw[0] - 4, hw[1] - 4), np.float32)
        assert_close(correlate_depthwise_batch(maps, kernels, out, spectra=kept),
                     depthwise_reference(maps, kernels))
    assert made == [(20, 20), (32, 24)] and 0 < kept.nbytes <= 1 << 20
    nothing = DepthwiseSpectra(kernels, 3, max_bytes=0)  # too small for any: made per call, never kept
    maps = rng.standard_normal((2, 3, 31, 24)).astype(np.float32)
    for _ in range(2):
        correlate_depthwise_batch(maps, kernels, np.empty((2, 6, 27, 20), np.float32), spectra=nothing)
    assert made[2:] == [(32, 24), (32, 24)] and nothing.nbytes == 0


@pytest.mark.parametrize("mode", ["valid", "same", "full"])
def test_a_depthwise_stage_uses_the_engine_where_it_pays(rng, monkeypatch, mode) -> None:
    calls: list[tuple[int, ...]] = []
    real = engines.correlate_depthwise_batch

    def spy(maps: np.ndarray, *args: object, **kwargs: object) -> np.ndarray:
        calls.append(maps.shape)
        return real(maps, *args, **kwargs)

    from rmidl.network import _stage

    monkeypatch.setattr(_stage, "correlate_depthwise_batch", spy)
    big = Stage(rng.standard_normal((6, 11, 11)).astype(np.float32), depthwise=True, mode=mode)
    small = Stage(rng.standard_normal((6, 3, 3)).astype(np.float32), depthwise=True, mode=mode)
    images = (20.0 + rng.standard_normal((3, 80, 90, 3))).astype(np.float32)
    # on one thread the small kernels keep their per-map calls (lowering or direct); on two, the engine
    for stage, threads, used in ((big, 1, True), (small, 1, False), (small, 2, True)):
        net = Network([stage], channels=3)
        features = net.forward_batch(images, threads=threads)
        assert bool(calls) is used
        calls.clear()
        for image, row in zip(images, features, strict=True):
            assert_close(row, network_reference(net, image))
    assert big.kept_bytes > 0  # the bank's spectra, counted where a worker keeps the network


@pytest.mark.parametrize("threads", [1, 2])
def test_the_paper_network_takes_its_depthwise_stages_through_the_engine(monkeypatch, threads) -> None:
    """seed004's CNP1 has one input map (one engine call either way); CNP2 (25 maps of 95x95, 11x11
    kernels) would pick fft per map; CNP3-4 are small maps, where per-map calls cost most."""
    used: list[bool] = []
    real = Stage._depthwise_by_fft
    monkeypatch.setattr(Stage, "_depthwise_by_fft",
                        lambda self, shape, count: used.append(real(self, shape, count)) or used[-1])
    net = Network.from_spec("seed004")
    images = np.random.default_rng(0).random((2, 200, 200), dtype=np.float32)
    features = net.forward_batch(images, threads=threads)
    assert used == [False, True, True, True]
    for image, row in zip(images, features, strict=True):
        assert_close(row, network_reference(net, image))


def test_big_maps_with_small_kernels_keep_their_per_map_calls_on_one_thread(rng) -> None:
    """24 maps of 200x200 and 3x3 kernels: the per-map calls pick lowering or direct and are as fast as the
    engine on one thread (24.7 ms against 25.0); on two they contend and the engine is twice as fast."""
    stage = Stage(rng.standard_normal((24, 3, 3)).astype(np.float32), depthwise=True)
    assert not stage._depthwise_by_fft((4, 24, 200, 200), 1)
    assert stage._depthwise_by_fft((4, 24, 200, 200), 2)
    assert not stage._depthwise_by_fft((4, 1, 200, 200), 2)  # one input map: one call either way


def test_a_network_limited_to_no_kept_spectra_keeps_none_and_computes_the_same(rng) -> None:
    images = rng.random((2, 200, 200), dtype=np.float32)
    spec = "6x11x11:relu:max2,6x11x11:relu:max2:dw"  # fft for both; maps of 95x95: the depthwise engine
    free, limited = Network.from_spec(spec), Network.from_spec(spec)
    limited.limit_kept(0)
    np.testing.assert_array_equal(limited.forward_batch(images), free.forward_batch(images))
    assert free.kept_bytes > 0 and limited.kept_bytes == 0


def test_the_paper_network_gives_the_same_bits_at_any_thread_count() -> None:
    """Its block-diagonal stages (CNP3-4) used to change bits above 2 threads; the engine's do not."""
    net = Network.from_spec("seed004")
    images = np.random.default_rng(1).random((6, 200, 200), dtype=np.float32)
    one = net.forward_batch(images, threads=1)
    for threads in (2, 3, 5, 8):
        np.testing.assert_array_equal(net.forward_batch(images, threads=threads), one)
