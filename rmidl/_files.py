"""Files in and out, the same way for every rmidl reader and writer: regular files only (a FIFO or a
device never hangs a read), array headers checked against the bytes behind them before allocating,
writes through a temporary sibling renamed on success, and file names kept short in one-line errors."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import secrets
import stat
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, BinaryIO

import numpy as np

from rmidl.errors import InputError

__all__ = ["atomic_write", "clipped", "open_failure", "open_regular", "read_npy", "read_npz", "read_small",
           "shown"]

SHOWN_CHARS = 200
"""Longest rendering of a user's string (path, spec, decoder message) inside a one-line error."""

_REASONS: tuple[tuple[type[OSError], str], ...] = (
    (FileNotFoundError, "does not exist"),
    (IsADirectoryError, "is a directory"),
    (NotADirectoryError, "does not exist (a parent is not a directory)"),
    (PermissionError, "cannot be read: permission denied"),
)
_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "is a directory"),
    (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file"),
    (stat.S_ISCHR, "is a character device, not a regular file"),
    (stat.S_ISBLK, "is a block device, not a regular file"),
    (stat.S_ISSOCK, "is a socket, not a regular file"),
)


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """repr() of str(value), cut in the middle to `limit` characters (a file's name is at its end)."""
    return clipped(repr(os.fspath(value) if isinstance(value, os.PathLike) else str(value)), limit)


