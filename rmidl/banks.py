"""Kernel banks: load (K, kh, kw[, C]) float32 banks from .npy/.npz files or build named ones from a spec."""

from __future__ import annotations

import logging
import math
import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from rmidl._files import open_failure
from rmidl.config import Config
from rmidl.errors import BankError, BudgetExceeded, RmidlError
from rmidl.validate import first_non_finite, float32_overflow

__all__ = ["BANK_NAMES", "describe_bank", "load_kernels"]

log = logging.getLogger(__name__)

_INT = r"(\d+)"
_FLOAT = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"


def _random(args: str, spec: str) -> np.ndarray:
    match = re.fullmatch(rf"{_INT}[xX]{_INT}[xX]{_INT}(?:[xX]{_INT})?(?::(\d+))?", args)
    if match is None:
        raise BankError(f"bank spec {spec!r}: expected random:KxHxW[:seed] or random:KxHxWxC[:seed]")
    k, h, w = _sizes(spec, match[1], match[2], match[3])
    c = _sizes(spec, match[4])[0] if match[4] else None
    shape = (k, h, w) if c is None else (k, h, w, c)
    _check_budget(spec, math.prod(shape))
    seed = int(match[5]) if match[5] else 0
    # scaled so that a kernel's response to unit-variance input has unit variance, like He/Glorot init
    scale = np.float32(1.0 / math.sqrt(h * w * (c or 1)))
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * scale


def _gabor(args: str, spec: str) -> np.ndarray:
    match = re.fullmatch(rf"{_INT}(?:[xX]{_INT})?(?::{_FLOAT})?", args)
    if match is None:
        raise BankError(f"bank spec {spec!r}: expected gabor:K[xS][:sigma]")
    k, size = _sizes(spec, match[1], match[2] or "11")
    if size < 3:  # 1x1 is all zero once zero-mean; 2x2 at orientation 0 is constant, so zero too
        raise BankError(f"bank spec {spec!r}: Gabor kernels need a size S >= 3, got {size}")
    _check_budget(spec, k * size * size)
    sigma = _sigma(match[3], spec) if match[3] else size / 4.5
    wavelength = sigma / 0.56  # one-octave bandwidth
    gamma = 0.5  # envelope aspect ratio, as in V1 models
    y, x = np.mgrid[:size, :size].astype(np.float64) - (size - 1) / 2
    bank = np.empty((k, size, size), np.float64)
    for i in range(k):
        theta = i * math.pi / k
        xr = x * math.cos(theta) + y * math.sin(theta)
        yr = -x * math.sin(theta) + y * math.cos(theta)
        envelope = np.exp(-(xr**2 + (gamma * yr) ** 2) / (2 * sigma**2))
        kernel = envelope * np.cos(2 * math.pi * xr / wavelength)
        # Remove the DC response under the envelope (flat regions give 0), keeping the kernel local, and
        # normalise; twice, because for a narrow envelope (small sigma) what remains after the first pass
        # is far smaller than the rounding left in its sum.
        for _ in range(2):
            kernel -= envelope * (kernel.sum() / envelope.sum())
            kernel /= math.sqrt(float((kernel**2).sum()))
        bank[i] = kernel
    return bank


def _gaussian(args: str, spec: str) -> np.ndarray:
    match = re.fullmatch(rf"{_INT}(?::{_FLOAT})?", args)
    if match is None:
        raise BankError(f"bank spec {spec!r}: expected gaussian:S[:sigma]")
    (size,) = _sizes(spec, match[1])
    _check_budget(spec, size * size)
    # OpenCV's default sigma for a given size, so `gaussian:5` matches cv2.getGaussianKernel(5, 0)
    sigma = _sigma(match[2], spec) if match[2] else 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    kernel = np.outer(g, g)
    return (kernel / kernel.sum())[None]


def _box(args: str, spec: str) -> np.ndarray:
    match = re.fullmatch(_INT, args)
    if match is None:
        raise BankError(f"bank spec {spec!r}: expected box:S")
    (size,) = _sizes(spec, match[1])
    _check_budget(spec, size * size)
    return np.full((1, size, size), 1.0 / (size * size))


def _fixed(kernels: list[list[list[float]]]) -> Callable[[str, str], np.ndarray]:
    def build(args: str, spec: str) -> np.ndarray:
        if args:
            raise BankError(f"bank spec {spec!r}: {spec.partition(':')[0]} takes no arguments")
        return np.array(kernels, np.float64)

    return build


