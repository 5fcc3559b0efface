"""Image files in and out (Pillow): load images as arrays, save arrays and feature-map sets as images."""

from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import (  # noqa: F401
    BmpImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
)

from rmidl._files import atomic_write, clipped, open_regular, shown
from rmidl.config import Config
from rmidl.errors import (
    DTypeError,
    ImageNotFound,
    ImageReadError,
    InputError,
    NonFiniteInput,
    OptionError,
    ShapeError,
)

__all__ = ["SUFFIXES", "default_image", "load_image", "save_image", "save_maps"]

log = logging.getLogger(__name__)

# suffix -> Pillow format; Pillow's "PPM" plugin reads and writes PGM (gray) and PPM (colour)
SUFFIXES: dict[str, str] = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".pgm": "PPM",
    ".ppm": "PPM",
}
_READ_FORMATS = sorted(set(SUFFIXES.values()))
_SIXTEEN_BIT_FORMATS = {"PNG", "TIFF", "PPM"}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, the weights Pillow's "L" conversion uses
_SCALES = ("auto", "unit", "stretch", "robust")
_ROBUST_TAIL = 0.5  # percent of values clipped at each end by scale="robust"
_ROBUST_SAMPLE = 1 << 18  # values the robust percentiles are estimated from
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _pixels(image: Image.Image, where: str) -> np.ndarray:
    """The decoded image as (H, W) or (H, W, 3): uint8, uint16 (16-bit gray), int32 or float32."""
    mode = image.mode
    if mode in ("1", "LA", "La"):
        image = image.convert("L")
    elif mode in ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")  # alpha is dropped: convolution works on intensities
    elif mode not in ("L", "RGB", "I", "F") and not mode.startswith("I;16"):
        raise ImageReadError(f"{where} has pixel mode {mode}, which rmidl does not read")
    array = np.asarray(image)
    if mode.startswith("I;16"):
        return array.astype(np.uint16)  # native byte order whatever the file's
    if mode == "I" and image.format == "PPM":
        return array.astype(np.uint16)  # Pillow opens 16-bit PGM as 32-bit "I"; its maxval is <= 65535
    return array  # a 32-bit integer TIFF stays int32 whatever its values


def _identify(handle: BinaryIO, where: str) -> ImageFile.ImageFile:
    """Pillow's Image.open for our formats, without its decompression-bomb check: that one warns on
    stderr (DecompressionBombWarning) beside our error, and its limit is a process-wide global.
    The plugins imported above registered their formats in Image.OPEN."""
    prefix = handle.read(16)
    for fmt in _READ_FORMATS:
        factory, accept = Image.OPEN[fmt]
        accepted = accept is None or accept(prefix)
        if not accepted or isinstance(accepted, str):  # a str names a variant Pillow cannot read
            continue
        handle.seek(0)
        try:
            return factory(handle, "")  # type: ignore[no-any-return]
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes for "not this one"
            continue
    raise ImageReadError(f"{where} is not a PNG, JPEG, TIFF, BMP or PGM/PPM image")


def _check_pixels(opened: ImageFile.ImageFile, where: str) -> None:
    """Refuse, before decoding, an image whose header declares more pixels than image_max_pixels."""
    width, height = opened.size
    pixels = max(1, width) * max(1, height)
    limit = Config().image_max_pixels
    if pixels > limit:
        raise ImageReadError(
            f"{where} is too large to decode safely: {width}x{height} (W x H) is over "
            f"image_max_pixels={limit}; raise RMIDL_IMAGE_MAX_PIXELS to read it"
        )
    pillows = Image.MAX_IMAGE_PIXELS
    if opened.format == "TIFF" and pillows is not None and pixels > pillows:
        # Pillow checks TIFF frames again while decoding, against its own process-wide limit
        raise ImageReadError(
            f"{where} is too large to decode safely: a {width}x{height} TIFF is over Pillow's own "
            f"limit PIL.Image.MAX_IMAGE_PIXELS={pillows}; convert it to PNG or raise that limit"
        )


