"""Kernel spectra for the fft engine: computing a bank's, caching them per FFT size (`KernelSpectra`, which
a worker keeps beside each cached bank), and the banks this process keeps for itself.

The process cache: rmidl.correlate called batch after batch with one bank transforms it once per FFT
size, as a worker does. Only banks whose whole spectra a call would hold anyway (one chunk of the fft
plan) are kept, so a call's temporaries stay what the plan promises; all kept banks together stay within
PROCESS_SPECTRA_BYTES, the least recently used dropped first. A bank is known by a digest of its values,
so a caller's array changed in place is a new bank.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from rmidl.errors import OptionError
from rmidl.geometry import split_range
from rmidl.kernels._threads import run_tiles

__all__ = ["PROCESS_BANKS", "PROCESS_SPECTRA_BYTES", "SPECTRA_CACHE_BYTES", "KernelSpectra", "forget_banks",
           "kernel_spectra", "process_spectra"]

SPECTRA_CACHE_BYTES = 256 << 20
"""Default bound of one bank's cached spectra (all FFT sizes together)."""
PROCESS_SPECTRA_BYTES = 128 << 20
"""Bytes of spectra all kept banks may hold together."""
PROCESS_BANKS = 8
"""Banks kept at most."""


def _spectra_bytes(bank: np.ndarray, shape: tuple[int, int]) -> int:
    """Bytes of the complex spectra of bank (K, kh, kw, C) at FFT size `shape`."""
    return bank.shape[0] * bank.shape[3] * shape[0] * (shape[1] // 2 + 1) * 2 * bank.itemsize


def kernel_spectra(kernels: np.ndarray, shape: tuple[int, int], threads: int = 1) -> np.ndarray:
    """Conjugate spectra (fh * (fw//2 + 1), C, K) of kernels (K, kh, kw, C) zero-padded to `shape`.

    The row transform runs on the kh kernel rows only, not on the fh - kh rows of padding zeros. Each
    bin's C x K matrix is contiguous: the per-bin matmuls run ~40 % slower on a transposed one.
    """
    import scipy.fft

    fh, fw = shape
    n_kernels, kh, _, channels = kernels.shape
    half = fw // 2 + 1
    spectra = np.empty((fh, half * channels, n_kernels), np.result_type(kernels.dtype, np.complex64))
    # The column transform of kh non-zero rows is a (fh x kh) @ (kh x the rest) matmul: far cheaper than
    # fh-point FFTs of mostly zeros. Conjugated, as correlation needs: exp(+i...) on conjugated rows.
    angles = (2 * np.pi / fh) * np.outer(np.arange(fh), np.arange(kh))
    dft = (np.cos(angles) + 1j * np.sin(angles)).astype(spectra.dtype)

    def work(part: tuple[int, int], scratch: None) -> None:
        k0, k1 = part
        rows = scipy.fft.rfft(kernels[k0:k1], n=fw, axis=2)  # (k, kh, half, C)
        np.conjugate(rows, out=rows)
        spectra[:, :, k0:k1] = np.matmul(dft, rows.reshape(k1 - k0, kh, half * channels)).transpose(1, 2, 0)

    # Parts of at most a quarter of the bank: each part's spectra are a temporary before they are placed.
    run_tiles(split_range(n_kernels, max(4, threads)), work, lambda: None, threads)
    return spectra.reshape(fh * half, channels, n_kernels)


class KernelSpectra:
    """One bank's kernel spectra, cached per FFT size (least recently used first out, bounded in bytes).

    A worker keeps one beside each cached bank and passes it (or `select(k0, k1)` of it for a kernel
    group) to `correlate_valid_batch`; safe to share between threads.
    """

    def __init__(self, kernels: np.ndarray, max_bytes: int = SPECTRA_CACHE_BYTES) -> None:
        self.kernels = kernels
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._parent = self
        self._k0 = 0

    def select(self, k0: int, k1: int) -> KernelSpectra:
        """The spectra of kernels [k0, k1), sharing this bank's cache."""
        if not 0 <= k0 < k1 <= self.kernels.shape[0]:
            raise OptionError(f"kernels [{k0}, {k1}) are not in a bank of {self.kernels.shape[0]}")
        view = KernelSpectra.__new__(KernelSpectra)
        view.kernels, view.max_bytes = self.kernels[k0:k1], self.max_bytes
        view._parent, view._k0 = self._parent, self._k0 + k0
        return view

    @property
    def nbytes(self) -> int:
        """Bytes of spectra held now."""
        parent = self._parent
        with parent._lock:
            return sum(s.nbytes for s in parent._cache.values())

    def matches(self, kernels: np.ndarray) -> bool:
        """True if these are the spectra of `kernels` (same shape, dtype, and the very same values)."""
        mine = self.kernels
        if mine.shape != kernels.shape or mine.dtype != kernels.dtype:
            return False
        same_view = mine.ctypes.data == kernels.ctypes.data and mine.strides == kernels.strides
        return same_view or np.array_equal(mine, kernels)

    def keeps(self, shape: tuple[int, int]) -> bool:
        """Whether the whole bank's spectra at FFT size `shape` fit this cache (else made aside per chunk)."""
        bank = self._parent.kernels
        return _spectra_bytes(bank, shape) <= self._parent.max_bytes

    def chunk(self, shape: tuple[int, int], k0: int, k1: int, threads: int = 1) -> np.ndarray:
        """Spectra (bins, C, k1 - k0) of kernels [k0, k1) of this selection; computed aside if too big."""
        parent, start = self._parent, self._k0
        k0, k1 = start + k0, start + k1
        bank = parent.kernels
        if _spectra_bytes(bank, shape) > parent.max_bytes:
            return kernel_spectra(bank[k0:k1], shape, threads)
        with parent._lock:
            spectra = parent._cache.get(shape)
            if spectra is None:
                spectra = kernel_spectra(bank, shape, threads)
                parent._cache[shape] = spectra
                while sum(s.nbytes for s in parent._cache.values()) > parent.max_bytes:
                    parent._cache.popitem(last=False)
            else:
                parent._cache.move_to_end(shape)
        return spectra[:, :, k0:k1]


_lock = threading.Lock()
_banks: OrderedDict[str, KernelSpectra] = OrderedDict()


def process_spectra(kernels: np.ndarray) -> KernelSpectra:
    """The process's KernelSpectra of `kernels` (K, kh, kw, C): made on first use, then shared."""
    bank = np.ascontiguousarray(kernels)
    digest = hashlib.blake2b(bank.data, digest_size=16)
    digest.update(f"{bank.shape}{bank.dtype.str}".encode())
    key = digest.hexdigest()
    with _lock:
        spectra = _banks.get(key)
        if spectra is None:
            copy = bank.copy()  # ours: the caller may change theirs
            copy.flags.writeable = False
            spectra = _banks[key] = KernelSpectra(copy, max_bytes=PROCESS_SPECTRA_BYTES)
        _banks.move_to_end(key)
        while len(_banks) > PROCESS_BANKS or (
                len(_banks) > 1 and sum(s.nbytes for s in _banks.values()) > PROCESS_SPECTRA_BYTES):
            _banks.popitem(last=False)
    return spectra


def forget_banks() -> None:
    """Drop every kept bank's spectra (their memory goes with the last call using them)."""
    with _lock:
        _banks.clear()
