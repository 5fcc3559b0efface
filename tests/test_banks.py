"""load_kernels(): named banks checked by what they compute, .npy/.npz files, and the table of bad specs."""

from __future__ import annotations

import io
import logging
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.signal

from rmidl import BankError, BudgetExceeded, load_kernels
from rmidl.banks import describe_bank


def test_named_banks_have_their_shapes_and_are_deterministic() -> None:
    expected = {
        "sobel": (2, 3, 3),
        "laplacian": (1, 3, 3),
        "box:4": (1, 4, 4),
        "gaussian:5": (1, 5, 5),
        "gaussian:6:2.5": (1, 6, 6),
        "gabor:8": (8, 11, 11),
        "gabor:3x7": (3, 7, 7),
        "gabor:5x9:1.5": (5, 9, 9),
        "random:128x11x11": (128, 11, 11),
        "random:4x3x5x3:9": (4, 3, 5, 3),
        " Sobel ": (2, 3, 3),
    }
    for spec, shape in expected.items():
        bank = load_kernels(spec)
        assert bank.shape == shape and bank.dtype == np.float32 and bank.flags.c_contiguous, spec
        np.testing.assert_array_equal(bank, load_kernels(spec))


def test_random_bank_seeds_and_scale() -> None:
    bank = load_kernels("random:128x11x11")
    np.testing.assert_array_equal(bank, load_kernels("random:128x11x11:0"))
    assert not np.array_equal(bank, load_kernels("random:128x11x11:1"))
    assert abs(bank.std() / (1 / 11) - 1) < 0.03 and abs(bank.mean()) < 0.005
    colour = load_kernels("random:64x5x5x3:4")
    assert abs(colour.std() / (1 / math.sqrt(75)) - 1) < 0.05


def ramp(axis: int, size: int = 12) -> np.ndarray:
    y, x = np.mgrid[:size, :size].astype(np.float64)
    return (x, y)[axis]


def test_sobel_measures_horizontal_then_vertical_gradient() -> None:
    dx, dy = load_kernels("sobel").astype(np.float64)
    for image, (gx, gy) in ((ramp(0), (8, 0)), (ramp(1), (0, 8))):
        np.testing.assert_allclose(scipy.signal.correlate(image, dx, mode="valid"), gx)
        np.testing.assert_allclose(scipy.signal.correlate(image, dy, mode="valid"), gy, atol=1e-12)


def test_laplacian_of_a_paraboloid_is_four() -> None:
    (kernel,) = load_kernels("laplacian").astype(np.float64)
    image = ramp(0) ** 2 + ramp(1) ** 2
    np.testing.assert_allclose(scipy.signal.correlate(image, kernel, mode="valid"), 4.0)


@pytest.mark.parametrize(("size", "sigma"), [(1, None), (3, None), (5, None), (11, None), (4, 1.5), (7, 0.6)])
def test_gaussian_matches_scipy_window(size: int, sigma: float | None) -> None:
    spec = f"gaussian:{size}" if sigma is None else f"gaussian:{size}:{sigma}"
    std = sigma if sigma is not None else 0.3 * ((size - 1) * 0.5 - 1) + 0.8  # OpenCV's default
    window = scipy.signal.windows.gaussian(size, std)
    expected = np.outer(window, window) / np.outer(window, window).sum()
    np.testing.assert_allclose(load_kernels(spec)[0], expected, rtol=1e-6, atol=1e-7)


def test_box_averages() -> None:
    (kernel,) = load_kernels("box:5")
    np.testing.assert_allclose(kernel, np.full((5, 5), 1 / 25), rtol=1e-7)


