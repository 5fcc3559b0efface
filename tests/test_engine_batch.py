"""Batches of images (N, H, W[, C]) through every engine against the float64 scipy reference, their errors,
out= rules, and the worker's entry point with cached kernel spectra."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_close, batch_reference

import rmidl
from rmidl import errors
from rmidl import kernels as engines
from rmidl.kernels import KernelSpectra, correlate_valid_batch
from rmidl.validate import MODES


def batch_cases(count: int, seed: int) -> list[tuple[int, tuple[int, int, int], tuple[int, int], int]]:
    """Sampled (N, image HWC, kernel hw, K): channels 1..64, odd/even/non-square kernels, batches 1..6."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(count):
        n = int(rng.integers(1, 7))
        h, w = (int(x) for x in rng.integers(3, 21, size=2))
        channels = int(rng.choice([1, 2, 3, 5, 8, 25]))
        kh, kw = int(rng.integers(1, min(h, 9) + 1)), int(rng.integers(1, min(w, 9) + 1))
        k = int(rng.choice([1, 3, 8, 25] if channels <= 3 else [1, 3, 5]))  # the reference is per channel
        cases.append((n, (h, w, channels), (kh, kw), k))
    # Edge shapes: 64 channels, one image, a kernel as large as the image, 1xN and Nx1, an even square.
    cases += [(2, (9, 10, 64), (3, 3), 4), (1, (12, 12, 25), (11, 11), 25), (3, (7, 5, 3), (7, 5), 2),
              (4, (16, 9, 8), (1, 6), 3), (5, (11, 13, 2), (6, 1), 9), (2, (15, 15, 4), (4, 4), 8)]
    return cases


@pytest.mark.parametrize("case", batch_cases(24, seed=14), ids=str)
def test_every_engine_and_mode_matches_scipy_on_batches(case) -> None:
    n, hwc, khw, k = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    images = rng.standard_normal((n, *hwc)).astype(np.float32)
    bank = rng.standard_normal((k, *khw, hwc[2])).astype(np.float32)
    for i, mode in enumerate(MODES):
        want = batch_reference(images, bank, mode)
        want_flipped = batch_reference(images, bank, mode, flip=True)
        for j, engine in enumerate(("auto", *engines.ENGINES)):
            if engine == "direct" and bank.size > 4000:
                continue  # a numpy pass per tap and kernel: seconds on the largest banks, covered below
            threads = 1 + (i + j) % 2  # alternate 1 and 2 threads across the mode x engine grid
            got = rmidl.correlate(images, bank, batch=True, mode=mode, engine=engine, threads=threads)
            assert got.shape == want.shape
            assert_close(got, want)
            assert_close(rmidl.convolve(images, bank, batch=True, mode=mode, engine=engine,
                                        threads=3 - threads), want_flipped)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("engine", engines.ENGINES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", [(5, (23, 17, 3), (5, 4), 7), (3, (40, 12, 1), (9, 9), 5),
                                  (7, (9, 8, 8), (3, 2), 9)], ids=str)
def test_tiled_grouped_and_chunked_batches_match_scipy(case, engine, threads) -> None:
    n, hwc, khw, k = case
    rng = np.random.default_rng(3)
    images = rng.standard_normal((n, *hwc)).astype(np.float32)
    bank = rng.standard_normal((k, *khw, hwc[2])).astype(np.float32)
    for mode in MODES:
        assert_close(rmidl.correlate(images, bank, batch=True, mode=mode, engine=engine, threads=threads),
                     batch_reference(images, bank, mode))


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_float64_batches_stay_float64(rng, engine) -> None:
    images = rng.standard_normal((3, 14, 12, 5))
    bank = rng.standard_normal((4, 5, 3, 5))
    got = rmidl.correlate(images, bank, batch=True, mode="full", engine=engine, threads=2)
    assert got.dtype == np.float64
    assert_close(got, batch_reference(images, bank, "full"))
    # (N, H, W) is a batch of single-channel images; integers convert to float32.
    pixels = rng.integers(0, 256, (4, 10, 9), dtype=np.uint8)
    got = rmidl.correlate(pixels, bank[:, :, :, 0], batch=True, engine=engine)
    assert got.dtype == np.float32 and got.shape == (4, 4, 6, 7)
    assert_close(got, batch_reference(pixels, bank[:, :, :, 0], "valid"))


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_large_offsets_are_removed_per_image(rng, engine) -> None:
    """One 8-bit-like image beside zero-mean ones, zero-mean kernels: each image gets its own centring."""
    images = rng.standard_normal((4, 30, 26, 3))
    images[1] += 255.0
    images[3] += 1e4
    images = images.astype(np.float32)
    bank = rng.standard_normal((5, 9, 9, 3))
    bank = (bank - bank.mean(axis=(1, 2, 3), keepdims=True)).astype(np.float32)
    for mode in MODES:
        assert_close(rmidl.correlate(images, bank, batch=True, mode=mode, engine=engine),
                     batch_reference(images, bank, mode))


