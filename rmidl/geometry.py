"""The one owner of shapes: output shapes, mode padding, row bands and their halos, kernel groups, tasks.

Everything distributed is a valid correlation of padded images (see `pad_for_mode`); a task's output
rows [r0, r1) need the input rows [r0, r1 + halo) with halo = kh - 1 (`band_rows`) of each of its images
[n0, n1): the coordinator slices bands with it, the worker checks bands with it, the planner sizes bands
with it.
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


def pad_for_mode(image: np.ndarray, kernel_hw: tuple[int, int], mode: str, *,
                 batch: bool = False) -> np.ndarray:
    """The (H', W'[, C]) image whose valid correlation equals the `mode` correlation of `image`; with
    `batch`, the (N, H', W'[, C]) images of a batch (N, H, W[, C])."""
    rows, cols = mode_padding(kernel_hw, mode)
    if rows == cols == (0, 0):
        return image
    lead = [(0, 0)] if batch else []
    pads = lead + [rows, cols] + [(0, 0)] * (image.ndim - 2 - len(lead))
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
    """One unit of work: output rows [r0, r1) for kernels [k0, k1) of images [n0, n1) of a valid
    correlation (a job of one image has only image 0)."""

    task_id: int
    rows: tuple[int, int]
    kernels: tuple[int, int]
    images: tuple[int, int] = (0, 1)

    def out_elements(self, out_w: int) -> int:
        """Output values this task writes for an output `out_w` columns wide."""
        (n0, n1), (r0, r1), (k0, k1) = self.images, self.rows, self.kernels
        return (n1 - n0) * (r1 - r0) * (k1 - k0) * out_w


def plan_tasks(out_h: int, n_kernels: int, *, band: int, group: int, n_images: int = 1,
               images: int = 1) -> list[Task]:
    """Groups of at most `images` of the `n_images` images, crossed with row bands of at most `band` rows
    and kernel groups of at most `group` kernels."""
    bands = split_range(out_h, size=band)
    groups = split_range(n_kernels, size=group)
    image_groups = split_range(n_images, size=images)
    grid = ((r, g, n) for g in groups for n in image_groups for r in bands)
    return [Task(i, rows, ks, ns) for i, (rows, ks, ns) in enumerate(grid)]
