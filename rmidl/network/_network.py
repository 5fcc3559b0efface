"""The CNN feature extractor: ordered CNP stages, then flatten; one image or a batch -> feature vectors."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmidl.errors import NonFiniteInput, OptionError, ShapeError
from rmidl.network._bands import BAND_BYTES, banded
from rmidl.network._spec import RECTIFIED, parse_spec, seeded_bank
from rmidl.network._stage import Stage, StageShapes, Timings, add_time
from rmidl.validate import check_out, check_real, check_threads, first_non_finite, float32_overflow

__all__ = ["Network", "NetworkSummary", "StageSummary"]


@dataclass(frozen=True)
class StageSummary:
    """One row of Network.describe: a stage's shapes per image, its work and its maps' size."""

    name: str
    spec: str
    shapes: StageShapes
    flops: int
    bank_bytes: int

    @property
    def out_bytes(self) -> int:
        """Bytes of the stage's float32 output maps per image (what flows to the next stage)."""
        c, h, w = self.shapes.out
        return 4 * c * h * w

    @property
    def conv_bytes(self) -> int:
        """Bytes of the correlation's float32 maps per image (the stage's working set before pooling)."""
        c, h, w = self.shapes.conv
        return 4 * c * h * w


@dataclass(frozen=True)
class NetworkSummary:
    """Network.describe's answer: per-stage rows for an input shape; str() is a table to print."""

    input_shape: tuple[int, int, int]
    stages: tuple[StageSummary, ...]
    features: int

    @property
    def flops(self) -> int:
        return sum(stage.flops for stage in self.stages)

    def __str__(self) -> str:
        header = ("stage", "spec", "input", "conv", "output", "MFLOP", "share", "bank", "conv maps", "output")
        total = max(self.flops, 1)
        rows = [header]
        for s in self.stages:
            rows.append((s.name, s.spec, _shape(s.shapes.maps_in), _shape(s.shapes.conv),
                         _shape(s.shapes.out), f"{s.flops / 1e6:.1f}", f"{100 * s.flops / total:.1f}%",
                         _bytes(s.bank_bytes), _bytes(s.conv_bytes), _bytes(s.out_bytes)))
        rows.append(("FLAT", "", _shape(self.stages[-1].shapes.out), "", f"{self.features}", "0.0", "0.0%",
                     "", "", _bytes(4 * self.features)))
        rows.append(("total", "", "", "", "", f"{self.flops / 1e6:.1f}", "100%", _bytes(sum(
            s.bank_bytes for s in self.stages)), "", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(width) if i > 1 else cell.ljust(width)
                           for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join([f"per image of {_shape(self.input_shape)} (maps C x H x W, float32):", *lines])


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(v) for v in shape)


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


class Network:
    """A CNN feature extractor: CNP stages in order (rmidl.Stage), then flatten to one vector per image.

    Channel rule (see Stage): a standard stage's bank (K, kh, kw, C) sums over the C maps the stage before
    made (or the image's C channels); a depthwise stage filters each map with its own kernels. `channels`
    is the images' channel count: by default the first stage's bank C, or 1 when that stage is depthwise.
    The chain is checked here; shapes that do not fit an image size are reported by output_shape/forward.
    Features are float32, the last stage's maps (K, H, W) flattened in C order (as torch's x.flatten(1)).
    """

    def __init__(self, stages: Sequence[Stage], *, channels: int | None = None,
                 spec: str | None = None) -> None:
        if isinstance(stages, Stage) or not isinstance(stages, Sequence):
            raise OptionError(f"stages must be a sequence of rmidl.Stage, got {type(stages).__name__}")
        self.stages: tuple[Stage, ...] = tuple(stages)
        if not self.stages:
            raise OptionError("a network needs at least one stage")
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, Stage):
                raise OptionError(f"stage {i + 1} is a {type(stage).__name__}, not an rmidl.Stage")
        first = self.stages[0]
        if channels is None:
            channels = 1 if first.depthwise else int(first.bank.shape[3])
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
            raise OptionError(f"channels={channels!r} must be a positive integer")
        self.channels = int(channels)
        maps = self.channels
        for i, stage in enumerate(self.stages):
            problem = stage.accepts(maps)
            if problem:
                source = "the images" if i == 0 else f"stage {i}"
                raise ShapeError(f"stage {i + 1}: {problem} (from {source})")
            maps = stage.kernels
        self.spec = spec

    @classmethod
    def from_spec(cls, spec: str, *, seed: int = 0, channels: int = 1) -> Network:
        """The network a spec or preset names (see parse_spec), with seeded banks (see seeded_bank).

        The same (spec, seed, channels) always gives the same banks; `channels` is the images' count.
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise OptionError(f"seed={seed!r} must be a non-negative integer")
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
            raise OptionError(f"channels={channels!r} must be a positive integer")
        stages: list[Stage] = []
        maps = int(channels)
        for index, stage_spec in enumerate(parse_spec(spec)):
            rectified = bool(stages) and stages[-1].activation in RECTIFIED
            bank = seeded_bank(stage_spec, maps, int(seed), index, reads_rectified=rectified)
            stages.append(Stage(bank, **stage_spec.options))  # type: ignore[arg-type]
            maps = stage_spec.kernels
        return cls(stages, channels=int(channels), spec=spec.strip())

    # -- shapes and costs --------------------------------------------------------------------------

    def _input_maps(self, input_shape: Sequence[int]) -> tuple[int, int, int]:
        shape = tuple(int(v) for v in input_shape)
        if len(shape) == 2:
            shape = (*shape, 1)
        if len(shape) != 3 or min(shape) < 1:
            raise ShapeError(f"an image is (H, W) or (H, W, C) with sizes >= 1, got {tuple(input_shape)}")
        h, w, c = shape
        if c != self.channels:
            raise ShapeError(f"images have {c} channel(s) but the network takes {self.channels}")
        return c, h, w

    def stage_shapes(self, input_shape: Sequence[int]) -> list[StageShapes]:
        """Each stage's shapes for images of `input_shape` (H, W[, C]); errors name the stage that fails."""
        return [shapes for _, shapes in self._staged(self._input_maps(input_shape))]

    def _staged(self, maps_in: Sequence[int], start: int = 0,
                stop: int | None = None) -> list[tuple[Stage, StageShapes]]:
        """(stage, its shapes) of stages [start, stop) for maps (C, H, W) entering stage `start`."""
        staged: list[tuple[Stage, StageShapes]] = []
        maps = tuple(int(v) for v in maps_in)
        for index in range(start, len(self.stages) if stop is None else stop):
            stage = self.stages[index]
            staged.append((stage, stage.shapes(maps, f"stage {index + 1}")))  # type: ignore[arg-type]
            maps = staged[-1][1].out
        return staged

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int]:
        """(F,): the feature vector's length for images of `input_shape` (H, W[, C])."""
        c, h, w = self.stage_shapes(input_shape)[-1].out
        return (c * h * w,)

    def peak_bytes(self, maps_in: Sequence[int], start: int = 0, stop: int | None = None) -> int:
        """Bytes one image's float32 maps peak at through stages [start, stop) that take maps (C, H, W): the
        largest stage's input plus correlation maps, which a batch of n needs n times (a stage in row
        bands holds its pooled maps instead; its bands are `scratch_bytes`)."""
        peak = 0
        for stage, shapes in self._staged(maps_in, start, stop):
            made = shapes.out if banded(stage, shapes) else shapes.conv
            peak = max(peak, 4 * (math.prod(shapes.maps_in) + math.prod(made)))
        return peak

    def scratch_bytes(self, maps_in: Sequence[int], threads: int, start: int = 0,
                      stop: int | None = None, *, batch: int = 1) -> int:
        """Bytes a call on `batch` images through stages [start, stop) holds beside n * peak_bytes (what a
        worker reserves besides them): a banded stage's band scratch, one per thread, or a depthwise
        stage's engine temporaries (see Stage.scratch_bytes), the largest of the stages'."""
        most = 0
        for stage, shapes in self._staged(maps_in, start, stop):
            if banded(stage, shapes):
                most = max(most, BAND_BYTES * max(1, int(threads)))
            else:
                maps_shape = (max(1, int(batch)), *shapes.maps_in)
                most = max(most, stage.scratch_bytes(maps_shape, max(1, int(threads))))
        return most

    def limit_kept(self, nbytes: int) -> None:
        """Keep at most `nbytes` of kernel spectra over all stages (each stage an equal share, at most its
        default): a worker gives a network what its blob cache has room for. Call before the first use."""
        share = max(0, int(nbytes)) // len(self.stages)
        for stage in self.stages:
            stage.spectra_budget = min(stage.spectra_budget, share)

    @property
    def kept_bytes(self) -> int:
        """Bytes the stages keep between calls beyond the banks (kernel spectra, see Stage.kept_bytes)."""
        return sum(stage.kept_bytes for stage in self.stages)

    def describe(self, input_shape: Sequence[int]) -> NetworkSummary:
        """Per stage the shapes, FLOPs and bytes for one image of `input_shape`; print() it for a table."""
        rows = tuple(StageSummary(f"CNP{i + 1}", stage.spec(), shapes, stage.flops(shapes), stage.bank.nbytes)
                     for i, (stage, shapes) in enumerate(zip(self.stages, self.stage_shapes(input_shape),
                                                             strict=True)))
        return NetworkSummary(self._input_maps(input_shape), rows, self.output_shape(input_shape)[0])

    # -- computing ---------------------------------------------------------------------------------

    def to_maps(self, images: object) -> np.ndarray:
        """Images (n, H, W[, C]) (an array or a sequence of same-shape arrays) -> checked maps (n, C, H, W).

        Values are taken as they are (uint8 pixels stay 0..255) and computed in float32.
        """
        try:
            batch = images if isinstance(images, np.ndarray) else np.asarray(images)
        except ValueError:  # a list of arrays of different shapes
            raise ShapeError("the images of a batch must all have the same shape") from None
        check_real(batch, "images")
        if batch.ndim == 3 and self.channels == 1:
            batch = batch[..., None]
        if batch.ndim != 4:
            raise ShapeError(f"a batch of images is (n, H, W) or (n, H, W, C), got shape {batch.shape}")
        if batch.shape[0] == 0:
            raise ShapeError("the batch holds no images")
        self._input_maps(batch.shape[1:])
        problem = first_non_finite(batch)
        if problem is not None:
            raise NonFiniteInput(f"images contain {problem}")
        peak = float32_overflow(batch)
        if peak is not None:
            raise NonFiniteInput(f"images have values beyond the float32 range (max |value| {peak:.3g})")
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)

    def flatten(self, maps: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The last stage's maps (n, K, H, W) as features (n, K*H*W), into `out` if given."""
        features = maps.reshape(maps.shape[0], -1)
        if out is None:
            return np.ascontiguousarray(features, dtype=np.float32)
        out[...] = features
        return out

    def forward_batch(self, images: object, *, threads: int | None = None, timings: Timings | None = None,
                      out: np.ndarray | None = None) -> np.ndarray:
        """Features (n, F) float32 of images (n, H, W[, C]): every CNP stage, then flatten.

        `threads` goes to the correlations (None: every core). `timings`, a dict, gets seconds added
        under "CNP1".."CNPn" (input checks included in CNP1), their parts "CNPi.conv"/".act"/".pool",
        and "FLAT", so a caller can sum them over batches. `out` is a caller's (n, F) float32 buffer.
        """
        n_threads = check_threads(threads)
        start = time.perf_counter()
        maps = self.to_maps(images)
        expected = (maps.shape[0], self.output_shape(maps.shape[2:] + maps.shape[1:2])[0])
        if out is not None:
            out = check_out(out, expected, np.dtype(np.float32))
        maps = self._run_stages(maps, (0, len(self.stages)), n_threads, timings, start)
        start = time.perf_counter()
        features = self.flatten(maps, out)
        add_time(timings, "FLAT", time.perf_counter() - start)
        return features

    def forward_stages(self, maps: np.ndarray, start: int, stop: int, *, threads: int | None = None,
                       timings: Timings | None = None) -> np.ndarray:
        """Stages [start, stop) (0-based) on maps (n, C, H, W) float32 that enter stage `start`: the maps
        stage `stop - 1` makes. What one processor of the stage-mapped pipeline runs; `timings` as in
        forward_batch (CNP<i> for each stage run). Shapes are checked here, values by the caller."""
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start < stop <= len(self.stages)):
            raise OptionError(f"stages [{start}, {stop}) are not a range of this network's "
                              f"{len(self.stages)} stages")
        if not isinstance(maps, np.ndarray) or maps.ndim != 4 or maps.dtype != np.float32:
            raise ShapeError("maps entering a stage are a float32 (n, C, H, W) array, got "
                             f"{getattr(maps, 'dtype', type(maps).__name__)} {getattr(maps, 'shape', '')}")
        if maps.shape[0] == 0:
            raise ShapeError("the batch holds no maps")
        self.stages[start].shapes(maps.shape[1:], f"stage {start + 1}")
        return self._run_stages(maps, (start, stop), check_threads(threads), timings, time.perf_counter())

    def _run_stages(self, maps: np.ndarray, stages: tuple[int, int], threads: int | None,
                    timings: Timings | None, start: float) -> np.ndarray:
        for i in range(*stages):
            name = f"CNP{i + 1}"
            maps = self.stages[i].forward(maps, threads=threads, timings=timings, name=name)
            end = time.perf_counter()
            add_time(timings, name, end - start)
            start = end
        return maps

    def forward(self, image: object, *, threads: int | None = None) -> np.ndarray:
        """The feature vector (F,) float32 of one image (H, W[, C])."""
        array = np.asarray(image)
        if array.ndim not in (2, 3):
            raise ShapeError(f"an image is (H, W) or (H, W, C), got shape {array.shape}")
        return self.forward_batch(array[None], threads=threads)[0]

    # -- identity and files ------------------------------------------------------------------------

    def settings(self) -> dict[str, object]:
        """Everything but the banks, as JSON-ready values: the channel count, spec and stage settings."""
        return {"channels": self.channels, "spec": self.spec,
                "stages": [stage.settings() for stage in self.stages]}

    @property
    def banks(self) -> tuple[np.ndarray, ...]:
        return tuple(stage.bank for stage in self.stages)

    @property
    def fingerprint(self) -> str:
        """A content id: SHA-256 of what computes (channels, stage settings, banks), not of the spec text."""
        settings = {key: value for key, value in self.settings().items() if key != "spec"}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for bank in self.banks:
            digest.update(repr(bank.shape).encode())
            digest.update(bank.tobytes())
        return digest.hexdigest()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write banks and settings to one .npz (no pickle; see rmidl.network.load); return the path."""
        from rmidl.network._archive import save_network

        return save_network(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Network:
        """The network a file written by save() holds; a truncated or foreign file is a one-line error."""
        from rmidl.network._archive import load_network

        return load_network(path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Network) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        text = self.spec or ",".join(stage.spec() for stage in self.stages)
        return f"Network({text!r}, channels={self.channels})"
