"""Shared-memory data plane on one host: arrays in memfd blocks that nothing can outlive.

A block is an anonymous memory file (`memfd_create`), never a name in /dev/shm: its memory goes when the
last process holding its fd or a mapping lets go, so a coordinator killed with its whole process group
(`timeout -s KILL`, a batch scheduler) leaves nothing behind, and a killed worker only drops its mapping.
Its owner (the coordinator) keeps the fd open; a same-host worker opens the block through
/proc/<owner pid>/fd/<fd>, which the kernel allows only to processes of the owner's user, and only while
the owner holds it. Workers notice the owner closing it (or dying) through `Attachment.owner_holds()`.

Each block is named `rmidl_<first 32 hex digits of sha256(token)>` after a 256-bit token that only its
owner knows and that travels in the task records (the capability): a worker maps a block only for a
request that shows the token whose digest the block is named after, so another local user who can reach
a worker's port cannot make it read or overwrite someone else's job. Blocks are sealed against resizing,
so no process can truncate one under a worker's mapping (SIGBUS).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import math
import mmap
import os
import re
import secrets
import socket
from functools import cache
from typing import Any

import numpy as np

from rmidl.errors import ShapeError, SharedMemoryUnavailable
from rmidl.remote.wire import DTYPES, wire_nbytes

__all__ = ["NAME_PREFIX", "Attachment", "SharedArray", "SharedBlock", "block_name", "host_id"]

logger = logging.getLogger(__name__)

NAME_PREFIX = "rmidl_"
_DIGEST_CHARS = 32
_NAME = re.compile(r"^rmidl_[0-9a-f]{32}$")
_TOKEN = re.compile(r"^[0-9a-f]{64}$")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
POPULATE_WHEN = 0.9
"""A worker fills its page tables for a block at once (MADV_POPULATE_WRITE) once at least this share of it
is allocated: one call (~0.03 s for 462 MB) instead of a minor fault per 4 KiB page as the engine writes
(~0.3 s), which tasks landing on parts of a reused block this worker never touched would pay."""
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python 3.11 lacks the name


@cache
def host_id() -> str:
    """Equal on two processes exactly when they share a kernel (hence memfd blocks): hostname + boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


def block_name(token: str) -> str:
    """The name of the block whose capability is `token`."""
    return NAME_PREFIX + hashlib.sha256(token.encode("ascii")).hexdigest()[:_DIGEST_CHARS]


class SharedBlock:
    """An owner's block: a sealed memfd of `nbytes` and its shared mapping (a `rmidl._memory.Buffer`).

    It lives until `close()`; `descriptor(shape, dtype)` is what a worker needs to map it.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, int(nbytes))
        self.token = secrets.token_hex(32)
        self.name = block_name(self.token)
        self.pid = os.getpid()
        fd = os.memfd_create(self.name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, self.nbytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self.mmap = mmap.mmap(fd, self.nbytes)
        except BaseException:
            os.close(fd)
            raise
        self.fd: int | None = fd

    @property
    def closed(self) -> bool:
        return self.fd is None

    def descriptor(self, shape: tuple[int, ...], dtype: str) -> dict[str, Any]:
        """What crosses the wire for an array of `shape` at the start of this block."""
        if self.fd is None:
            raise ValueError(f"shared block {self.name} is closed")
        return {"name": self.name, "pid": self.pid, "fd": self.fd, "token": self.token,
                "shape": [int(n) for n in shape], "dtype": np.dtype(dtype).name}

    def recycle(self) -> None:
        """Kept for another job as it is: workers keep it mapped, its pages stay warm."""

    def close(self) -> None:
        """Close the fd and unmap; the memory goes once every worker has unmapped it too. A view still
        alive keeps the mapping (BufferError from mmap) — the fd is closed all the same."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        os.close(fd)
        try:
            self.mmap.close()
        except BufferError:
            logger.debug("shared block %s still has views; unmapped when they go", self.name)

    def __repr__(self) -> str:
        return f"SharedBlock({self.name!r}, {self.nbytes} bytes{', closed' if self.closed else ''})"