def load_image(path: str | os.PathLike[str], *, gray: bool | None = None) -> np.ndarray:
    """Read a PNG, JPEG, TIFF, BMP or PGM/PPM file into a new array.

    Returns (H, W) for grayscale files and (H, W, 3) for colour ones (alpha dropped, palettes expanded,
    EXIF orientation applied). dtype: uint8 for 8-bit files, uint16 for 16-bit grayscale, float32 for
    float TIFF, int32 for 32-bit integer TIFF (Pillow reads 16-bit colour files as 8-bit).
    `gray=True` always returns (H, W) luminance (0.299 R + 0.587 G + 0.114 B, rounded for integer
    types); `gray=False` always returns (H, W, 3). Raises ImageReadError naming the path and the reason:
    not a regular file, unreadable, not an image of these formats, corrupt or truncated (decoding is
    forced here, since Pillow otherwise decodes lazily), or more pixels than Config().image_max_pixels
    (RMIDL_IMAGE_MAX_PIXELS); a missing file is an ImageNotFound, which is also a FileNotFoundError.
    """
    if gray not in (None, True, False):
        raise OptionError(f"gray={gray!r} must be True, False or None")
    where = f"image {shown(path)}"
    with open_regular(path, where, ImageReadError, ImageNotFound) as handle:
        try:
            with _identify(handle, where) as opened:
                _check_pixels(opened, where)
                opened.load()
                ImageOps.exif_transpose(opened, in_place=True)
                array = _pixels(opened, where)
        except ImageReadError:  # our own (e.g. an unsupported pixel mode): a ValueError, but not corrupt
            raise
        except Image.DecompressionBombError as error:  # a TIFF frame larger than its first
            raise ImageReadError(f"{where} is too large to decode safely: {clipped(error)}") from None
        except (OSError, SyntaxError, ValueError, EOFError, zlib.error) as error:
            # Pillow reports broken PNG chunks as SyntaxError and short data as OSError("... truncated")
            detail = clipped(error) or type(error).__name__
            raise ImageReadError(f"{where} is corrupt or truncated: {detail}") from None
    if gray is True and array.ndim == 3:
        luma = array @ _LUMA
        if array.dtype.kind in "iu":
            luma = np.clip(np.rint(luma), 0, np.iinfo(array.dtype).max)
        array = luma.astype(array.dtype)
    elif gray is False and array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    log.debug("loaded %s: shape %s, dtype %s", where, array.shape, array.dtype)
    return np.require(array, requirements=["C", "W"])  # Pillow's buffer is read-only


def _scaled(array: np.ndarray, bits: int, scale: str) -> np.ndarray:
    """Map a real array to unsigned `bits`-bit integers by the rule save_image documents."""
    top = (1 << bits) - 1
    target = np.uint8 if bits == 8 else np.uint16
    if array.dtype in (np.uint8, np.uint16):
        if array.dtype == target:
            return array
        values = array / np.iinfo(array.dtype).max  # other depth: same intensities
    else:
        if scale == "robust":
            # a strided sample: percentiles of a feature map need no exact sort of every value
            sample = array.reshape(-1)[:: max(1, array.size // _ROBUST_SAMPLE)]
            low, high = (float(v) for v in np.percentile(sample, [_ROBUST_TAIL, 100 - _ROBUST_TAIL]))
        else:
            low, high = float(array.min()), float(array.max())
        stretch = scale in ("stretch", "robust") or (scale == "auto" and (low < 0 or high > 1))
        if stretch and math.isinf(high - low):
            # float64 values near ±1.8e308: scale by 2**-64 (exact) so that the span and its inverse
            # are normal numbers
            array, low, high = array * 2.0**-64, low * 2.0**-64, high * 2.0**-64
        gain = 1 / (high - low) if stretch and high > low else 1.0
        # float32 work is exact enough for 8/16-bit output and halves float64's memory traffic, unless
        # the span itself overflows float32 (values near ±3.4e38)
        narrow = array.dtype != np.float64 and gain < 1e30 and high - low < _FLOAT32_MAX
        values = array.astype(np.float32 if narrow else np.float64)
        if stretch:
            values -= values.dtype.type(low)
            values *= values.dtype.type(gain if high > low else 0.0)
    np.clip(values, 0, 1, out=values)
    values *= top
    return np.rint(values, out=values).astype(target)


def _image_for(array: np.ndarray, fmt: str, bits: int | None, scale: str, where: str) -> Image.Image:
    if scale not in _SCALES:
        raise OptionError(f"scale {scale!r} is not one of {', '.join(_SCALES)}")
    if bits not in (None, 8, 16):
        raise OptionError(f"bits={bits!r} must be 8, 16 or None")
    if array.dtype.kind not in "biuf":
        raise DTypeError(f"cannot save {where}: dtype {array.dtype} is not a real array")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)) or 0 in array.shape:
        raise ShapeError(f"cannot save {where}: shape {array.shape} is not (H, W), (H, W, 1) or (H, W, 3)")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise NonFiniteInput(f"cannot save {where}: the array contains NaN or Inf")
    if bits is None:
        bits = 16 if array.dtype == np.uint16 else 8
    if bits == 16 and (fmt not in _SIXTEEN_BIT_FORMATS or array.ndim == 3):
        kind = "colour" if array.ndim == 3 else fmt
        raise OptionError(f"cannot save {where} with 16 bits: {kind} files are 8-bit here (use bits=8)")
    pixels = _scaled(array.astype(np.uint8) * 255 if array.dtype == bool else array, bits, scale)
    return Image.fromarray(pixels)  # uint8 -> "L" / "RGB", uint16 -> "I;16"


