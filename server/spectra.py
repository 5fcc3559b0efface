"""The kernel spectra a worker keeps beside its cached banks, so the fft engine transforms a bank once per FFT
size for all the tasks that use it, not once per task."""

from __future__ import annotations

import weakref

from rmidl.kernels import SPECTRA_CACHE_BYTES, KernelSpectra
from rmidl.remote.blobs import Blob

from .cache import LruCache

__all__ = ["BankSpectra"]


class BankSpectra:
    """One `KernelSpectra` per bank blob of a blob cache: made at the bank's first task, bounded by what the
    cache has room for beside the bank (and by SPECTRA_CACHE_BYTES), counted in the cache's bytes as it
    grows (`count`), and dropped with its blob: it lives as long as the blob does (in the cache or in a task
    still running). Not locked: its owner holds a lock around it, as around the cache."""

    def __init__(self, blobs: LruCache[str, Blob]) -> None:
        self._blobs = blobs
        self._spectra: weakref.WeakKeyDictionary[Blob, KernelSpectra] = weakref.WeakKeyDictionary()

    def __len__(self) -> int:
        return len(self._spectra)

    def of(self, blob: Blob) -> KernelSpectra:
        """The spectra of a bank blob (empty until the fft engine fills them)."""
        spectra = self._spectra.get(blob)
        if spectra is None:
            room = max(0, min(SPECTRA_CACHE_BYTES, self._blobs.max_bytes - blob.nbytes))
            spectra = self._spectra[blob] = KernelSpectra(blob.arrays["bank"], max_bytes=room)
        return spectra

    def count(self, blob_id: str, blob: Blob, spectra_bytes: int) -> list[Blob]:
        """Count the bank's spectra (`spectra_bytes`, read from them outside the lock) in the cache's bytes
        while `blob_id` still holds `blob`; return the blobs evicted to make room."""
        return self._blobs.resize(blob_id, blob, blob.nbytes + spectra_bytes)