def test_centring_of_a_large_batch_runs_in_slices(rng, monkeypatch) -> None:
    monkeypatch.setattr(engines, "CENTRED_BYTES", 3000)  # ~2 images of 16x20x1 float32 per slice
    images = (100.0 + rng.standard_normal((7, 16, 20))).astype(np.float32)
    bank = rng.standard_normal((3, 5, 5)).astype(np.float32)
    assert_close(rmidl.correlate(images, bank, batch=True), batch_reference(images, bank, "valid"))


@pytest.mark.parametrize("tile_bytes", [96, 700, 5000, 1 << 20])  # rows, maps, images, one call
def test_the_centring_bias_is_added_in_tiles_on_several_threads(rng, monkeypatch, tile_bytes) -> None:
    monkeypatch.setattr(engines, "BIAS_TILE_BYTES", tile_bytes)
    images = (200.0 + rng.standard_normal((3, 14, 17, 2))).astype(np.float32)
    bank = rng.standard_normal((4, 3, 5, 2)).astype(np.float32)
    assert_close(rmidl.correlate(images, bank, batch=True, threads=2), batch_reference(images, bank, "valid"))


def test_an_empty_batch_gives_an_empty_result() -> None:
    got = rmidl.correlate(np.ones((0, 8, 9, 2)), np.ones((3, 2, 2, 2), np.float32), batch=True, mode="same")
    assert got.shape == (0, 3, 8, 9) and got.dtype == np.float32


BATCH_ERRORS = [
    ("2-D images with batch", np.ones((8, 9)), np.ones((2, 3, 3)), errors.ShapeError,
     r"\(N, H, W\).*\(8, 9\)"),
    ("5-D images with batch", np.ones((2, 3, 8, 9, 1)), np.ones((2, 3, 3)), errors.ShapeError,
     "batch=True images must be"),
    ("channel mismatch", np.ones((2, 8, 9, 3)), np.ones((2, 3, 3, 2)), errors.ShapeError,
     "2 channel.* images have 3"),
    ("empty images", np.ones((2, 0, 9)), np.ones((2, 3, 3)), errors.ShapeError,
     r"empty: shape \(2, 0, 9, 1\)"),
    ("kernel too large", np.ones((2, 8, 9)), np.ones((1, 9, 3)), errors.KernelTooLarge,
     "kernel 3x9 does not fit images 9x8"),  # W x H
    ("NaN in a batch", np.where(np.eye(9)[None, :8] > 0, np.nan, 1.0).repeat(2, 0), np.ones((1, 3, 3)),
     errors.NonFiniteInput, r"images contains NaN \(first at index \(0, 0, 0, 0\)\)"),
    ("complex images", np.ones((2, 8, 9), complex), np.ones((1, 3, 3)), errors.DTypeError, "images dtype"),
]


@pytest.mark.parametrize(("name", "images", "bank", "error", "match"), BATCH_ERRORS,
                         ids=[case[0] for case in BATCH_ERRORS])
def test_bad_batches_are_refused_with_a_clear_message(name, images, bank, error, match) -> None:
    with pytest.raises(error, match=match):
        rmidl.correlate(images, bank, batch=True)