def _write(image: Image.Image, path: Path, fmt: str, options: Mapping[str, object]) -> None:
    """Save through a temporary sibling renamed on success, so readers never see a half-written file."""
    with atomic_write(path, f"image {shown(path)}") as handle:
        image.save(handle, format=fmt, **options)


def _format_for(path: Path) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        suffix = path.suffix or "(none)"
        raise OptionError(f"cannot save {str(path)!r}: suffix {suffix!r} is not one of {', '.join(SUFFIXES)}")
    return fmt


def save_image(
    path: str | os.PathLike[str],
    array: object,
    *,
    bits: int | None = None,
    scale: str = "auto",
    quality: int = 95,
) -> Path:
    """Write `array` (H, W), (H, W, 1) or (H, W, 3) to `path` in the format its suffix names; return the path.

    Pixel rule: uint8 arrays are written unchanged as 8-bit, uint16 arrays unchanged as 16-bit (PNG, TIFF,
    PGM; grayscale only). Every other real dtype (float, other integers, bool) is scaled to `bits`
    (default 8): with scale="auto", an array whose values all lie in [0, 1] is taken as intensities
    (0 black, 1 white), any other is stretched (min black, max white; a constant array is black);
    scale="unit" always maps [0, 1] and clips outside, scale="stretch" always stretches, and
    scale="robust" stretches the 0.5th..99.5th percentiles, clipping the outliers beyond. Asking for
    the other depth of a uint8/uint16 array keeps intensities (v / max). NaN/Inf are refused.
    `quality` is JPEG's. The file is replaced atomically; failures raise InputError naming the path.
    """
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 0 <= quality <= 100:
        raise OptionError(f"quality={quality!r} must be an integer from 0 to 100")
    target = Path(path)
    fmt = _format_for(target)
    where = f"image {str(target)!r}"
    image = _image_for(np.asarray(array), fmt, bits, scale, where)
    options: dict[str, object] = {"quality": int(quality)} if fmt == "JPEG" else {}
    _write(image, target, fmt, options)
    return target


def save_maps(
    maps: object,
    directory: str | os.PathLike[str],
    *,
    montage: bool = True,
    prefix: str = "map",
    scale: str = "robust",
) -> list[Path]:
    """Write feature maps (K, H, W) as one 8-bit PNG each (`map_000.png`, ...) plus `montage.png`.

    Each map's PNG is scaled on its own by save_image's rule (default "robust": its 0.5th percentile
    black, its 99.5th white), so weak and strong maps all show their detail; the montage puts every map
    on ONE shared colour scale, so that tiles compare (see rmidl.montage: labelled tiles, gaps, a colour
    bar; sized for a screen). Save the arrays themselves (.npy) for exact values. Creates `directory` if
    needed; returns the paths written (montage last).
    """
    stack = np.asarray(maps)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or 0 in stack.shape:
        raise ShapeError(f"feature maps must be (K, H, W) or (H, W), got shape {stack.shape}")
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create directory {str(folder)!r}: {error.strerror or error}") from None
    digits = max(3, len(str(len(stack) - 1)))
    # Feature maps are many, large and noisy: after PNG's row filters, Huffman-only zlib measured 1-2x
    # faster than level 1 and 2-5x faster than the default level 6, and its files were no larger than 6's.
    options = {"compress_level": 1, "compress_type": zlib.Z_HUFFMAN_ONLY}
    written: list[Path] = []
    for k, feature_map in enumerate(stack):
        target = folder / f"{prefix}_{k:0{digits}d}.png"
        image = _image_for(feature_map, "PNG", 8, scale, f"map {k} ({str(target)!r})")
        _write(image, target, "PNG", options)
        written.append(target)
    if montage:
        from rmidl.montage import save_montage

        written.append(save_montage(stack, folder / "montage.png"))
    log.debug("wrote %d feature maps to %s", len(stack), folder)
    return written


def default_image(dtype: type | np.dtype = np.float32) -> np.ndarray:
    """The bundled 1280x720 grayscale test picture (H=720, W=1280) used by `rmidl demo` and the benchmarks.

    float dtypes return intensities in [0, 1]; np.uint8 returns the stored 8-bit pixels.
    """
    try:
        wanted = np.dtype(dtype)
    except TypeError:
        raise DTypeError(f"default_image dtype {dtype!r} is not a numpy dtype") from None
    if wanted.kind != "f" and wanted != np.uint8:
        raise DTypeError(f"default_image dtype {wanted} must be a float type or uint8")
    with resources.as_file(resources.files("rmidl") / "data" / "default.png") as path:
        pixels = load_image(path, gray=True)
    if wanted == np.uint8:
        return pixels
    return (pixels / wanted.type(255)).astype(wanted)