def clipped(text: object, limit: int = SHOWN_CHARS) -> str:
    """str(text) on one line, cut in the middle to `limit` characters: a decoder's message, a shape."""
    line = " ".join(str(text).split())
    if len(line) <= limit:
        return line
    keep = max(1, (limit - 3) // 2)
    return f"{line[:keep]}...{line[-keep:]}"


def open_failure(error: BaseException) -> str | None:
    """The reason to append to a file's name for a missing, directory or forbidden path; None otherwise."""
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return None


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    for is_kind, reason in _KINDS:
        if is_kind(mode):
            return reason
    return "is not a regular file"


def open_regular(
    path: str | os.PathLike[str],
    where: str,
    error: type[Exception] = InputError,
    missing: type[Exception] | None = None,
) -> BinaryIO:
    """Open `path` for reading if it is a regular file; otherwise raise `error(f"{where} <reason>")`.

    O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer, and the check is made
    on the opened descriptor (fstat), so the file cannot be swapped between check and read. A missing
    path raises `missing` (e.g. a class that is also a FileNotFoundError) when given.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError as failure:
        kind = missing if missing is not None and isinstance(failure, FileNotFoundError) else error
        if failure.errno == errno.ENXIO:  # a socket file, which open() refuses
            reason = _kind_of(path) or "cannot be opened: no such device"
        else:
            reason = open_failure(failure) or f"cannot be opened: {failure.strerror or failure}"
        refused = kind(f"{where} {reason}")
        if isinstance(refused, FileNotFoundError):
            refused.errno, refused.strerror = failure.errno, failure.strerror
            refused.filename = failure.filename
        raise refused from None
    try:
        problem = _not_regular(os.fstat(descriptor).st_mode)
        if problem is not None:
            raise error(f"{where} {problem}")
        # A regular file ignores O_NONBLOCK, so it stays set: even a pseudo-file (/proc) cannot block.
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def _kind_of(path: str | os.PathLike[str]) -> str | None:
    try:
        return _not_regular(os.stat(path).st_mode)
    except OSError:
        return None


def read_small(
    path: str | os.PathLike[str],
    where: str,
    max_bytes: int,
    error: type[Exception] = InputError,
    missing: type[Exception] | None = None,
) -> bytes:
    """All of a regular file of at most `max_bytes` bytes (a secret, a settings file); else `error`.

    Reads one byte past the cap rather than trusting st_size, which pseudo-files report as 0.
    """
    with open_regular(path, where, error, missing) as handle:
        try:
            data = handle.read(max_bytes + 1)
        except OSError as failure:
            raise error(f"{where} cannot be read: {failure.strerror or failure}") from None
    if len(data) > max_bytes:
        raise error(f"{where} is larger than {max_bytes} bytes")
    return data


def read_npy(
    handle: IO[bytes],
    where: str,
    available: int,
    error: type[Exception] = InputError,
    check: Callable[[tuple[int, ...], np.dtype], None] | None = None,
) -> np.ndarray:
    """The array of the .npy stream at `handle` (`available` bytes from here), refused before allocating
    when its header claims more data than there is, holds Python objects, or fails `check(shape, dtype)`.

    np.load would allocate whatever a header claims (a traceback for a short file with a huge shape)
    and only then find the data missing.
    """
    fmt = np.lib.format
    origin = handle.tell()
    try:
        version = fmt.read_magic(handle)
    except ValueError:
        reason = "it is empty" if available == 0 else "not numpy data (no .npy header)"
        raise error(f"{where} is not a valid .npy file: {reason}") from None
    try:
        # versions 2.0 and 3.0 share a layout (3.0 only allows UTF-8 in field names)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(handle)
    except (ValueError, EOFError, OSError) as failure:
        raise error(f"{where} is not a valid .npy file: {clipped(failure)}") from None
    data_bytes = available - (handle.tell() - origin)
    if dtype.hasobject:
        raise error(f"{where} holds Python objects (pickled data), which rmidl never loads")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > data_bytes:
        raise error(
            f"{where} is truncated or lies: its header claims shape {clipped(shape, 60)} of "
            f"{clipped(dtype, 40)} ({nbytes} bytes), but {max(data_bytes, 0)} bytes of data follow it"
        )
    if check is not None:
        check(tuple(shape), dtype)
    flat = np.empty(count, dtype)
    _read_into(handle, flat.view(np.uint8).data, where, error)
    return flat.reshape(shape, order="F" if fortran else "C")


def read_npz(path: str | os.PathLike[str], where: str, *, max_bytes: int) -> dict[str, np.ndarray]:
    """Every array of the .npz archive at `path` (a regular file; members never unpickled; their total
    unpacked size at most `max_bytes`, checked before any is read); one-line InputErrors otherwise."""
    try:
        # our own handle: np.load leaks the one it opens when the file is not a zip
        with open_regular(path, where) as handle:
            archive = np.load(handle, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise InputError(f"{where} is a single array (.npy), not an .npz archive")
            with archive:
                # a compressed member can inflate far beyond the file's size: check before reading it
                members: list[zipfile.ZipInfo] = archive.zip.infolist() if archive.zip else []
                if sum(info.file_size for info in members) > max_bytes:
                    raise InputError(f"{where} is larger than memory_budget={max_bytes} bytes")
                return {name: archive[name] for name in archive.files}
    except InputError:
        raise
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, KeyError) as failure:
        detail = str(failure) or type(failure).__name__
        if "pickle" in detail:  # numpy's "Object arrays cannot be loaded when allow_pickle=False"
            detail = "it holds pickled data, which rmidl never loads"
        raise InputError(f"{where} {open_failure(failure) or f'is not a valid .npz file: {clipped(detail)}'}"
                         ) from None


def _read_into(handle: IO[bytes], buffer: memoryview, where: str, error: type[Exception]) -> None:
    done = 0
    while done < len(buffer):
        got = handle.readinto(buffer[done:])  # type: ignore[attr-defined]  # IO has no readinto
        if not got:
            raise error(f"{where} is truncated: {done} of {len(buffer)} bytes of data could be read")
        done += got


_TEMPORARY_NAME_CHARS = 160


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], where: str, error: type[Exception] = InputError,
                 ) -> Iterator[BinaryIO]:
    """Yield a binary handle whose content replaces `path` only if the block completes.

    The data goes to a hidden temporary sibling (same directory, so the rename is atomic; created with
    O_EXCL, so nothing existing is followed or clobbered) which is renamed over `path` on success and
    removed on any failure: a full disk, a refused write or an exception never leaves a truncated file,
    and an earlier file of that name stays whole. A symlink at `path` is replaced, not written through.
    An OSError becomes `error(f"cannot write {where}: <reason>")`. (No fsync: a failure the kernel
    reports is caught; surviving a power cut is the filesystem's rename ordering.)
    """
    target = Path(path)
    # cut so that a target name near NAME_MAX (255 bytes) still leaves room for the temporary's
    temporary = target.with_name(f".{target.name[:_TEMPORARY_NAME_CHARS]}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(temporary, flags, 0o666)  # the umask applies, as for any new file
    except OSError as failure:
        raise error(f"cannot write {where}: {_write_reason(failure, target)}") from None
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
        os.replace(temporary, target)
    except OSError as failure:
        raise error(f"cannot write {where}: {_write_reason(failure, target)}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _write_reason(failure: OSError, target: Path) -> str:
    if isinstance(failure, FileNotFoundError) and not target.parent.exists():
        return f"directory {shown(target.parent)} does not exist"
    if isinstance(failure, IsADirectoryError):
        return "it is a directory"
    return str(failure.strerror or failure)
