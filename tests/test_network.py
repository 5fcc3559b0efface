"""Network and Stage against a float64 scipy + numpy reference over random nets; shapes, costs, timings."""

from __future__ import annotations

import numpy as np
import pytest
from reference import ACTIVATIONS
from reference import network_reference as reference

from rmidl import KernelTooLarge, NonFiniteInput, OptionError, ShapeError
from rmidl.errors import BankError, DTypeError
from rmidl.imaging import default_image
from rmidl.network import Network, Stage


def assert_close(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == np.float32
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5 * scale)


def random_net(rng: np.random.Generator, image_hw: tuple[int, int]) -> tuple[Network, int]:
    """A random 1-3 stage network (rules, modes, odd/even kernels, pools and strides) that fits image_hw."""
    while True:
        channels = int(rng.integers(1, 4))
        maps, stages = channels, []
        for _ in range(int(rng.integers(1, 4))):
            depthwise = bool(rng.integers(2))
            k = maps * int(rng.integers(1, 3)) if depthwise else int(rng.integers(1, 5))
            kh, kw = (int(v) for v in rng.integers(1, 6, size=2))
            bank = rng.standard_normal((k, kh, kw) if depthwise else (k, kh, kw, maps))
            pool = [None, "max", "avg"][int(rng.integers(3))]
            size = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
            stride = None if rng.integers(2) else (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
            stages.append(Stage(bank, activation=list(ACTIVATIONS)[int(rng.integers(5))], pool=pool,
                                pool_size=size, pool_stride=stride, depthwise=depthwise,
                                mode=["valid", "same", "full"][int(rng.integers(3))]))
            maps = k
        net = Network(stages, channels=channels)
        try:
            net.output_shape(image_hw)
        except (ShapeError, KernelTooLarge):
            continue
        return net, channels


@pytest.mark.parametrize("path", ["engine", "per map", "bands"])
@pytest.mark.parametrize("seed", range(40))
def test_random_nets_match_float64_reference(seed: int, path: str, monkeypatch) -> None:
    # small maps take depthwise stages through the depthwise engine; force the per-map calls too, and the
    # row bands big maps run in (bands of a few rows here, the last one short)
    from rmidl.network import _bands

    if path == "per map":
        monkeypatch.setattr(Stage, "_depthwise_by_fft", lambda self, shape, threads: False)
    if path == "bands":
        monkeypatch.setattr(_bands, "BANDED_MAP_BYTES", 0)
        monkeypatch.setattr(_bands, "BAND_BYTES", 1)
    rng = np.random.default_rng(seed)
    hw = (int(rng.integers(6, 24)), int(rng.integers(6, 24)))
    net, channels = random_net(rng, hw)
    shape = hw if channels == 1 and rng.integers(2) else (*hw, channels)
    images = rng.standard_normal((3, *shape)).astype(np.float32)
    features = net.forward_batch(images)
    assert features.shape == (3, *net.output_shape(shape))
    for image, row in zip(images, features, strict=True):
        assert_close(row, reference(net, image))
        # one image alone may go through another engine than a batch of three: the same to float32 rounding
        np.testing.assert_allclose(net.forward(image), row, rtol=2e-5, atol=2e-5 * np.abs(row).max())


@pytest.mark.parametrize("preset", ["seed004", "seed004-full"])
def test_presets_on_a_200x200_photo_match_reference(preset: str) -> None:
    net = Network.from_spec(preset)
    image = default_image()[200:400, 500:700]
    features = net.forward(image)
    assert features.shape == net.output_shape(image.shape) == (225,)
    assert_close(features, reference(net, image))


@pytest.mark.parametrize("preset", ["seed004", "seed004-full"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seeded_banks_keep_activations_alive_over_four_stages(preset: str, seed: int) -> None:
    """On a real photo the maps' RMS stays within a factor 4 of stage 1's and no map is all zero."""
    net = Network.from_spec(preset, seed=seed)
    maps = net.to_maps(default_image()[200:400, 500:700][None])
    levels = []
    for stage in net.stages:
        maps = stage.forward(maps)
        levels.append(float(np.sqrt(np.mean(maps.astype(np.float64) ** 2))))
        assert (maps[0].reshape(len(maps[0]), -1).max(axis=1) > 0).all()
    assert all(0.25 < level / levels[0] < 4 for level in levels), levels


def test_channel_rules_on_hand_worked_maps() -> None:
    image = np.arange(2 * 3 * 3, dtype=np.float32).reshape(3, 3, 2)  # two channels
    ones = np.ones((1, 1, 1, 2), np.float32)
    full = Network([Stage(ones, activation=None, pool=None)])
    np.testing.assert_array_equal(full.forward(image), (image[..., 0] + image[..., 1]).ravel())
    scales = np.array([1, 10, 100, 1000], np.float32).reshape(4, 1, 1)
    depthwise = Network([Stage(scales, activation=None, pool=None, depthwise=True)], channels=2)
    expected = [image[..., 0], image[..., 0] * 10, image[..., 1] * 100, image[..., 1] * 1000]
    np.testing.assert_array_equal(depthwise.forward(image), np.ravel(expected))


def test_integer_images_are_taken_as_values(rng: np.random.Generator) -> None:
    net = Network.from_spec("3x3x3:relu:max2,2x2x2:tanh:avg2")
    pixels = rng.integers(0, 256, (2, 12, 12), dtype=np.uint8)
    np.testing.assert_allclose(net.forward_batch(pixels), net.forward_batch(pixels.astype(np.float32)),
                               rtol=1e-5, atol=1e-6)


def test_timings_are_added_per_stage_and_out_is_filled(rng: np.random.Generator) -> None:
    net = Network.from_spec("4x3x3,4x3x3:dw:tanh:nopool")
    images = rng.random((5, 16, 16), dtype=np.float32)
    timings: dict[str, float] = {}
    out = np.full((5, 4 * 5 * 5), np.nan, np.float32)
    result = net.forward_batch(images, timings=timings, out=out)
    assert result is out and np.isfinite(out).all()
    stages = {"CNP1", "CNP2", "FLAT"}
    parts = {f"CNP{i}.{p}" for i in (1, 2) for p in ("conv", "act", "pool")}
    assert set(timings) == stages | parts
    assert all(value >= 0 for value in timings.values())
    assert timings["CNP1"] >= timings["CNP1.conv"]
    first = dict(timings)
    net.forward_batch(images, timings=timings)
    assert all(timings[key] >= first[key] for key in timings)
    assert timings["CNP1"] > first["CNP1"]


def test_describe_counts_flops_and_bytes_by_hand() -> None:
    net = Network([Stage(np.ones((2, 3, 3, 1)), activation="relu", pool="max", pool_size=2),
                   Stage(np.ones((4, 2, 2, 2)), activation=None, pool=None)])
    summary = net.describe((10, 10))
    first, second = summary.stages
    assert (first.shapes.conv, first.shapes.out) == ((2, 8, 8), (2, 4, 4))
    assert (second.shapes.maps_in, second.shapes.out) == ((2, 4, 4), (4, 3, 3))
    assert first.flops == 2 * 2 * 64 * 9 + 2 * 64 + 2 * 16 * 4
    assert second.flops == 2 * 4 * 9 * (2 * 2 * 2)
    assert summary.flops == first.flops + second.flops and summary.features == 36
    assert (first.out_bytes, first.conv_bytes, first.bank_bytes) == (4 * 32, 4 * 128, 4 * 18)
    table = str(summary)
    for text in ("CNP1", "CNP2", "FLAT", "total", "2x8x8", "4x3x3", "36"):
        assert text in table


def test_describe_of_seed004_shows_where_the_work_is() -> None:
    dw = Network.from_spec("seed004").describe((200, 200))
    full = Network.from_spec("seed004-full").describe((200, 200))
    assert [s.shapes.out for s in dw.stages] == [(25, 95, 95), (25, 42, 42), (25, 16, 16), (25, 3, 3)]
    flops = [s.flops for s in dw.stages]
    assert flops == sorted(flops, reverse=True)  # depthwise: each stage cheaper than the one before
    assert full.stages[1].flops > 4 * full.stages[0].flops  # full mixing: CNP2 is the bulk


BAD_STAGES = [
    ({"activation": "softmax"}, OptionError, "activation 'softmax'"),
    ({"activation": 3}, OptionError, "activation 3"),
    ({"pool": "min"}, OptionError, "pool 'min'"),
    ({"pool_size": 0}, OptionError, "pool_size=0"),
    ({"pool_size": (2, 0)}, OptionError, "pool_size=(2, 0)"),
    ({"pool_size": True}, OptionError, "pool_size=True"),
    ({"pool_size": (1, 2, 3)}, OptionError, "pool_size"),
    ({"pool_stride": 0}, OptionError, "pool_stride=0"),
    ({"mode": "circular"}, OptionError, "mode 'circular'"),
    ({"depthwise": "yes"}, OptionError, "depthwise='yes'"),
    ({"bank": np.zeros((0, 3, 3))}, BankError, "empty"),
    ({"bank": np.full((2, 3, 3), np.nan)}, BankError, "NaN"),
    ({"bank": np.zeros((1, 2, 3, 3, 1))}, BankError, "shape"),
    ({"bank": np.zeros((2, 3, 3), bool)}, BankError, "dtype bool"),
    ({"bank": np.zeros((2, 3, 3, 2)), "depthwise": True}, BankError, "depthwise bank"),
    ({"bank": "nonsense:3"}, BankError, "unknown kernel bank"),
]


@pytest.mark.parametrize(("kwargs", "error", "text"), BAD_STAGES)
def test_bad_stage_arguments_are_one_line_errors(kwargs: dict, error: type, text: str) -> None:
    kwargs = {"bank": np.ones((2, 3, 3)), **kwargs}
    with pytest.raises(error, match=None) as caught:
        Stage(kwargs.pop("bank"), **kwargs)
    assert text in str(caught.value) and "\n" not in str(caught.value)


def test_stage_keeps_its_arguments() -> None:
    bank = np.ones((4, 3, 2), np.float64)
    stage = Stage(bank, activation="tanh", pool="avg", pool_size=(3, 2), pool_stride=1, mode="same",
                  depthwise=True)
    kept = (stage.activation, stage.pool, stage.pool_size, stage.pool_stride, stage.mode, stage.depthwise)
    assert kept == ("tanh", "avg", (3, 2), (1, 1), "same", True)
    assert stage.bank.shape == (4, 3, 2, 1) and stage.bank.dtype == np.float32
    assert not stage.bank.flags.writeable
    bank[:] = 5  # the stage holds its own copy
    assert (stage.bank == 1).all()
    assert Stage("random:8x5x5").bank.shape == (8, 5, 5, 1)


def test_bad_networks_name_the_stage() -> None:
    three = Stage(np.ones((2, 3, 3, 3)))
    with pytest.raises(OptionError, match="at least one stage"):
        Network([])
    with pytest.raises(OptionError, match="stage 2 is a str"):
        Network([three, "x"])  # type: ignore[list-item]
    with pytest.raises(OptionError, match=r"sequence of rmidl\.Stage"):
        Network(three)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match=r"stage 2: its bank has 3 channel\(s\) but its input has 2"):
        Network([three, three])
    with pytest.raises(ShapeError, match=r"stage 1: .* dividing it, got 2"):
        Network([Stage(np.ones((3, 3, 3)), depthwise=True)], channels=2)
    with pytest.raises(ShapeError, match="stage 1: its bank has 3 channel"):
        Network([three], channels=1)
    with pytest.raises(OptionError, match="channels=0"):
        Network([three], channels=0)


def test_shapes_that_do_not_fit_name_the_stage(rng: np.random.Generator) -> None:
    net = Network.from_spec("seed004")
    with pytest.raises(KernelTooLarge, match="stage 3: kernel 11x11 does not fit maps 7x7"):
        net.output_shape((60, 60))
    small = Network.from_spec("2x3x3:max2,2x3x3:dw:max4")
    with pytest.raises(ShapeError, match="stage 2: pool window 4x4 does not fit input 3x3"):
        small.forward(rng.random((12, 12)))
    with pytest.raises(ShapeError, match=r"images have 3 channel\(s\) but the network takes 1"):
        net.output_shape((200, 200, 3))


BAD_IMAGES = [
    (np.zeros((2, 20, 20, 3)), ShapeError, "3 channel(s)"),
    (np.zeros((20, 20)), ShapeError, "(n, H, W)"),
    (np.zeros((0, 20, 20)), ShapeError, "no images"),
    (np.zeros((1, 20, 20), bool), DTypeError, "bool"),
    (np.full((1, 20, 20), np.nan), NonFiniteInput, "NaN"),
    (np.full((1, 20, 20), 1e300), NonFiniteInput, "float32 range"),
]


@pytest.mark.parametrize(("images", "error", "text"), BAD_IMAGES)
def test_bad_batches_are_refused(images: np.ndarray, error: type, text: str) -> None:
    net = Network.from_spec("2x3x3:relu:max2")
    with pytest.raises(error) as caught:
        net.forward_batch(images)
    assert text in str(caught.value)


def test_bad_forward_options() -> None:
    net = Network.from_spec("2x3x3")
    images = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(OptionError, match="threads=0"):
        net.forward_batch(images, threads=0)
    with pytest.raises(ShapeError, match="out has shape"):
        net.forward_batch(images, out=np.zeros((2, 5), np.float32))
    with pytest.raises(ShapeError, match="same shape"):
        net.forward_batch([np.zeros((8, 8)), np.zeros((9, 8))])
    with pytest.raises(ShapeError, match=r"\(H, W\) or \(H, W, C\)"):
        net.forward(images[..., None])
    with pytest.raises(ShapeError, match=r"images have 8 channel\(s\)"):
        net.forward(images)  # (2, 8, 8) is one image of 8 channels


def test_global_pooling_keeps_one_value_per_map(rng: np.random.Generator) -> None:
    net = Network.from_spec("3x3x3:relu:max2,3x3x3:tanh:gavg:dw,2x1x1:linear:gmax", seed=1)
    assert [stage.pool for stage in net.stages] == ["max", "global_avg", "global_max"]
    assert net.stages[1].spec() == "3x3x3:tanh:gavg:dw" and net.output_shape((17, 23)) == (2,)
    assert net.stage_shapes((17, 23))[1].out == (3, 1, 1)
    images = rng.random((3, 17, 23), dtype=np.float32)
    for got, image in zip(net.forward_batch(images, threads=1), images, strict=True):
        assert_close(got, reference(net, image))
    summary = net.describe((17, 23)).stages[1]
    assert summary.flops == 2 * 3 * 5 * 8 * 9 + 3 * 5 * 8 + 3 * 5 * 8  # multiply-adds, tanh, one add each
    assert Network.from_spec("textures").output_shape((200, 200)) == (24,)


@pytest.mark.parametrize("pool", ["max", "avg", "global_max", None])
@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "abstanh", None])
def test_a_stage_is_its_activation_then_its_pooling_bit_for_bit(rng: np.random.Generator, activation,
                                                                pool) -> None:
    """Max pooling after a non-decreasing activation runs pool-first (fewer values to activate); the
    result must be exactly activate-then-pool on the same maps, at 1 and 2 threads."""
    from rmidl import activate
    from rmidl import pool as pool_maps
    from rmidl.convolution import correlate

    maps = rng.standard_normal((3, 2, 41, 37)).astype(np.float32)
    bank = rng.standard_normal((4, 3, 5, 2)).astype(np.float32)
    stage = Stage(bank, activation=activation, pool=pool, pool_size=(2, 3))
    conv = correlate(maps.transpose(0, 2, 3, 1), bank, batch=True)
    activated = conv if activation is None else activate(conv, activation)
    if pool == "global_max":
        expected = activated.max(axis=(2, 3), keepdims=True)
    elif pool is None:
        expected = activated
    else:
        expected = pool_maps(activated, (2, 3), kind=pool)
    for threads in (1, 2):
        np.testing.assert_array_equal(stage.forward(maps, threads=threads), expected)


