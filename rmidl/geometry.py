"""The one owner of shapes: output shapes, mode padding, row bands and their halos, kernel groups, tasks.

Everything distributed is a valid correlation of a padded image (see `pad_for_mode`); a task's output
rows [r0, r1) need the input rows [r0, r1 + halo) with halo = kh - 1 (`band_rows`): the coordinator
slices bands with it, the worker checks bands with it, the planner sizes bands with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Task",
    "band_rows",
    "halo",
    "max_band_rows",
    "mode_padding",
    "output_shape",
    "pad_for_mode",
    "plan_tasks",
    "split_range",
]


def output_shape(image_hw: tuple[int, int], kernel_hw: tuple[int, int], mode: str) -> tuple[int, int]:
    """(OH, OW) of a correlation in `mode`, as scipy.signal.correlate defines it."""
    (h, w), (kh, kw) = image_hw, kernel_hw
    if mode == "valid":
        return h - kh + 1, w - kw + 1
    if mode == "same":
        return h, w
    return h + kh - 1, w + kw - 1


def mode_padding(kernel_hw: tuple[int, int], mode: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Zero padding ((top, bottom), (left, right)) that turns `mode` into a valid correlation."""
    kh, kw = kernel_hw
    if mode == "valid":
        return (0, 0), (0, 0)
    if mode == "full":
        return (kh - 1, kh - 1), (kw - 1, kw - 1)
    # scipy centres 'same' on the full output: the extra row/column of an even kernel goes on top/left.
    return (kh // 2, (kh - 1) // 2), (kw // 2, (kw - 1) // 2)


def pad_for_mode(image: np.ndarray, kernel_hw: tuple[int, int], mode: str) -> np.ndarray:
    """The (H', W'[, C]) image whose valid correlation equals the `mode` correlation of `image`."""
    rows, cols = mode_padding(kernel_hw, mode)
    if rows == cols == (0, 0):
        return image
    pads = [rows, cols] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pads)


def split_range(n: int, parts: int | None = None, *, size: int | None = None) -> list[tuple[int, int]]:
    """Split [0, n) into `parts` near-equal pieces, or pieces of at most `size`; no empty piece."""
    if n <= 0:
        return []
    if size is not None:
        parts = -(-n // max(1, size))
    parts = max(1, min(int(parts or 1), n))
    edges = [n * i // parts for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


def halo(kernel_h: int) -> int:
    """Input rows beyond its output rows that a band needs for kernels `kernel_h` tall."""
    return int(kernel_h) - 1


def band_rows(rows: tuple[int, int], kernel_h: int) -> tuple[int, int]:
    """Input rows [r0, r1 + halo) a valid correlation needs for output rows [r0, r1)."""
    return rows[0], rows[1] + halo(kernel_h)


def max_band_rows(limit_bytes: int, input_row_bytes: int, kernel_h: int) -> int:
    """Most output rows whose input band (with its halo) fits in `limit_bytes` (< 1: not even one)."""
    return limit_bytes // max(1, input_row_bytes) - halo(kernel_h)


@dataclass(frozen=True)
class Task:
    """One unit of work: output rows [r0, r1) for kernels [k0, k1) of a valid correlation."""

    task_id: int
    rows: tuple[int, int]
    kernels: tuple[int, int]

    def out_elements(self, out_w: int) -> int:
        """Output values this task writes for an output `out_w` columns wide."""
        return (self.rows[1] - self.rows[0]) * (self.kernels[1] - self.kernels[0]) * out_w


def plan_tasks(out_h: int, n_kernels: int, *, band: int, group: int) -> list[Task]:
    """Row bands of at most `band` rows crossed with kernel groups of at most `group` kernels."""
    bands = split_range(out_h, size=band)
    groups = split_range(n_kernels, size=group)
    return [Task(i, rows, ks) for i, (rows, ks) in enumerate((r, g) for g in groups for r in bands)]
