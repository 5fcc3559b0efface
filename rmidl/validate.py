"""Input checks shared by the engine, coordinator, banks, activation and pooling: user arrays -> canonical."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rmidl.errors import DTypeError, KernelTooLarge, NonFiniteInput, OptionError, ShapeError
from rmidl.geometry import output_shape

__all__ = [
    "MODES",
    "Prepared",
    "PreparedBatch",
    "check_engine",
    "check_mode",
    "check_out",
    "check_real",
    "check_threads",
    "first_non_finite",
    "float32_overflow",
    "prepare",
    "prepare_any",
    "prepare_batch",
]

MODES = ("valid", "same", "full")
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Prepared:
    """Canonical inputs: image (H, W, C), kernels (K, kh, kw, C), both C-contiguous in `dtype`."""

    image: np.ndarray
    kernels: np.ndarray
    dtype: np.dtype
    mode: str

    @property
    def out_shape(self) -> tuple[int, int, int]:
        h, w, _ = self.image.shape
        k, kh, kw, _ = self.kernels.shape
        return (k, *output_shape((h, w), (kh, kw), self.mode))

    @property
    def images(self) -> np.ndarray:
        """The image as a batch of one, (1, H, W, C): what batch code takes."""
        return self.image[None]

    def flipped(self) -> Prepared:
        """The same inputs with every kernel flipped in both spatial axes: convolution as correlation."""
        return Prepared(self.image, _flip(self.kernels), self.dtype, self.mode)


def check_mode(mode: object) -> str:
    """One of MODES."""
    if not isinstance(mode, str) or mode not in MODES:
        raise OptionError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    return str(mode)


def check_engine(engine: object) -> str:
    """"auto" or one of rmidl.kernels.ENGINES."""
    from rmidl.kernels import ENGINES  # here, not at the top: rmidl.kernels imports this module

    if not isinstance(engine, str) or (engine != "auto" and engine not in ENGINES):
        raise OptionError(f"engine {engine!r} is not one of auto, {', '.join(ENGINES)}")
    return str(engine)


def check_threads(threads: object) -> int | None:
    """A positive integer, None for every core, or -1 for every core too (joblib's and scipy.fft's
    habit), which becomes this process's core count so that callers see a positive integer."""
    if threads is None:
        return None
    refused = OptionError(f"threads={threads!r} must be a positive integer, -1 (every core) or None")
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise refused
    if threads == -1:
        from rmidl.kernels import available_cores  # here, not at the top: rmidl.kernels imports this module

        return available_cores()
    if threads < 1:
        raise refused
    return int(threads)