def test_banded_stages_are_the_same_bits_on_any_thread_count(rng: np.random.Generator, monkeypatch) -> None:
    """A big-map stage in row bands: against the float64 reference, the same bits at 1-3 threads, and
    timings that add up to the stage's time."""
    from rmidl.network import _bands

    monkeypatch.setattr(_bands, "BANDED_MAP_BYTES", 0)
    monkeypatch.setattr(_bands, "BAND_BYTES", 3 * 7 * 58 * 4)  # 3 conv rows of 7 maps: 1 pooled row
    bank = rng.standard_normal((7, 5, 4, 2)).astype(np.float32)
    for stage in (Stage(bank, activation="relu", pool="max", pool_size=(3, 2), pool_stride=(2, 2)),
                  Stage(bank, activation="abstanh", pool="avg", mode="same")):
        net = Network([stage], channels=2)
        images = rng.standard_normal((2, 33, 61, 2)).astype(np.float32)
        runs = []
        for threads in (1, 2, 3):
            timings: dict[str, float] = {}
            runs.append(net.forward_batch(images, threads=threads, timings=timings))
            parts = sum(v for key, v in timings.items() if key.startswith("CNP1."))
            assert 0 < parts <= timings["CNP1"] * 1.001
        for image, row in zip(images, runs[0], strict=True):
            assert_close(row, reference(net, image))
        for other in runs[1:]:
            np.testing.assert_array_equal(other, runs[0])