class Attachment:
    """A worker's mapping of another process's block, checked against the capability before mapping."""

    def __init__(self, descriptor: dict[str, Any]) -> None:
        name, pid, fd = _checked_ref(descriptor)
        self.name, self.pid, self.fd = name, pid, fd
        self._link = f"/memfd:{name} (deleted)"
        try:
            handle = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SharedMemoryUnavailable(
                f"shared memory block {name} is not open in process {pid} on this host (closed, or the "
                "owner is in another pid namespace)"
            ) from None
        except PermissionError:
            raise SharedMemoryUnavailable(
                f"shared memory block {name} belongs to another user's process {pid} (run worker and "
                "coordinator as one user)"
            ) from None
        try:
            if os.readlink(f"/proc/self/fd/{handle}") != self._link:
                raise SharedMemoryUnavailable(f"process {pid}'s fd {fd} is not the shared block {name}")
            if fcntl.fcntl(handle, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
                raise SharedMemoryUnavailable(f"shared block {name} is not sealed against resizing")
            self.nbytes = os.fstat(handle).st_size
            self.mmap = mmap.mmap(handle, self.nbytes)
        except BaseException:
            os.close(handle)
            raise
        self._handle: int | None = handle
        self._populated = False
        self.populate()

    def populate(self) -> None:
        """Fill this mapping's page tables once the block's pages exist (see POPULATE_WHEN); cheap after."""
        handle = self._handle
        if self._populated or handle is None:
            return
        try:
            allocated = os.fstat(handle).st_blocks * 512
        except OSError:  # closed meanwhile (evicted)
            return
        if allocated < POPULATE_WHEN * self.nbytes:
            return  # a fresh block: its writers allocate their parts; a later job populates
        self._populated = True
        try:
            self.mmap.madvise(_MADV_POPULATE_WRITE)
        except (OSError, ValueError) as error:  # an older kernel (only slower), or unmapped meanwhile
            logger.debug("MADV_POPULATE_WRITE not done: %s", error)

    def array(self, descriptor: dict[str, Any]) -> np.ndarray:
        """The array a descriptor of this block names (shape and dtype checked against the block's size)."""
        nbytes = _checked_nbytes(descriptor)
        if nbytes > self.nbytes:
            shape = tuple(descriptor["shape"])
            raise ShapeError(f"shared block {self.name} holds {self.nbytes} bytes; shape {shape} "
                             f"{descriptor['dtype']} needs {nbytes}")
        count = math.prod(descriptor["shape"])
        return np.frombuffer(self.mmap, DTYPES[descriptor["dtype"]], count).reshape(descriptor["shape"])

    def owner_holds(self) -> bool:
        """True while the owner still has the block open (False once it closed it or died)."""
        try:
            return os.readlink(f"/proc/{self.pid}/fd/{self.fd}") == self._link
        except OSError:
            return False

    def close(self) -> None:
        """Unmap (views still alive keep the mapping until they are freed)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            os.close(handle)
        try:
            self.mmap.close()
        except BufferError:
            logger.debug("shared block %s still has views; unmapped when they go", self.name)


class SharedArray:
    """A numpy array in its own block: `create` owns it, `attach` maps someone else's (tests, tools).

    The coordinator's jobs lease blocks from a recycler instead (`rmidl.client.shared`)."""

    def __init__(self, array: np.ndarray, descriptor: dict[str, Any], closer: Any, *, owner: bool) -> None:
        self._array: np.ndarray | None = array
        self._descriptor = descriptor
        self._closer = closer
        self.owner = owner
        self.name: str = descriptor["name"]
        self.shape: tuple[int, ...] = tuple(descriptor["shape"])
        self.dtype: str = descriptor["dtype"]

    @classmethod
    def create(cls, shape: tuple[int, ...] | list[int], dtype: str | np.dtype = "float32") -> SharedArray:
        """A new zero-filled block for a float32/float64 array of `shape`, owned by the caller."""
        dims = tuple(int(n) for n in shape)
        dtype_name = np.dtype(dtype).name
        nbytes = _checked_nbytes({"shape": list(dims), "dtype": dtype_name})
        block = SharedBlock(nbytes)
        array = np.frombuffer(block.mmap, DTYPES[dtype_name], math.prod(dims)).reshape(dims)
        return cls(array, block.descriptor(dims, dtype_name), block, owner=True)

    @classmethod
    def attach(cls, descriptor: dict[str, Any]) -> SharedArray:
        """Map an existing block named by `descriptor` (from `.descriptor()`)."""
        attachment = Attachment(descriptor)
        return cls(attachment.array(descriptor), dict(descriptor), attachment, owner=False)

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            raise ValueError(f"shared array {self.name} is closed")
        return self._array

    @property
    def closed(self) -> bool:
        return self._array is None

    def exists(self) -> bool:
        """True while the owner holds the block open."""
        if isinstance(self._closer, SharedBlock):
            return not self._closer.closed
        return bool(self._closer.owner_holds())

    def descriptor(self) -> dict[str, Any]:
        """What crosses the wire: {"name", "pid", "fd", "token", "shape", "dtype"}."""
        return dict(self._descriptor)

    def close(self) -> None:
        """Unmap (and, for the owner, close the block); views still alive keep their memory until freed."""
        if self._array is None:
            return
        self._array = None
        self._closer.close()

    def __enter__(self) -> SharedArray:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "owner" if self.owner else "attached"
        return f"SharedArray({self.name!r}, shape={self.shape}, dtype={self.dtype}, {state})"


def _checked_ref(descriptor: dict[str, Any]) -> tuple[str, int, int]:
    """(name, pid, fd) of a descriptor whose token is checked against the name (the capability)."""
    _checked_nbytes(descriptor)
    name, pid, fd, token = (descriptor.get(key) for key in ("name", "pid", "fd", "token"))
    if not isinstance(name, str) or not _NAME.match(name):
        raise ShapeError(f"shared memory name {name!r} is not an rmidl block name")
    for what, value in (("pid", pid), ("fd", fd)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if what == "pid" else 0):
            raise ShapeError(f"shared memory descriptor {what}={value!r} is not a valid {what}")
    if not (isinstance(token, str) and _TOKEN.match(token) and hmac.compare_digest(block_name(token), name)):
        # Not an input error: the caller does not hold the block's capability.
        raise SharedMemoryUnavailable(f"shared memory block {name}: the token does not open it")
    assert isinstance(pid, int) and isinstance(fd, int)
    return name, pid, fd


def _checked_nbytes(descriptor: dict[str, Any]) -> int:
    if not isinstance(descriptor, dict):
        raise ShapeError(f"expected a shared memory descriptor dict, got {type(descriptor).__name__}")
    return wire_nbytes({"dtype": descriptor.get("dtype"), "shape": descriptor.get("shape")})
