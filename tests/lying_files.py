"""Files that lie about themselves, for the tests of readers: a PNG header with no pixels behind it, an
.npy header claiming more data than follows it, a zip of many tiny members.

Shared by the imaging, bad-input and file tests (import it as `lying_files`: pytest puts tests/ on
sys.path).
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

__all__ = ["header_only_png", "lying_npy", "png_chunk", "write_zip"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height 8-bit gray pixels, and no image data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b""))
    return path


def lying_npy(shape: tuple[int, ...], data: bytes = bytes(16)) -> bytes:
    """An .npy file's bytes: a float32 header claiming `shape`, followed by `data` only."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + data


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path