def test_a_stage_keeps_its_kernel_spectra_between_batches(rng: np.random.Generator, monkeypatch) -> None:
    """The FFT engine's bank transform is made once per stage and size, not per batch; the same bits."""
    from rmidl.convolution import correlate
    from rmidl.kernels import _spectra

    made = []
    original = _spectra.kernel_spectra
    monkeypatch.setattr(_spectra, "kernel_spectra", lambda *a, **k: made.append(1) or original(*a, **k))
    bank = rng.standard_normal((25, 11, 11, 25)).astype(np.float32)
    stage = Stage(bank, activation=None, pool=None)
    maps = rng.standard_normal((4, 25, 60, 60)).astype(np.float32)
    first = stage.forward(maps, threads=1)
    assert made, "the fft engine did not run: pick a shape it wins"
    count = len(made)
    second = stage.forward(maps, threads=1)
    assert len(made) == count
    np.testing.assert_array_equal(first, second)
    expected = correlate(maps.transpose(0, 2, 3, 1), bank, batch=True, engine="fft", threads=1)
    np.testing.assert_allclose(first, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_per_map_depthwise_calls_share_the_threads_with_the_same_bits(rng: np.random.Generator,
                                                                     monkeypatch) -> None:
    """Per-map depthwise calls run side by side, one thread each: the same bits at 1-3 threads."""
    monkeypatch.setattr(Stage, "_depthwise_by_fft", lambda self, shape, threads: False)
    stage = Stage(rng.standard_normal((6, 5, 5)).astype(np.float32), depthwise=True, activation="tanh")
    net = Network([stage], channels=3)
    images = rng.standard_normal((2, 30, 26, 3)).astype(np.float32)
    runs = [net.forward_batch(images, threads=t) for t in (1, 2, 3)]
    for image, row in zip(images, runs[0], strict=True):
        assert_close(row, reference(net, image))
    for other in runs[1:]:
        np.testing.assert_array_equal(other, runs[0])


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_pooling_is_after_the_activation_even_where_float32_tanh_steps_down(activation) -> None:
    """numpy's float32 tanh is not monotone everywhere (tanh(1.4999999) > tanh(1.5)): a max pool after
    it must see the activated values, not activate the pooled ones."""
    from rmidl import activate

    below, at = np.float32(1.5) - np.float32(2 ** -23), np.float32(1.5)
    maps = np.array([below, at, at, below], np.float32).reshape(1, 1, 2, 2)
    stage = Stage(np.ones((1, 1, 1, 1), np.float32), activation=activation, pool="max", pool_size=2)
    expected = activate(maps, activation).max(axis=(2, 3), keepdims=True)
    np.testing.assert_array_equal(stage.forward(maps, threads=1), expected)


def test_a_banded_stage_counts_its_band_scratch_per_thread_not_its_maps(monkeypatch) -> None:
    """peak_bytes (per image) holds a banded stage's pooled maps, scratch_bytes its bands (per thread)."""
    from rmidl.network import _bands

    net = Network([Stage(np.ones((4, 3, 3), np.float32), pool="max"),
                   Stage(np.ones((2, 3, 3, 4)), pool=None)])
    maps_in = (1, 40, 30)
    whole = net.peak_bytes(maps_in)
    assert net.scratch_bytes(maps_in, 2) == 0
    monkeypatch.setattr(_bands, "BANDED_MAP_BYTES", 0)
    pooled = 4 * (40 * 30 + 4 * 19 * 14)  # stage 1 banded: its input and pooled maps
    second = 4 * (4 * 19 * 14 + 2 * 17 * 12)  # stage 2 (no pooling: never banded)
    assert net.peak_bytes(maps_in) == max(pooled, second) < whole
    assert net.scratch_bytes(maps_in, 3) == 3 * _bands.BAND_BYTES
    assert net.scratch_bytes((4, 19, 14), 3, start=1) == 0  # maps entering stage 2
