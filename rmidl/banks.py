"""Kernel banks: load (K, kh, kw[, C]) float32 banks from .npy/.npz files or build named ones from a spec."""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from rmidl._files import clipped, open_regular, read_npy, shown
from rmidl.config import Config
from rmidl.errors import BankError, BankNotFound, BudgetExceeded, RmidlError
from rmidl.validate import first_non_finite, float32_overflow

__all__ = ["BANK_NAMES", "bank_shape", "describe_bank", "load_kernels"]

log = logging.getLogger(__name__)

_INT = r"(\d+)"
_FLOAT = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"


@dataclass(frozen=True)
class _Plan:
    """A named bank's shape, known from its spec alone (parsed, checked against the budget), and how to
    build it: the shape serves size checks that must come before minutes of building."""

    shape: tuple[int, ...]
    build: Callable[[], np.ndarray]


def _random(args: str, spec: str) -> _Plan:
    match = re.fullmatch(rf"{_INT}[xX]{_INT}[xX]{_INT}(?:[xX]{_INT})?(?::(\d+))?", args)
    if match is None:
        raise BankError(f"bank spec {shown(spec)}: expected random:KxHxW[:seed] or random:KxHxWxC[:seed]")
    k, h, w = _sizes(spec, match[1], match[2], match[3])
    c = _sizes(spec, match[4])[0] if match[4] else None
    shape = (k, h, w) if c is None else (k, h, w, c)
    _check_budget(spec, 4 * math.prod(shape))
    seed = _sizes(spec, match[5], least=0)[0] if match[5] else 0

    def build() -> np.ndarray:
        # scaled so that a kernel's response to unit-variance input has unit variance, like He/Glorot init
        bank = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        bank *= np.float32(1.0 / math.sqrt(h * w * (c or 1)))
        return bank

    return _Plan(shape, build)


_WORK_BYTES = 32 << 20
"""Most float64 working memory a builder uses at a time (chunks of kernels or rows), within the budget."""
_GABOR_ARRAYS = 6  # float64 arrays of one chunk alive at once in _gabor_chunk
_GABOR_OCTAVE = 0.56  # sigma / wavelength of a one-octave bandwidth


def _gabor(args: str, spec: str) -> _Plan:
    match = re.fullmatch(rf"{_INT}(?:[xX]{_INT})?(?::{_FLOAT})?", args)
    if match is None:
        raise BankError(f"bank spec {shown(spec)}: expected gabor:K[xS][:sigma]")
    k, size = _sizes(spec, match[1], match[2] or "11")
    if size < 3:  # 1x1 is all zero once zero-mean; 2x2 at orientation 0 is constant, so zero too
        raise BankError(f"bank spec {shown(spec)}: Gabor kernels need a size S >= 3, got {size}")
    chunk = _work_chunk(spec, 4 * k * size * size, _GABOR_ARRAYS * 8 * size * size, k, "float64 work arrays")
    sigma = _sigma(match[3], spec) if match[3] else size / 4.5

    def build() -> np.ndarray:
        if sigma / _GABOR_OCTAVE < 2:  # below Nyquist: the stripes alias into a pattern of another frequency
            log.warning("bank spec %s: Gabor wavelength %.2f px is below 2 px, so the kernels alias; use "
                        "S >= 6 (e.g. gabor:%dx11) or a larger sigma", shown(spec), sigma / _GABOR_OCTAVE, k)
        y, x = np.mgrid[:size, :size].astype(np.float64) - (size - 1) / 2
        bank = np.empty((k, size, size), np.float32)
        for first in range(0, k, chunk):
            bank[first : first + chunk] = _gabor_chunk(x, y, range(first, min(k, first + chunk)), k, sigma)
        return bank

    return _Plan((k, size, size), build)