def test_a_stack_without_batch_true_points_at_batch_true() -> None:
    # (8, 64, 80) with a 1-channel bank reads as one 64x8 image (WxH) of 80 channels: say what was meant.
    with pytest.raises(errors.ShapeError,
                       match=r"1 channel.*has 80; did you mean batch=True \(8 images of 80x64\)"):
        rmidl.correlate(np.ones((8, 64, 80)), np.ones((2, 3, 3)))
    with pytest.raises(errors.ShapeError, match=r"got shape \(8, 64, 80, 3\); did you mean batch=True"):
        rmidl.convolve(np.ones((8, 64, 80, 3)), np.ones((2, 3, 3, 3)))
    # A real channel mismatch of a colour bank gets no such hint (batch=True could not fix it).
    with pytest.raises(errors.ShapeError, match=r"^kernels have 2 channel\(s\) but the image has 3$"):
        rmidl.correlate(np.ones((8, 9, 3)), np.ones((2, 3, 3, 2)))
    with pytest.raises(errors.OptionError, match="batch='yes' must be True or False"):
        rmidl.correlate(np.ones((2, 8, 9)), np.ones((2, 3, 3)), batch="yes")


def test_batch_out_rules(rng) -> None:
    images = rng.standard_normal((3, 12, 10, 2)).astype(np.float32)
    bank = rng.standard_normal((4, 3, 5, 2)).astype(np.float32)
    want = batch_reference(images, bank, "same")
    out = np.empty(want.shape, np.float32)
    assert rmidl.correlate(images, bank, batch=True, mode="same", out=out) is out
    assert_close(out, want)
    # Maps of a larger buffer (any stride between maps and images) are written in place; strided rows
    # (every other column) are computed aside and copied in.
    big = np.full((3, 6, 12, 10), -7.0, np.float32)
    view = big[:, 1:5]
    assert rmidl.correlate(images, bank, batch=True, mode="same", out=view, threads=2) is view
    assert_close(view, want)
    assert (big[:, [0, 5]] == -7.0).all()
    wide = np.zeros((*want.shape[:3], 20), np.float32)
    strided = wide[..., ::2]
    assert rmidl.correlate(images, bank, batch=True, mode="same", out=strided) is strided
    assert_close(strided, want)
    assert (wide[..., 1::2] == 0).all()
    for bad, error, match in [
        (np.empty((3, 4, 12, 9), np.float32), errors.ShapeError, r"\(3, 4, 12, 9\).*\(3, 4, 12, 10\)"),
        (np.empty(want.shape[1:], np.float32), errors.ShapeError, "needs"),
        (np.empty(want.shape, np.float64), errors.DTypeError, "float64"),
        (np.empty(want.shape, np.float32).tolist(), errors.OptionError, "numpy array"),
    ]:
        with pytest.raises(error, match=match):
            rmidl.correlate(images, bank, batch=True, mode="same", out=bad)
    frozen = np.empty(want.shape, np.float32)
    frozen.flags.writeable = False
    with pytest.raises(errors.OptionError, match="read-only"):
        rmidl.correlate(images, bank, batch=True, mode="same", out=frozen)


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_out_overlapping_the_images_gets_the_right_result(rng, engine) -> None:
    buffer = rng.standard_normal((2, 3, 12, 9)).astype(np.float32)
    images = buffer[:, 0]  # the first map of each image's output is the image itself
    bank = rng.standard_normal((3, 1, 1)).astype(np.float32)
    want = batch_reference(images, bank, "valid")
    assert rmidl.correlate(images, bank, batch=True, engine=engine, threads=2, out=buffer) is buffer
    assert_close(buffer, want)


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_worker_entry_point_with_cached_spectra(rng, engine) -> None:
    """correlate_valid_batch on canonical arrays: kernel groups of a bank, spectra from the bank's cache."""
    images = rng.standard_normal((4, 20, 18, 3)).astype(np.float32)
    bank = rng.standard_normal((10, 5, 4, 3)).astype(np.float32)
    want = batch_reference(images, bank, "valid")
    spectra = KernelSpectra(bank)
    out = np.empty(want.shape, np.float32)
    for k0, k1 in [(0, 10), (2, 7), (7, 10)]:
        group = np.ascontiguousarray(bank[k0:k1])
        part = out[:, k0:k1]
        assert correlate_valid_batch(images, group, part, threads=2, engine=engine,
                                     spectra=spectra.select(k0, k1)) is part
    assert_close(out, want)
    if engine == "fft":
        assert spectra.nbytes > 0  # one FFT size, cached once for every kernel group
        held = spectra.nbytes
        correlate_valid_batch(images[:2], bank, out[:2], engine="fft", spectra=spectra)
        assert spectra.nbytes == held
        assert_close(out, want)


