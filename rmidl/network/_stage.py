"""One CNP stage of a Network: correlate with a kernel bank, apply an activation, pool (the paper's CNP)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

import numpy as np

from rmidl.activation import ACTIVATIONS, activate
from rmidl.banks import load_kernels
from rmidl.convolution import correlate_batch_cached
from rmidl.errors import BankError, KernelTooLarge, OptionError, ShapeError
from rmidl.geometry import mode_padding, output_shape, split_range
from rmidl.kernels import (
    CENTRED_BYTES,
    DepthwiseSpectra,
    KernelSpectra,
    choose_engine,
    correlate_depthwise_batch,
    resolve_threads,
)
from rmidl.kernels._depthwise import depthwise_temp_bytes
from rmidl.kernels._threads import run_tiles
from rmidl.network._bands import EngineCall, banded, forward_banded
from rmidl.pooling import POOL_KINDS, pool, pool_shape, window_pair
from rmidl.validate import check_mode

__all__ = ["ACTIVATION_NAMES", "GLOBAL_POOLS", "POOL_NAMES", "EngineCall", "Stage", "StageShapes", "Timings",
           "add_time"]

ACTIVATION_NAMES = (*ACTIVATIONS, None)
GLOBAL_POOLS = ("global_avg", "global_max")
"""Pooling each map to one value (its mean or its maximum), whatever its size: PyTorch's
AdaptiveAvgPool2d(1) / AdaptiveMaxPool2d(1). A texture's statistic, independent of where things are."""
POOL_NAMES = (*POOL_KINDS, *GLOBAL_POOLS, None)

Timings = MutableMapping[str, float]


def _correlate_batch(maps: np.ndarray, call: EngineCall, mode: str, threads: int | None,
                     out: np.ndarray) -> None:
    """Correlate maps (N, C, H, W) with a call's bank (K, kh, kw, C), summing over C, into out (N, K, OH, OW).

    The one place a Network calls the engine: one batched correlation for the whole batch (the engine
    shares its plan and GEMMs between the images; the stage keeps the bank's kernel spectra).
    """
    channels, bank, _, spectra = call
    correlate_batch_cached(maps[:, channels].transpose(0, 2, 3, 1), bank, spectra, mode=mode,
                           threads=threads, out=out)


PER_MAP_AREA = 64 * 64
"""On maps up to this area a depthwise stage's per-map engine calls cost more in Python than in arithmetic,
whatever their kernels: the depthwise FFT engine takes such maps (measured, 4 images, 1 thread: 8 maps of
32x32 0.64-0.89 ms as one block-diagonal call, 0.30 ms in the engine; 25 of 64x64 4.8-6.1 against 2.5)."""


STAGE_SPECTRA_BYTES = 128 << 20
"""Kernel spectra one stage keeps for the FFT engine (every engine call and FFT size together): without
them every batch transforms the whole bank again, a third of seed004-full's time in batches of 4."""
MONOTONE = ("relu",)
"""Activations whose float32 evaluation never decreases, so max pooling commutes with them bit for bit.
tanh and sigmoid are monotone in exact arithmetic but numpy's float32 SIMD tanh/exp are not everywhere
(1 ulp steps down), and abstanh is not at all: those activate first."""
ACTIVATE_CHUNK = 1 << 20
"""Values one thread activates at a time (4 MiB of float32)."""


def _activate_in_place(maps: np.ndarray, activation: str, threads: int) -> None:
    """maps = activation(maps) in chunks shared by `threads` threads (element-wise: the same bits)."""
    if not maps.flags.c_contiguous:  # a band of a bigger array: one call, in place
        activate(maps, activation, out=maps)
        return
    flat = maps.reshape(-1)
    chunks = split_range(flat.size, size=ACTIVATE_CHUNK)

    def work(chunk: tuple[int, int], _: None) -> None:
        part = flat[chunk[0] : chunk[1]]
        activate(part, activation, out=part)

    run_tiles(chunks, work, lambda: None, threads)


def add_time(timings: Timings | None, key: str, seconds: float) -> None:
    """timings[key] += seconds (from 0), unless timings is None."""
    if timings is not None:
        timings[key] = timings.get(key, 0.0) + seconds


@dataclass(frozen=True)
class StageShapes:
    """What one stage makes of maps (C, H, W): the correlation's (K, OH, OW) and the pooled output."""

    maps_in: tuple[int, int, int]
    conv: tuple[int, int, int]
    out: tuple[int, int, int]