def _gabor_chunk(x: np.ndarray, y: np.ndarray, indices: range, k: int, sigma: float) -> np.ndarray:
    """Gabor kernels number `indices` of `k` (orientation i*pi/k), float64, zero-mean and unit-norm."""
    wavelength = sigma / _GABOR_OCTAVE
    gamma = 0.5  # envelope aspect ratio, as in V1 models
    cos = np.array([math.cos(i * math.pi / k) for i in indices])[:, None, None]
    sin = np.array([math.sin(i * math.pi / k) for i in indices])[:, None, None]
    xr = x * cos + y * sin
    yr = -x * sin + y * cos
    yr *= gamma
    yr **= 2
    envelope = xr**2
    envelope += yr
    del yr
    envelope /= -(2 * sigma**2)
    np.exp(envelope, out=envelope)
    xr *= 2 * math.pi
    xr /= wavelength
    kernel = np.cos(xr, out=xr)
    kernel *= envelope
    # Remove the DC response under the envelope (flat regions give 0), keeping the kernel local, and
    # normalise; twice, because for a narrow envelope (small sigma) what remains after the first pass
    # is far smaller than the rounding left in its sum.
    weight = envelope.sum(axis=(1, 2), keepdims=True)
    for _ in range(2):
        kernel -= envelope * (kernel.sum(axis=(1, 2), keepdims=True) / weight)
        kernel /= np.sqrt((kernel**2).sum(axis=(1, 2), keepdims=True))
    return kernel


def _gaussian(args: str, spec: str) -> _Plan:
    match = re.fullmatch(rf"{_INT}(?::{_FLOAT})?", args)
    if match is None:
        raise BankError(f"bank spec {shown(spec)}: expected gaussian:S[:sigma]")
    (size,) = _sizes(spec, match[1])
    rows = _work_chunk(spec, 4 * size * size, 8 * size, size, "float64 work rows")
    # OpenCV's default sigma for a given size, so `gaussian:5` matches cv2.getGaussianKernel(5, 0)
    sigma = _sigma(match[2], spec) if match[2] else 0.3 * ((size - 1) * 0.5 - 1) + 0.8

    def build() -> np.ndarray:
        g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
        g /= g.sum()  # the outer product then sums to 1
        kernel = np.empty((1, size, size), np.float32)
        for first in range(0, size, rows):
            kernel[0, first : first + rows] = np.outer(g[first : first + rows], g)
        return kernel

    return _Plan((1, size, size), build)


def _box(args: str, spec: str) -> _Plan:
    match = re.fullmatch(_INT, args)
    if match is None:
        raise BankError(f"bank spec {shown(spec)}: expected box:S")
    (size,) = _sizes(spec, match[1])
    _check_budget(spec, 4 * size * size)
    return _Plan((1, size, size), lambda: np.full((1, size, size), 1.0 / (size * size), np.float32))


def _fixed(kernels: list[list[list[float]]]) -> Callable[[str, str], _Plan]:
    array = np.array(kernels, np.float64)
    array.flags.writeable = False  # shared by every plan; _as_bank copies it to float32

    def plan(args: str, spec: str) -> _Plan:
        if args:
            raise BankError(f"bank spec {shown(spec)}: {spec.partition(':')[0]} takes no arguments")
        return _Plan(array.shape, lambda: array)

    return plan