def test_spectra_of_another_bank_are_refused(rng) -> None:
    bank = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    spectra = KernelSpectra(bank)
    out = np.empty((1, 2, 6, 6), np.float32)
    with pytest.raises(errors.OptionError, match="spectra are of a bank"):
        correlate_valid_batch(np.ones((1, 8, 8, 2), np.float32), bank[:2] + 1, out, engine="fft",
                              spectra=spectra.select(0, 2))
    # Another kernel group of the same bank (a view of the same memory, of the same shape) is refused too.
    with pytest.raises(errors.OptionError, match="spectra are of a bank"):
        correlate_valid_batch(np.ones((1, 8, 8, 2), np.float32), bank[1:3], out, engine="fft",
                              spectra=spectra.select(0, 2))
    with pytest.raises(errors.OptionError, match=r"kernels \[3, 5\) are not in a bank of 4"):
        spectra.select(3, 5)


def test_spectra_cache_is_bounded_and_evicts_the_oldest_size(rng) -> None:
    bank = rng.standard_normal((3, 3, 3, 2)).astype(np.float32)
    tiny = KernelSpectra(bank, max_bytes=100)  # too small for any size: computed aside every time
    out = np.empty((2, 3, 10, 10), np.float32)
    images = rng.standard_normal((2, 12, 12, 2)).astype(np.float32)
    correlate_valid_batch(images, bank, out, engine="fft", spectra=tiny)
    assert tiny.nbytes == 0
    assert_close(out, batch_reference(images, bank, "valid"))
    one_size = 3 * 2 * 12 * 7 * 8  # K * C * fh * (fw // 2 + 1) complex64 for 12x12 images
    spectra = KernelSpectra(bank, max_bytes=one_size + 10)
    spectra.chunk((12, 12), 0, 3)
    assert spectra.nbytes == one_size
    spectra.chunk((10, 10), 0, 3)  # a second size pushes the first one out
    assert 0 < spectra.nbytes < one_size


def test_auto_picks_fft_for_multichannel_layers_and_keeps_lowering_for_the_reference_job() -> None:
    layer = ((95, 95), (25, 11, 11, 25))
    for threads in (1, 2):
        assert engines.choose_engine(*layer, threads, batch=48) == "fft"
        assert engines.choose_engine((720, 1280), (128, 11, 11, 1), threads) == "lowering"
        # Small kernels over few channels: the column matrix is cheap, FFT's transforms per map are not.
        assert engines.choose_engine((42, 42), (25, 3, 3, 3), threads, batch=32) == "lowering"
    # A batch costs more than one image, and less than that many single calls (shared overheads).
    one = engines.estimate_seconds(*layer, 2, batch=1)
    many = engines.estimate_seconds(*layer, 2, batch=48)
    assert one < many < 48 * one


@pytest.mark.parametrize("engine", engines.ENGINES)
def test_cost_terms_grow_with_the_batch_and_vanish_for_an_empty_output(engine) -> None:
    small = engines.engine_seconds(engine, (42, 42), (8, 5, 5, 3), 1, batch=2)
    large = engines.engine_seconds(engine, (42, 42), (8, 5, 5, 3), 1, batch=20)
    assert 0 < small < large
    from rmidl.kernels._cost import work_terms

    assert work_terms(engine, (4, 4), (2, 5, 5, 3), 7) == {}


