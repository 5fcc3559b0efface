"""Shared-memory data plane on one host: arrays in POSIX shared memory that only names and slices describe."""

from __future__ import annotations

# CPython's own POSIX shm binding (what multiprocessing.shared_memory uses): opening through it lets a
# worker attach without registering with the resource tracker, which on Python < 3.13 would unlink the
# coordinator's block when the worker exits and warn about a "leak".
import _posixshmem  # type: ignore[import-not-found]
import contextlib
import logging
import math
import mmap
import os
import re
import secrets
import socket
from functools import cache
from multiprocessing import resource_tracker
from typing import Any

import numpy as np

from rmidl.errors import ClusterError, ShapeError
from rmidl.remote.wire import DTYPES, wire_nbytes

__all__ = ["NAME_PREFIX", "SharedArray", "host_id"]

logger = logging.getLogger(__name__)

NAME_PREFIX = "rmidl_"
_NAME = re.compile(r"^rmidl_[A-Za-z0-9_]{1,200}$")


@cache
def host_id() -> str:
    """Equal on two processes exactly when they share a kernel (hence /dev/shm): hostname + boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


class SharedArray:
    """A numpy array in a POSIX shared-memory block: `create` owns (and unlinks) it, `attach` borrows it."""

    def __init__(
        self, name: str, shape: tuple[int, ...], dtype: str, buffer: mmap.mmap, *, owner: bool
    ) -> None:
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.owner = owner
        self._mmap: mmap.mmap | None = buffer
        # frombuffer keeps a memoryview (a buffer export) as base, so mmap.close() refuses while any view
        # lives; np.ndarray(buffer=...) would not, and its views would then point at unmapped memory.
        count = math.prod(shape)
        self._array: np.ndarray | None = np.frombuffer(buffer, DTYPES[dtype], count).reshape(shape)

    @classmethod
    def create(cls, shape: tuple[int, ...] | list[int], dtype: str | np.dtype = "float32") -> SharedArray:
        """A new zero-filled block for a float32/float64 array of `shape`, owned by the caller."""
        dims = [int(n) for n in shape]
        descriptor: dict[str, Any] = {"name": "", "shape": dims, "dtype": np.dtype(dtype).name}
        nbytes = _checked_nbytes(descriptor)
        name = f"{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(8)}"
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, max(nbytes, 1))
            buffer = mmap.mmap(fd, max(nbytes, 1))
        except OSError:
            _posixshmem.shm_unlink("/" + name)
            raise
        finally:
            os.close(fd)
        # The tracker unlinks the block if this process dies before close().
        resource_tracker.register("/" + name, "shared_memory")
        return cls(name, tuple(descriptor["shape"]), descriptor["dtype"], buffer, owner=True)

    @classmethod
    def attach(cls, descriptor: dict[str, Any]) -> SharedArray:
        """Map an existing block named by `descriptor` (from `.descriptor()`); never unlinks it."""
        nbytes = _checked_nbytes(descriptor)
        name = descriptor.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ShapeError(f"shared memory name {name!r} is not an rmidl block name")
        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        except FileNotFoundError:
            raise ShapeError(f"shared memory block {name!r} does not exist on this host") from None
        except PermissionError:
            # Another user's block (0600): not the input's fault, a worker run as that user could map it.
            raise ClusterError(
                f"shared memory block {name!r} belongs to another user (run worker and coordinator as one)"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise ShapeError(
                    f"shared memory block {name!r} holds {size} bytes, shape {tuple(descriptor['shape'])} "
                    f"{descriptor['dtype']} needs {nbytes}"
                )
            buffer = mmap.mmap(fd, max(nbytes, 1))
        finally:
            os.close(fd)
        return cls(name, tuple(descriptor["shape"]), descriptor["dtype"], buffer, owner=False)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            raise ValueError(f"shared array {self.name} is closed")
        return self._array

    @property
    def closed(self) -> bool:
        return self._mmap is None

    def exists(self) -> bool:
        """True while the block is still linked (the owner has not closed it)."""
        return os.path.exists(f"/dev/shm/{self.name}")

    def descriptor(self) -> dict[str, Any]:
        """What crosses the wire: {"name", "shape", "dtype"}."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def close(self) -> None:
        """Unmap (and, for the owner, unlink); views still alive keep their memory until they are freed."""
        if self._mmap is None:
            return
        buffer, self._mmap, self._array = self._mmap, None, None
        try:
            buffer.close()
        except BufferError:
            # A caller still holds a view (e.g. the result array): the mapping lives until it is freed.
            logger.debug("shared array %s still has views; unmapped when they go", self.name)
        if self.owner:
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink("/" + self.name)
            resource_tracker.unregister("/" + self.name, "shared_memory")

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "owner" if self.owner else "attached"
        return f"SharedArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, {state})"


def _checked_nbytes(descriptor: dict[str, Any]) -> int:
    if not isinstance(descriptor, dict):
        raise ShapeError(f"expected a shared memory descriptor dict, got {type(descriptor).__name__}")
    return wire_nbytes({"dtype": descriptor.get("dtype"), "shape": descriptor.get("shape")})