# name -> builder(args after the first ':', whole spec); each returns a (K, kh, kw[, C]) array
_BUILDERS: dict[str, Callable[[str, str], np.ndarray]] = {
    "random": _random,
    "gabor": _gabor,
    # correlation responses: positive where brightness grows to the right (x) / downwards (y)
    "sobel": _fixed([[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]]),
    "gaussian": _gaussian,
    "laplacian": _fixed([[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]),
    "box": _box,
}
BANK_NAMES = tuple(_BUILDERS)


def _sizes(spec: str, *texts: str) -> tuple[int, ...]:
    values = tuple(int(text) for text in texts)
    if min(values) < 1:
        raise BankError(f"bank spec {spec!r}: sizes and counts must be >= 1, got {min(values)}")
    return values


def _sigma(text: str, spec: str) -> float:
    value = float(text)
    # below 0.1 px the envelope underflows to a single pixel; above 1e4 it is flat for any kernel size
    if not 0.1 <= value <= 1e4:
        raise BankError(f"bank spec {spec!r}: sigma {text} must lie between 0.1 and 10000")
    return value


def _check_budget(what: str, elements: int) -> None:
    budget = Config().memory_budget
    if elements * 4 > budget:
        raise BudgetExceeded(
            f"kernel bank {what} needs {elements * 4} bytes, more than memory_budget={budget}"
        )


def _as_bank(array: np.ndarray, where: str) -> np.ndarray:
    """Check a loaded array and return it as a C-contiguous float32 (K, kh, kw[, C]) bank."""
    if array.dtype.kind not in "iuf":
        raise BankError(f"{where} has dtype {array.dtype}; a bank must be a real (integer or float) array")
    if array.ndim == 2:
        array = array[None]
    if array.ndim not in (3, 4):
        raise BankError(f"{where} has shape {array.shape}; expected (K, kh, kw) or (K, kh, kw, C)")
    if 0 in array.shape:
        raise BankError(f"{where} is empty: shape {array.shape}")
    problem = first_non_finite(array)
    if problem is not None:
        raise BankError(f"{where} contains {problem}")
    peak = float32_overflow(array)
    if peak is not None:
        raise BankError(f"{where} has values beyond the float32 range (max |value| {peak:.3g})")
    return np.ascontiguousarray(array, dtype=np.float32)


def _from_npz(handle: BinaryIO, where: str, budget: int) -> tuple[np.ndarray, str]:
    with np.load(handle, allow_pickle=False) as archive:
        names = list(archive.files)
        if "kernels" in names:
            name = "kernels"
        elif len(names) == 1:
            name = names[0]
        elif not names:
            raise BankError(f"{where} holds no arrays")
        else:
            raise BankError(f"{where} holds arrays {', '.join(names)}; name the bank 'kernels'")
        # a compressed member can inflate far beyond the file's size: check before reading it
        size = archive.zip.getinfo(f"{name}.npy").file_size
        if size > budget:
            raise BudgetExceeded(f"{where}: array {name!r} is larger than memory_budget={budget} bytes")
        return archive[name], f"{where} (array {name!r})"


def _load_file(path: Path) -> np.ndarray:
    where = f"kernel bank file {str(path)!r}"
    budget = Config().memory_budget
    try:
        if path.stat().st_size > budget and path.suffix.lower() == ".npy":
            raise BudgetExceeded(f"{where} is larger than memory_budget={budget} bytes")
        # our own handle: np.load leaks the one it opens when a .npz is not a zip file
        with path.open("rb") as handle:
            if path.suffix.lower() == ".npz":
                array, where = _from_npz(handle, where, budget)
            else:
                array = np.load(handle, allow_pickle=False)
    except RmidlError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, KeyError) as error:
        # np.load raises ValueError for pickled (object) data and bad headers, EOFError when empty
        detail = str(error) or type(error).__name__
        if "pickled" in detail:  # numpy's advice to unpickle does not apply: rmidl never does
            detail = "not numpy data (or pickled data, which rmidl never loads)"
        reason = open_failure(error) or f"is not a valid {path.suffix.lower()} file: {detail}"
        raise BankError(f"{where} {reason}") from None
    if not isinstance(array, np.ndarray):
        raise BankError(f"{where} does not hold an array")
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
    spec or file (unknown name, malformed number, missing or invalid file, wrong ndim, empty, NaN/Inf,
    bad dtype) and BudgetExceeded for banks larger than Config().memory_budget.
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
    name, _, args = text.partition(":")
    builder = _BUILDERS.get(name.lower())
    if builder is None:
        raise BankError(
            f"unknown kernel bank {spec!r}: expected a .npy/.npz file or one of {', '.join(BANK_NAMES)}"
        )
    bank = builder(args, text)
    log.debug("built bank %s with shape %s", text, bank.shape)
    return _as_bank(bank, f"kernel bank {text!r}")


def describe_bank(spec: str | os.PathLike[str] | np.ndarray) -> str:
    """One line for CLI summaries, e.g. ``sobel: 2 kernels 3x3, float32, 72 B, values in [-2, 2]``."""
    bank = load_kernels(spec)
    k, kh, kw = bank.shape[:3]
    channels = f"x{bank.shape[3]}" if bank.ndim == 4 else ""
    name = "array" if isinstance(spec, np.ndarray) else str(spec).strip()
    return (
        f"{name}: {k} kernel{'s' if k != 1 else ''} {kh}x{kw}{channels}, float32, "
        f"{_human_bytes(bank.nbytes)}, values in [{bank.min():.3g}, {bank.max():.3g}]"
    )


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"