@pytest.mark.parametrize("threads", [1, 2])
def test_fft_temporaries_stay_within_the_budget(rng, monkeypatch, threads) -> None:
    """Spectra of every image and kernel would take ~28 MiB here; the plan must keep within 4 MiB."""
    import tracemalloc

    from rmidl.kernels import _fft

    monkeypatch.setattr(_fft, "TEMP_BYTES", 4 << 20)
    images = rng.standard_normal((24, 64, 64, 16)).astype(np.float32)
    bank = rng.standard_normal((32, 7, 7, 16)).astype(np.float32)
    out = np.empty((24, 32, 58, 58), np.float32)
    correlate_valid_batch(images[:1], bank[:1], out[:1, :1], engine="fft")  # imports, FFT plans: not ours
    peaks = []
    for _ in range(3):  # tracemalloc counts every thread's allocations: the least of 3 runs is the call's
        tracemalloc.start()
        try:
            correlate_valid_batch(images, bank, out, threads=threads, engine="fft")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    peak = min(peaks)
    assert peak <= 1.25 * (4 << 20), f"peak temporaries {peak / 2**20:.1f} MiB (runs: {peaks})"
    assert_close(out[::5, ::7], batch_reference(images[::5], bank[::7], "valid"))


def test_nominal_rate_is_what_the_constants_imply() -> None:
    """engine_seconds rescales by measured_gflops / NOMINAL_GFLOPS: the two must describe one machine."""
    from rmidl.kernels import _cost

    seconds = _cost.engine_seconds("lowering", (720, 1280), (128, 11, 11, 1), 1) - _cost._CALL_SECONDS
    implied = 2 * 128 * 121 * 710 * 1270 / seconds / 1e9
    assert implied == pytest.approx(_cost.NOMINAL_GFLOPS, rel=0.01)


def test_rmidl_correlate_keeps_a_banks_spectra_for_the_next_call(rng, spectra_made) -> None:
    """A bank whose spectra fit one chunk is transformed once per FFT size in this process; the bits of
    the next call are those of the first, and a bank changed in place is a new bank."""
    images = rng.standard_normal((6, 30, 30, 4)).astype(np.float32)
    bank = rng.standard_normal((5, 7, 7, 4)).astype(np.float32)
    first = rmidl.correlate(images, bank, batch=True, engine="fft")
    made = len(spectra_made)
    assert made >= 1
    again = rmidl.correlate(images + 0, bank.copy(), batch=True, engine="fft")  # equal values, new arrays
    assert len(spectra_made) == made
    np.testing.assert_array_equal(again, first)
    assert_close(first, batch_reference(images, bank, "valid"))
    bank[0, 0, 0, 0] += 1.0
    changed = rmidl.correlate(images, bank, batch=True, engine="fft")
    assert len(spectra_made) > made
    assert_close(changed, batch_reference(images, bank, "valid"))


def test_spectra_too_big_for_their_cache_keep_the_temporaries_budget(rng, monkeypatch) -> None:
    """Given spectra whose cache cannot hold the whole bank, the fft engine plans chunks within its
    budget (it used to plan as if cached and make the whole bank's spectra aside, every call)."""
    import tracemalloc

    from rmidl.kernels import _fft

    monkeypatch.setattr(_fft, "TEMP_BYTES", 4 << 20)
    images = rng.standard_normal((24, 64, 64, 16)).astype(np.float32)
    bank = rng.standard_normal((32, 7, 7, 16)).astype(np.float32)
    out = np.empty((24, 32, 58, 58), np.float32)
    tiny = KernelSpectra(bank, max_bytes=100)
    correlate_valid_batch(images[:1], bank, out[:1], engine="fft", spectra=tiny)  # imports, FFT plans
    peaks = []
    for _ in range(3):  # tracemalloc counts every thread's allocations: the least of 3 runs is the call's
        tracemalloc.start()
        try:
            correlate_valid_batch(images, bank, out, threads=2, engine="fft", spectra=tiny)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert min(peaks) <= 1.25 * (4 << 20), f"peak temporaries {min(peaks) / 2**20:.1f} MiB"
    assert tiny.nbytes == 0
    assert_close(out[::5, ::7], batch_reference(images[::5], bank[::7], "valid"))