# name -> planner(args after the first ':', whole spec); each plans a (K, kh, kw[, C]) array
_BUILDERS: dict[str, Callable[[str, str], _Plan]] = {
    "random": _random,
    "gabor": _gabor,
    # correlation responses: positive where brightness grows to the right (x) / downwards (y)
    "sobel": _fixed([[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]]),
    "gaussian": _gaussian,
    "laplacian": _fixed([[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]),
    "box": _box,
}
BANK_NAMES = tuple(_BUILDERS)


_MAX_DIGITS = 15  # no size, count or seed needs more; int() of thousands of digits is slow, then refused


def _sizes(spec: str, *texts: str, least: int = 1) -> tuple[int, ...]:
    if max(len(text) for text in texts) > _MAX_DIGITS:
        raise BankError(f"bank spec {shown(spec)}: numbers must have at most {_MAX_DIGITS} digits")
    values = tuple(int(text) for text in texts)
    if min(values) < least:
        raise BankError(f"bank spec {shown(spec)}: sizes and counts must be >= {least}, got {min(values)}")
    return values


def _sigma(text: str, spec: str) -> float:
    value = float(text)
    # below 0.1 px the envelope underflows to a single pixel; above 1e4 it is flat for any kernel size
    if not 0.1 <= value <= 1e4:
        raise BankError(f"bank spec {shown(spec)}: sigma {clipped(text, 40)} must lie between 0.1 and 10000")
    return value


def _check_budget(spec: str, nbytes: int, counted: str = "") -> int:
    """Refuse a named bank from its spec alone, before any work, if building it needs over the budget;
    return the budget."""
    budget = Config().memory_budget
    if nbytes > budget:
        detail = f" (the float32 bank and {counted})" if counted else ""
        raise BudgetExceeded(
            f"kernel bank {clipped(spec)} needs {nbytes} bytes{detail}, more than memory_budget={budget}"
        )
    return budget


def _work_chunk(spec: str, bank_bytes: int, item_bytes: int, items: int, counted: str) -> int:
    """How many items (kernels, rows) a builder computes at a time in float64 beside its float32 bank:
    as many as _WORK_BYTES and the rest of the budget hold, at least one (else BudgetExceeded)."""
    budget = _check_budget(spec, bank_bytes + item_bytes, counted)
    return max(1, min(items, _WORK_BYTES // item_bytes, (budget - bank_bytes) // item_bytes))


def _as_bank(array: np.ndarray, where: str) -> np.ndarray:
    """Check a loaded array and return it as a C-contiguous float32 (K, kh, kw[, C]) bank."""
    if array.dtype.kind not in "iuf":
        raise BankError(
            f"{where} has dtype {clipped(array.dtype, 40)}; a bank must be a real (integer or float) array"
        )
    if array.ndim == 2:
        array = array[None]
    if array.ndim not in (3, 4):
        shape = clipped(array.shape, 80)
        raise BankError(f"{where} has shape {shape}; expected (K, kh, kw) or (K, kh, kw, C)")
    if 0 in array.shape:
        raise BankError(f"{where} is empty: shape {array.shape}")
    problem = first_non_finite(array)
    if problem is not None:
        raise BankError(f"{where} contains {problem}")
    peak = float32_overflow(array)
    if peak is not None:
        raise BankError(f"{where} has values beyond the float32 range (max |value| {peak:.3g})")
    return np.ascontiguousarray(array, dtype=np.float32)


# zipfile raises NotImplementedError for an unknown compression method, RuntimeError for an encrypted member
_UNREADABLE = (ValueError, EOFError, OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError)
_LISTED_MEMBERS = 5  # names an error lists of an archive holding several arrays


def _fits(where: str, budget: int) -> Callable[[tuple[int, ...], np.dtype], None]:
    """The check read_npy makes before allocating: the array as stored plus its float32 copy."""

    def check(shape: tuple[int, ...], dtype: np.dtype) -> None:
        count = math.prod(shape)
        need = count * dtype.itemsize + (0 if dtype == np.float32 else 4 * count)
        if need > budget:
            raise BudgetExceeded(
                f"{where} needs {need} bytes to load (shape {clipped(shape, 60)} of {clipped(dtype, 40)} "
                f"and its float32 copy), more than memory_budget={budget}"
            )

    return check


def _from_npz(handle: BinaryIO, where: str, budget: int) -> tuple[np.ndarray, str]:
    """The bank member of an .npz archive (the only one, or 'kernels'), read through read_npy."""
    with zipfile.ZipFile(handle) as archive:
        members = {info.filename.removesuffix(".npy"): info for info in archive.infolist()}
        if "kernels" in members:
            name = "kernels"
        elif len(members) == 1:
            (name,) = members
        elif not members:
            raise BankError(f"{where} holds no arrays")
        else:
            names = ", ".join(clipped(n, 40) for n in list(members)[:_LISTED_MEMBERS])
            many = len(members) > _LISTED_MEMBERS
            listed = f"{len(members)} arrays ({names}, ...)" if many else f"arrays {names}"
            raise BankError(f"{where} holds {listed}; name the bank 'kernels'")
        info = members[name]
        where = f"{where} (array {shown(name, 40)})"
        # a compressed member can inflate far beyond the file's size: its stated size is checked first,
        # its header next (read_npy), and a stream that ends early or fails its CRC is an error
        if info.file_size > budget:
            raise BudgetExceeded(f"{where} is larger than memory_budget={budget} bytes")
        with archive.open(info) as stream:
            return read_npy(stream, where, info.file_size, BankError, _fits(where, budget)), where


def _load_file(path: Path) -> np.ndarray:
    where = f"kernel bank file {shown(path)}"
    suffix = path.suffix.lower()
    budget = Config().memory_budget
    with open_regular(path, where, BankError, BankNotFound) as handle:
        try:
            if suffix == ".npz":
                array, where = _from_npz(handle, where, budget)
            else:
                size = os.fstat(handle.fileno()).st_size
                array = read_npy(handle, where, size, BankError, _fits(where, budget))
        except RmidlError:
            raise
        except _UNREADABLE as error:
            detail = clipped(error) or type(error).__name__
            raise BankError(f"{where} is not a valid {suffix} file: {detail}") from None
    return _as_bank(array, where)


def load_kernels(spec: str | os.PathLike[str] | np.ndarray) -> np.ndarray:
    """Return the float32 bank (K, kh, kw) or (K, kh, kw, C) named by `spec`.

    Grammar (numbers are decimal; ``x`` separates sizes; a bank is the same for the same spec):

    - ``PATH.npy`` / ``PATH.npz`` -- a saved array (npz: its only array, or the one named ``kernels``);
      never unpickled. A 2-D array is one kernel (K = 1). The layout is (K, kh, kw, C): convert PyTorch's
      (K, C, kh, kw) weights with ``np.moveaxis(w, 1, -1)``.
    - ``random:KxHxW[:SEED]`` or ``random:KxHxWxC[:SEED]`` -- normal values with std 1/sqrt(H·W·C),
      seeded (default seed 0).
    - ``gabor:K[xS][:SIGMA]`` -- K zero-mean, unit-norm SxS Gabor kernels (S >= 3, default 11; sigma
      default S/4.5; wavelength sigma/0.56, aspect 0.5) at orientations k·π/K from the column axis.
    - ``sobel`` -- 2 kernels 3x3: d/dx then d/dy (positive where brightness grows right / down, under
      correlation).
    - ``gaussian:S[:SIGMA]`` -- 1 kernel SxS summing to 1 (sigma default 0.3·((S-1)/2 - 1) + 0.8,
      as OpenCV).
    - ``laplacian`` -- 1 kernel 3x3, 4-neighbour.
    - ``box:S`` -- 1 kernel SxS of 1/S².

    A numpy array is checked and converted the same way as a file's content. Raises BankError naming the
    spec or file (unknown name, malformed number, not a regular file, invalid file or a header claiming
    more data than it holds, wrong ndim, empty, NaN/Inf, bad dtype; a missing file is BankNotFound, also
    a FileNotFoundError) and BudgetExceeded, before any work, when loading or building needs more than
    Config().memory_budget (a file: its data plus the float32 copy; a spec: the bank plus one chunk of
    the builder's float64 work).
    """
    if isinstance(spec, np.ndarray):
        return _as_bank(spec, "kernel bank array")
    if isinstance(spec, os.PathLike):
        return _load_file(Path(spec))
    if not isinstance(spec, str):
        raise BankError(f"kernel bank spec must be a string, path or array, got {type(spec).__name__}")
    text = spec.strip()
    if text.lower().endswith((".npy", ".npz")):
        return _load_file(Path(text).expanduser())
    bank = _plan(text).build()
    log.debug("built bank %s with shape %s", text, bank.shape)
    return _as_bank(bank, f"kernel bank {shown(text)}")


def bank_shape(spec: str | os.PathLike[str] | np.ndarray) -> tuple[int, ...] | None:
    """The shape load_kernels(spec) returns, from a named spec alone (parsed and checked against the
    budget as load_kernels does, nothing built), so that what depends on it is checked first; an array's
    own shape (2-D as one kernel); None for a file, whose header load_kernels reads bounded."""
    if isinstance(spec, np.ndarray):
        return (1, *spec.shape) if spec.ndim == 2 else tuple(spec.shape)
    if isinstance(spec, os.PathLike) or not isinstance(spec, str):
        return None
    text = spec.strip()
    return None if text.lower().endswith((".npy", ".npz")) else _plan(text).shape


def _plan(text: str) -> _Plan:
    name, _, args = text.partition(":")
    planner = _BUILDERS.get(name.lower())
    if planner is None:
        raise BankError(
            f"unknown kernel bank {shown(text)}: expected a .npy/.npz file or one of {', '.join(BANK_NAMES)}"
        )
    return planner(args, text)


def describe_bank(spec: str | os.PathLike[str] | np.ndarray) -> str:
    """One line for CLI summaries, e.g. ``sobel: 2 kernels 3x3, float32, 72 B, values in [-2, 2]``."""
    bank = load_kernels(spec)
    k, kh, kw = bank.shape[:3]
    channels = f" of {bank.shape[3]} channels" if bank.ndim == 4 else ""
    name = "array" if isinstance(spec, np.ndarray) else str(spec).strip()
    return (
        f"{name}: {k} kernel{'s' if k != 1 else ''} {kw}x{kh}{channels}, float32, "  # sizes W x H
        f"{_human_bytes(bank.nbytes)}, values in [{bank.min():.3g}, {bank.max():.3g}]"
    )


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"