def test_gabor_is_zero_mean_unit_norm_and_oriented() -> None:
    bank = load_kernels("gabor:4x11").astype(np.float64)
    np.testing.assert_allclose(bank.sum(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose((bank**2).sum(axis=(1, 2)), 1, rtol=1e-5)
    # orientation k*pi/4 from the column axis: kernel 2 is kernel 0 turned a quarter
    np.testing.assert_allclose(bank[2], bank[0].T, atol=1e-6)
    np.testing.assert_allclose(bank[3], bank[1][:, ::-1], atol=1e-6)
    # kernel 0 responds to stripes varying along x (vertical edges) far more than kernel 2 does
    wavelength = (11 / 4.5) / 0.56
    stripes = np.cos(2 * np.pi * ramp(0, 64) / wavelength)
    energy = [np.abs(scipy.signal.correlate(stripes, k, mode="valid")).mean() for k in bank]
    assert energy[0] > 10 * energy[2]


@pytest.mark.parametrize("spec", ["gabor:4x3:0.1", "gabor:6x11:0.1", "gabor:4x4:0.15", "gabor:8x3"])
def test_gabor_stays_zero_mean_unit_norm_at_the_edges_of_its_range(spec: str) -> None:
    """Smallest size and narrowest envelope: every kernel is still zero-mean with unit norm."""
    bank = load_kernels(spec).astype(np.float64)
    np.testing.assert_allclose(bank.sum(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose((bank**2).sum(axis=(1, 2)), 1, rtol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 5), (2, 3, 4, 3), (7, 1, 1)])
def test_npy_and_npz_files(tmp_path: Path, rng: np.random.Generator, shape: tuple[int, ...]) -> None:
    array = rng.standard_normal(shape)  # float64 on disk: loaded as float32
    np.save(tmp_path / "bank.npy", array)
    np.savez(tmp_path / "one.npz", weights=array)
    np.savez_compressed(tmp_path / "named.npz", bias=np.zeros(3), kernels=array)
    for spec in (str(tmp_path / "bank.npy"), tmp_path / "one.npz", str(tmp_path / "named.npz")):
        bank = load_kernels(spec)
        assert bank.dtype == np.float32 and bank.shape == shape
        np.testing.assert_allclose(bank, array, rtol=1e-7)


def test_two_dimensional_and_integer_arrays(tmp_path: Path) -> None:
    np.save(tmp_path / "k.npy", np.arange(6, dtype=np.int16).reshape(2, 3))
    bank = load_kernels(str(tmp_path / "k.npy"))
    assert bank.shape == (1, 2, 3) and bank.dtype == np.float32
    np.testing.assert_array_equal(bank[0], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(load_kernels(np.ones((2, 2, 2), np.float64)), np.ones((2, 2, 2)))


def test_describe_bank() -> None:
    assert describe_bank("sobel") == "sobel: 2 kernels 3x3, float32, 72 B, values in [-2, 2]"
    summary = describe_bank("random:128x11x11")
    assert summary.startswith("random:128x11x11: 128 kernels 11x11, float32, 60.5 KiB")
    assert "1 kernel 5x5 of 3 channels," in describe_bank(np.ones((1, 5, 5, 3)))
    assert "1 kernel 7x3," in describe_bank(np.ones((3, 7)))  # sizes W x H


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def bad_file(tmp_path: Path, name: str) -> str:
    """Write one kind of broken bank file into tmp_path and return its path."""
    path = tmp_path / name
    writers = {
        "object.npy": lambda: np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True),
        "vector.npy": lambda: np.save(path, np.ones(5)),
        "five.npy": lambda: np.save(path, np.ones((1, 2, 3, 4, 5))),
        "empty.npy": lambda: np.save(path, np.ones((0, 3, 3))),
        "nan.npy": lambda: np.save(path, np.where(np.eye(3) > 0, np.nan, 0)[None]),
        "inf.npy": lambda: np.save(path, np.full((1, 2, 2), -np.inf)),
        "complex.npy": lambda: np.save(path, np.ones((1, 2, 2), complex)),
        "bool.npy": lambda: np.save(path, np.ones((1, 2, 2), bool)),
        "huge.npy": lambda: np.save(path, np.full((1, 2, 2), 1e300)),
        "garbage.npy": lambda: path.write_bytes(b"this is not numpy data"),
        "zero.npy": lambda: path.write_bytes(b""),
        "truncated.npy": lambda: path.write_bytes(npy_bytes(np.ones((4, 9, 9)))[:200]),
        "two.npz": lambda: np.savez(path, a=np.ones((1, 2, 2)), b=np.ones((1, 2, 2))),
        "none.npz": lambda: np.savez(path),
        "garbage.npz": lambda: path.write_bytes(b"PK\x03\x04 broken zip"),
        "folder.npy": path.mkdir,
    }
    writers[name]()
    return str(path)


BAD_SPECS = [
    ("foo", BankError, "unknown kernel bank 'foo'"),
    ("", BankError, "unknown kernel bank ''"),
    ("random:3x3", BankError, "random:3x3.*expected random:KxHxW"),
    ("random:axbxc", BankError, "random:axbxc"),
    ("random:0x3x3", BankError, "'random:0x3x3'.*>= 1, got 0"),
    ("random:2x3x3x0", BankError, ">= 1, got 0"),
    ("random:2x3x3:-1", BankError, "random:2x3x3:-1"),
    ("gabor:", BankError, "expected gabor:K"),
    ("gabor:4x:1", BankError, "gabor:4x:1"),
    ("gabor:4x1", BankError, "'gabor:4x1': Gabor kernels need a size S >= 3, got 1"),
    ("gabor:2x2", BankError, "S >= 3, got 2"),
    ("gabor:4x7:0", BankError, "sigma 0 must lie between 0.1 and 10000"),
    ("gabor:4x7:1e-300", BankError, "sigma 1e-300 must lie between"),
    ("gaussian:3:2e4", BankError, "sigma 2e4 must lie between"),
    ("gaussian:5:-1", BankError, "gaussian:5:-1"),
    ("gaussian:5:nan", BankError, "gaussian:5:nan"),
    ("gaussian:0", BankError, ">= 1"),
    ("box:", BankError, "expected box:S"),
    ("box:2.5", BankError, "box:2.5"),
    ("sobel:3", BankError, "sobel takes no arguments"),
    ("laplacian:x", BankError, "laplacian takes no arguments"),
    (5, BankError, "must be a string, path or array, got int"),
    ("missing.npy", BankError, "'missing.npy' does not exist"),
]


@pytest.mark.parametrize(("spec", "error", "message"), BAD_SPECS)
def test_bad_spec(spec: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_kernels(spec)  # type: ignore[arg-type]


BAD_FILES = [
    ("object.npy", r"holds Python objects \(pickled data\), which rmidl never loads"),
    ("vector.npy", r"shape \(5,\); expected \(K, kh, kw\)"),
    ("five.npy", r"shape \(1, 2, 3, 4, 5\)"),
    ("empty.npy", r"is empty: shape \(0, 3, 3\)"),
    ("nan.npy", r"contains NaN \(first at index \(0, 0, 0\)\)"),
    ("inf.npy", "contains Inf"),
    ("complex.npy", "dtype complex128"),
    ("bool.npy", "dtype bool"),
    ("huge.npy", "beyond the float32 range"),
    ("garbage.npy", "not a valid .npy file: not numpy data"),
    ("zero.npy", "not a valid .npy file"),
    ("truncated.npy", r"is truncated or lies: its header claims shape \(4, 9, 9\) of float64 \(2592 bytes\)"),
    ("two.npz", "holds arrays a, b; name the bank 'kernels'"),
    ("none.npz", "holds no arrays"),
    ("garbage.npz", "not a valid .npz file"),
    ("folder.npy", "is a directory"),
]


@pytest.mark.parametrize(("name", "message"), BAD_FILES)
def test_bad_file(tmp_path: Path, name: str, message: str) -> None:
    path = bad_file(tmp_path, name)
    with pytest.raises(BankError, match=message) as raised:
        load_kernels(path)
    assert name in str(raised.value)


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same words as load_image's; the open is refused by a stub, since root may read any file."""
    np.save(tmp_path / "locked.npy", np.ones((1, 2, 2)))

    real_open = os.open

    def refuse(path: str, flags: int, *args: int) -> int:
        if str(path).endswith("locked.npy"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(BankError, match=r"'.*locked\.npy' cannot be read: permission denied$"):
        load_kernels(tmp_path / "locked.npy")


def test_memory_budget_is_checked_before_allocating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    np.save(tmp_path / "big.npy", np.ones((4, 20, 20)))
    np.savez_compressed(tmp_path / "big.npz", kernels=np.zeros((4, 20, 20)))  # compresses to ~200 bytes
    monkeypatch.setenv("RMIDL_MEMORY_BUDGET", "4000")
    with pytest.raises(BudgetExceeded, match=r"random:10x10x11 needs 4400 bytes.*memory_budget=4000"):
        load_kernels("random:10x10x11")
    assert load_kernels("random:10x10x10").shape == (10, 10, 10)
    for name in ("big.npy", "big.npz"):
        with pytest.raises(BudgetExceeded, match=name):
            load_kernels(str(tmp_path / name))


def test_a_gabor_bank_whose_wavelength_aliases_is_warned_about(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="rmidl.banks"):
        load_kernels("gabor:8x11")
        assert caplog.records == []
        load_kernels("gabor:8x3")
    (record,) = caplog.records
    message = record.getMessage()
    assert "Gabor wavelength 1.19 px is below 2 px" in message and "gabor:8x11" in message


@pytest.mark.parametrize("spec", ["random:3x5x7", "random:2x3x4x3:9", "gabor:4x9", "gabor:5", "sobel",
                                  "gaussian:7", "laplacian", "box:4"])
def test_bank_shape_is_the_built_shape_without_building(spec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import rmidl.banks

    expected = load_kernels(spec).shape

    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("bank_shape built the bank")

    for name in ("_gabor_chunk", "np"):
        monkeypatch.setattr(rmidl.banks, name, built if name == "_gabor_chunk" else _NoArrays())
    assert rmidl.banks.bank_shape(spec) == expected


class _NoArrays:
    """Stands in for numpy inside rmidl.banks: any use of it is a bank being built."""

    ndarray = np.ndarray  # the type, to tell an array from a spec

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"bank_shape used np.{name}")


def test_bank_shape_refuses_what_load_kernels_refuses(tmp_path: Path) -> None:
    from rmidl.banks import bank_shape

    assert bank_shape(str(tmp_path / "bank.npy")) is None  # a file: read (bounded) by load_kernels
    assert bank_shape(np.ones((3, 3))) == (1, 3, 3)
    for spec, error in (("gabor:100000x301", BudgetExceeded), ("wavelets:3", BankError),
                        ("random:2x0x3", BankError), ("sobel:2", BankError)):
        with pytest.raises(error) as refused:
            bank_shape(spec)
        with pytest.raises(error) as loading:
            load_kernels(spec)
        assert str(refused.value) == str(loading.value)
    with pytest.raises(BudgetExceeded, match=r"^kernel bank gabor:100000x301 needs 36244748848 bytes"):
        bank_shape("gabor:100000x301")