def check_out(out: object, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A caller's `out=` buffer: a writeable ndarray of exactly the result's shape and dtype."""
    if not isinstance(out, np.ndarray):
        raise OptionError(f"out must be a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ShapeError(f"out has shape {out.shape}, the result needs {tuple(shape)}")
    if out.dtype != dtype:
        raise DTypeError(f"out has dtype {out.dtype}, the result needs {np.dtype(dtype)}")
    if not out.flags.writeable:
        raise OptionError("out is read-only")
    return out


def check_real(array: np.ndarray, what: str) -> None:
    """Refuse every dtype but integers and floats (bool, complex, object, text), naming `what`."""
    if array.dtype.kind not in "iuf":
        raise DTypeError(f"{what} dtype {array.dtype} is not supported (use an integer or float array)")


def _as_real_array(value: object, what: str) -> np.ndarray:
    array = np.asarray(value)
    check_real(array, what)
    if array.dtype.kind == "f" and array.dtype.itemsize < 4:
        array = array.astype(np.float32)
    return array


def prepare(image: object, kernels: object, mode: str = "valid") -> Prepared:
    """Check shapes, dtypes and values; return canonical float32/float64 arrays (float64 only if both are)."""
    mode = check_mode(mode)
    img = _as_real_array(image, "image")
    ker = _as_real_array(kernels, "kernels")
    if img.ndim == 2:
        img = img[:, :, None]
    elif img.ndim != 3:
        hint = "; did you mean batch=True (a batch of (H, W, C) images)?" if img.ndim == 4 else ""
        raise ShapeError(f"image must be (H, W) or (H, W, C), got shape {img.shape}{hint}")
    ker = _kernels_4d(ker)
    channels = img.shape[2]
    if 0 in img.shape:
        raise ShapeError(f"image is empty: shape {img.shape[:2] if channels == 1 else img.shape}")
    _check_bank(ker)
    if ker.shape[3] != channels:
        # An (N, H, W) stack read as one image of N x H with W channels: say what batch=True would do.
        hint = (f"; did you mean batch=True ({img.shape[0]} images of {img.shape[2]}x{img.shape[1]})?"
                if ker.shape[3] == 1 else "")
        raise ShapeError(f"kernels have {ker.shape[3]} channel(s) but the image has {channels}{hint}")
    _check_fit(img.shape[:2], ker, mode, "image")
    img, ker, dtype = _canonical(img, ker, ("image", "kernels"))
    return Prepared(img, ker, dtype, mode)


@dataclass(frozen=True)
class PreparedBatch:
    """Canonical batch inputs: images (N, H, W, C), kernels (K, kh, kw, C), both C-contiguous in `dtype`."""

    images: np.ndarray
    kernels: np.ndarray
    dtype: np.dtype
    mode: str

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        n, h, w, _ = self.images.shape
        k, kh, kw, _ = self.kernels.shape
        return (n, k, *output_shape((h, w), (kh, kw), self.mode))

    def flipped(self) -> PreparedBatch:
        """The same inputs with every kernel flipped in both spatial axes: convolution as correlation."""
        return PreparedBatch(self.images, _flip(self.kernels), self.dtype, self.mode)


def prepare_batch(images: object, kernels: object, mode: str = "valid") -> PreparedBatch:
    """As `prepare`, for a batch of images (N, H, W) or (N, H, W, C); an empty batch (N = 0) is allowed."""
    mode = check_mode(mode)
    img = _as_real_array(images, "images")
    ker = _as_real_array(kernels, "kernels")
    if img.ndim == 3:
        img = img[..., None]
    elif img.ndim != 4:
        raise ShapeError(f"with batch=True images must be (N, H, W) or (N, H, W, C), got shape {img.shape}")
    ker = _kernels_4d(ker)
    if 0 in img.shape[1:]:
        raise ShapeError(f"images are empty: shape {img.shape}")
    _check_bank(ker)
    if ker.shape[3] != img.shape[3]:
        raise ShapeError(f"kernels have {ker.shape[3]} channel(s) but the images have {img.shape[3]}")
    _check_fit(img.shape[1:3], ker, mode, "images")
    img, ker, dtype = _canonical(img, ker, ("images", "kernels"))
    return PreparedBatch(img, ker, dtype, mode)


def prepare_any(images: object, kernels: object, mode: str = "valid", *, batch: object = False,
                flip: bool = False) -> Prepared | PreparedBatch:
    """`prepare`, or with `batch=True` `prepare_batch`; kernels flipped (true convolution) with `flip`."""
    if not isinstance(batch, (bool, np.bool_)):
        raise OptionError(f"batch={batch!r} must be True or False")
    prepared = prepare_batch(images, kernels, mode) if batch else prepare(images, kernels, mode)
    return prepared.flipped() if flip else prepared


def _kernels_4d(ker: np.ndarray) -> np.ndarray:
    if ker.ndim == 2:
        return ker[None, :, :, None]
    if ker.ndim == 3:
        return ker[..., None]
    if ker.ndim != 4:
        raise ShapeError(f"kernels must be (K, kh, kw) or (K, kh, kw, C), got shape {ker.shape}")
    return ker


def _check_bank(ker: np.ndarray) -> None:
    if 0 in ker.shape:
        raise ShapeError(f"kernel bank is empty: shape {ker.shape}")


def _check_fit(image_hw: tuple[int, ...], ker: np.ndarray, mode: str, what: str) -> None:
    (h, w), (kh, kw) = image_hw, ker.shape[1:3]
    if mode == "valid" and (kh > h or kw > w):
        raise KernelTooLarge(f"kernel {kw}x{kh} does not fit {what} {w}x{h} in valid mode")  # sizes W x H


def _canonical(img: np.ndarray, ker: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray,
                                                                                np.dtype]:
    """Both arrays checked for non-finite and out-of-range values, C-contiguous in the work dtype."""
    dtype = np.dtype(np.float64 if img.dtype == np.float64 and ker.dtype == np.float64 else np.float32)
    for array, what in zip((img, ker), names, strict=True):
        problem = first_non_finite(array)
        if problem is not None:
            raise NonFiniteInput(f"{what} contains {problem}")
        # float32 would turn these into Inf (numpy warns on the cast); say why instead
        peak = float32_overflow(array) if dtype == np.float32 else None
        if peak is not None:
            raise NonFiniteInput(f"{what} has values beyond the float32 range (max |value| {peak:.3g}); "
                                 "the work is float64 only if image and kernels both are")
    return np.ascontiguousarray(img, dtype=dtype), np.ascontiguousarray(ker, dtype=dtype), dtype


def _flip(kernels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(kernels[:, ::-1, ::-1, :])


def float32_overflow(array: np.ndarray) -> float | None:
    """The largest |value| of a wider float array when float32 cannot hold it; None otherwise."""
    if array.dtype.kind != "f" or array.dtype.itemsize <= 4 or array.size == 0:
        return None
    peak = max(float(array.max()), -float(array.min()))
    return peak if peak > _FLOAT32_MAX else None


def first_non_finite(array: np.ndarray) -> str | None:
    """'NaN (first at index (i, ...))' or 'Inf (...)' for the first non-finite value; None if none."""
    if array.dtype.kind != "f":
        return None
    finite = np.isfinite(array)
    if finite.all():
        return None
    index = tuple(int(i) for i in np.argwhere(~finite)[0])
    return f"{'NaN' if np.isnan(array[index]) else 'Inf'} (first at index {index})"