class Stage:
    """A CNP stage: correlation with `bank`, then `activation`, then `pool` (each optional but the bank).

    Channel rule. Default (depthwise=False), the standard CNN layer: `bank` is (K, kh, kw, C) (or
    (K, kh, kw) for C = 1) and output map k sums the correlations of all C input maps with kernel k's C
    slices, so the stage makes K maps from C. depthwise=True filters each map on its own (PyTorch's
    groups=C): `bank` is (K, kh, kw) (or (K, kh, kw, 1)) with K a multiple of the C input maps, and output
    map k is input map k // (K // C) correlated with kernel k -- K = C keeps the map count, and on one
    input map the two rules agree.

    activation: "relu", "tanh", "abstanh", "sigmoid" or None; pool: "max", "avg" or None, with a
    `pool_size` window (int or (rows, cols)) moved by `pool_stride` (default: the window), or
    "global_avg" / "global_max" (each map to its mean / maximum, (K, 1, 1); the window unused); mode: the
    correlation's "valid", "same" or "full" (as scipy.signal.correlate). `bank` may also be anything
    rmidl.load_kernels reads (a spec such as "random:8x5x5" or a .npy/.npz path). Every argument is
    checked here and kept as an attribute of the same name (`bank` as a read-only float32 4-D array,
    `pool_size` and a given `pool_stride` as (rows, cols) pairs).
    """

    __slots__ = ("_calls", "_calls_lock", "_depthwise_spectra", "activation", "bank", "depthwise", "mode",
                 "pool", "pool_size", "pool_stride", "spectra_budget")

    def __init__(self, bank: np.ndarray | str | os.PathLike[str], *, activation: str | None = "relu",
                 pool: str | None = "max", pool_size: int | tuple[int, int] = 2,
                 pool_stride: int | tuple[int, int] | None = None, mode: str = "valid",
                 depthwise: bool = False) -> None:
        if activation not in ACTIVATION_NAMES:
            raise OptionError(f"activation {activation!r} is not one of {_names(ACTIVATION_NAMES)}")
        if pool not in POOL_NAMES:
            raise OptionError(f"pool {pool!r} is not one of {_names(POOL_NAMES)}")
        if not isinstance(depthwise, (bool, np.bool_)):
            raise OptionError(f"depthwise={depthwise!r} must be True or False")
        array = load_kernels(bank)
        if array.ndim == 3:
            array = array[..., None]
        if depthwise and array.shape[3] != 1:
            raise BankError(f"a depthwise bank is (K, kh, kw): one kernel per output map, got {array.shape}")
        array = array.copy()  # load_kernels may return the caller's own float32 array, or a view of it
        array.flags.writeable = False
        self.bank: np.ndarray = array
        self.activation = activation
        self.pool = pool
        self.pool_size = window_pair(pool_size, "pool_size")
        self.pool_stride = None if pool_stride is None else window_pair(pool_stride, "pool_stride")
        self.mode = check_mode(mode)
        self.depthwise = bool(depthwise)
        self._calls: dict[int, list[EngineCall]] = {}
        self._calls_lock = threading.Lock()
        self._depthwise_spectra: DepthwiseSpectra | None = None
        self.spectra_budget = STAGE_SPECTRA_BYTES
        """Bytes of kernel spectra the stage keeps at most (all its engine calls and FFT sizes together)."""

    @property
    def kept_bytes(self) -> int:
        """Bytes this stage keeps for its engine calls beyond its bank: their kernel spectra (which grow
        with each FFT size met; what a worker counts in its blob budget)."""
        with self._calls_lock:
            calls = [call for calls in self._calls.values() for call in calls]
            depthwise = self._depthwise_spectra
        kept = 0 if depthwise is None else depthwise.nbytes
        return kept + sum(spectra.nbytes for _, _, _, spectra in calls)

    @property
    def kernels(self) -> int:
        """K: the number of maps this stage makes."""
        return int(self.bank.shape[0])

    @property
    def kernel_hw(self) -> tuple[int, int]:
        return int(self.bank.shape[1]), int(self.bank.shape[2])

    def accepts(self, maps: int) -> str | None:
        """Why this stage cannot take `maps` input maps, or None if it can."""
        if self.depthwise:
            if self.kernels % maps:
                return f"a depthwise bank of {self.kernels} kernels needs a map count dividing it, got {maps}"
        elif self.bank.shape[3] != maps:
            return f"its bank has {self.bank.shape[3]} channel(s) but its input has {maps} map(s)"
        return None

    def shapes(self, maps_in: tuple[int, int, int], where: str = "stage") -> StageShapes:
        """The correlation's and the output's shapes for input maps (C, H, W); errors name `where`."""
        c, h, w = maps_in
        problem = self.accepts(c)
        if problem:
            raise ShapeError(f"{where}: {problem}")
        kh, kw = self.kernel_hw
        if self.mode == "valid" and (kh > h or kw > w):
            raise KernelTooLarge(f"{where}: kernel {kw}x{kh} does not fit maps {w}x{h} in valid mode")
        conv = (self.kernels, *output_shape((h, w), (kh, kw), self.mode))
        if self.pool is None:
            return StageShapes(maps_in, conv, conv)
        if self.pool in GLOBAL_POOLS:
            return StageShapes(maps_in, conv, (conv[0], 1, 1))
        try:
            out = pool_shape(conv, self.pool_size, self.pool_stride)
        except ShapeError as error:
            raise ShapeError(f"{where}: {error} (the correlation's output)") from None
        return StageShapes(maps_in, conv, (int(out[0]), int(out[1]), int(out[2])))

    def flops(self, shapes: StageShapes) -> int:
        """Floating-point operations per image: 2 per multiply-add, 1 per activation value or pooled input."""
        k, oh, ow = shapes.conv
        kh, kw = self.kernel_hw
        depth = kh * kw * (1 if self.depthwise else shapes.maps_in[0])
        total = 2 * k * oh * ow * depth
        if self.activation is not None:
            total += k * oh * ow
        if self.pool in GLOBAL_POOLS:
            total += k * oh * ow
        elif self.pool is not None:
            total += shapes.out[0] * shapes.out[1] * shapes.out[2] * self.pool_size[0] * self.pool_size[1]
        return total

    def forward(self, maps: np.ndarray, *, threads: int | None = None, timings: Timings | None = None,
                name: str = "CNP") -> np.ndarray:
        """Maps (N, C, H, W) float32 -> (N, K, H', W') float32; adds seconds to timings[name + ".conv"|...].

        The caller checks the input (Network.forward_batch does); see `shapes` for what fits.
        """
        start = time.perf_counter()
        n = maps.shape[0]
        shapes = self.shapes(maps.shape[1:], name)
        count = resolve_threads(threads)
        if banded(self, shapes):
            calls = self.engine_calls(maps.shape[1:])
            return forward_banded(self, maps, shapes, calls=calls, threads=count, timings=timings, name=name)
        conv = np.empty((n, *shapes.conv), np.float32)
        calls = [] if self._depthwise_by_fft(maps.shape, count) else self.engine_calls(maps.shape[1:])
        if not calls:
            self._correlate_depthwise(maps, count, conv)
        elif len(calls) > 1 and count > 1:
            # Per-map calls are small (one map, a few kernels): the maps are the parallel work, each call
            # on one thread, rather than every call split over all threads.
            def one(call: EngineCall, _: None) -> None:
                _correlate_batch(maps, call, self.mode, 1, conv[:, call[2]])

            run_tiles(calls, one, lambda: None, count)
        else:
            for call in calls:
                _correlate_batch(maps, call, self.mode, threads, conv[:, call[2]])
        convolved = time.perf_counter()
        out = self.activate_and_pool(conv, count, timings, name)
        add_time(timings, f"{name}.conv", convolved - start)
        return out

    def engine_calls(self, maps_in: tuple[int, ...]) -> list[EngineCall]:
        """The engine calls that make this stage's maps from maps (C, H, W): (input maps, bank, output
        maps, the bank's kernel spectra) each -- one for the standard rule, one per map for a depthwise
        stage. Made once per input-map count, and kept with their spectra."""
        channels = int(maps_in[0])
        with self._calls_lock:
            calls = self._calls.get(channels)
            if calls is None:
                calls = self._calls[channels] = self._make_calls(channels)
        return calls

    def _depthwise_by_fft(self, maps_shape: tuple[int, ...], threads: int) -> bool:
        """Whether a depthwise stage's maps (N, C, H, W) go through the depthwise FFT engine in one call
        rather than one engine call per map: on several threads (per-map calls side by side contend for
        the interpreter: 2 threads ran them slower than 1), on small maps (PER_MAP_AREA), or where each
        per-map call would pick the fft engine anyway. One input map is one call either way."""
        n, channels, h, w = (int(v) for v in maps_shape)
        if not self.depthwise or channels == 1:
            return False
        if threads > 1 or h * w <= PER_MAP_AREA:
            return True
        (top, bottom), (left, right) = mode_padding(self.kernel_hw, self.mode)
        kernel = (self.kernels // channels, *self.kernel_hw, 1)
        return choose_engine((h + top + bottom, w + left + right), kernel, 1, batch=n) == "fft"

    def _correlate_depthwise(self, maps: np.ndarray, threads: int, out: np.ndarray) -> None:
        """The depthwise correlation of maps (N, C, H, W) in the stage's mode into out, in one call of the
        depthwise FFT engine (the stage keeps the bank's spectra)."""
        channels = maps.shape[1]
        bank = self.bank[:, :, :, 0]
        with self._calls_lock:
            spectra = self._depthwise_spectra
            if spectra is None or spectra.maps != channels:
                # half the stage's spectra budget: per-map calls (banded maps) may keep the other half
                spectra = self._depthwise_spectra = DepthwiseSpectra(bank, channels, self.spectra_budget // 2)
        correlate_depthwise_batch(maps, bank, out, padding=mode_padding(self.kernel_hw, self.mode),
                                  threads=threads, spectra=spectra)

    def scratch_bytes(self, maps_shape: tuple[int, ...], threads: int = 1) -> int:
        """Bytes a forward of maps (N, C, H, W) on `threads` threads holds beside its maps and outputs: the
        depthwise engine's padded or centred maps and its threads' temporaries, where it runs (else 0)."""
        if not self._depthwise_by_fft(maps_shape, threads):
            return 0
        n, channels, h, w = (int(v) for v in maps_shape)
        (top, bottom), (left, right) = mode_padding(self.kernel_hw, self.mode)
        padded = (h + top + bottom, w + left + right)
        ready = min(CENTRED_BYTES, n * channels * padded[0] * padded[1] * 4)
        return ready + depthwise_temp_bytes(n, channels, self.kernels // channels, padded, threads)

    def _make_calls(self, channels: int) -> list[EngineCall]:
        every = slice(None)
        if self.depthwise:
            per_map = self.kernels // channels
            parts = [(slice(c, c + 1), self.bank[c * per_map : (c + 1) * per_map],
                      slice(c * per_map, (c + 1) * per_map)) for c in range(channels)]
        else:
            parts = [(every, self.bank, every)]
        share = 2 if self.depthwise else 1  # the depthwise engine's spectra keep the rest
        budget = self.spectra_budget // share // len(parts)
        return [(inputs, bank, outputs, KernelSpectra(bank, max_bytes=budget))
                for inputs, bank, outputs in parts]

    def activate_and_pool(self, conv: np.ndarray, threads: int, timings: Timings | None, name: str, *,
                          out: np.ndarray | None = None) -> np.ndarray:
        """The activation and the pooling of the correlation's maps, on `threads` threads (into `out`,
        the pooled maps' array, when given; a stage without pooling activates `conv` in place).

        Max pooling after relu (MONOTONE) pools first and activates the pooled maps: max(f(a), f(b)) is
        f(max(a, b)) for a non-decreasing f, so the result is the same bits while f runs on a quarter of
        the values (2x2) and the full maps are read once.
        """
        activation, pooling = self.activation, self.pool
        if pooling in ("max", "global_max") and activation in MONOTONE:
            began = time.perf_counter()
            out = self._pool(conv, threads, out)
            pooled = time.perf_counter()
            _activate_in_place(out, activation, threads)
            add_time(timings, f"{name}.pool", pooled - began)
            add_time(timings, f"{name}.act", time.perf_counter() - pooled)
            return out
        began = time.perf_counter()
        if activation is not None:
            _activate_in_place(conv, activation, threads)
        activated = time.perf_counter()
        out = self._pool(conv, threads, out)
        add_time(timings, f"{name}.act", activated - began)
        add_time(timings, f"{name}.pool", time.perf_counter() - activated)
        return out

    def _pool(self, conv: np.ndarray, threads: int, out: np.ndarray | None) -> np.ndarray:
        if self.pool == "global_avg":
            return conv.mean(axis=(2, 3), keepdims=True, dtype=np.float32, out=out)
        if self.pool == "global_max":
            return conv.max(axis=(2, 3), keepdims=True, out=out)
        if self.pool is not None:
            return pool(conv, self.pool_size, stride=self.pool_stride, kind=self.pool, threads=threads,
                        out=out)
        return conv

    def settings(self) -> dict[str, object]:
        """Every argument but the bank, as JSON-ready values (what Network.save writes)."""
        return {"activation": self.activation, "pool": self.pool, "pool_size": list(self.pool_size),
                "pool_stride": None if self.pool_stride is None else list(self.pool_stride),
                "mode": self.mode, "depthwise": self.depthwise}

    def spec(self) -> str:
        """This stage in Network.from_spec's grammar, with "random" standing for the bank's values."""
        k, kh, kw = self.bank.shape[:3]
        parts = [f"{k}x{kh}x{kw}", self.activation or "linear"]
        if self.pool is None:
            parts.append("nopool")
        elif self.pool in GLOBAL_POOLS:
            parts.append("gavg" if self.pool == "global_avg" else "gmax")
        else:
            size = _pair_text(self.pool_size)
            stride = "" if self.pool_stride in (None, self.pool_size) else f"s{_pair_text(self.pool_stride)}"
            parts.append(f"{self.pool}{size}{stride}")
        if self.mode != "valid":
            parts.append(self.mode)
        if self.depthwise:
            parts.append("dw")
        return ":".join(parts)

    def __repr__(self) -> str:
        return f"Stage({self.spec()!r})"


def _pair_text(pair: tuple[int, int] | None) -> str:
    assert pair is not None
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


def _names(values: tuple[str | None, ...]) -> str:
    return ", ".join(str(v) for v in values)
