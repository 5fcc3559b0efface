"""Where a correlate task's arrays are on a worker: the input bands of its images and its slot of a shared
output, checked against the task and its kernels (the error names the task and what does not fit)."""

from __future__ import annotations

import numpy as np

from rmidl.errors import DTypeError, KernelTooLarge, ShapeError
from rmidl.geometry import band_rows, halo
from rmidl.remote.contract import CorrelateTask

__all__ = ["input_bands", "output_slot"]


def input_bands(task: CorrelateTask, kernels: np.ndarray, shared: np.ndarray | None) -> np.ndarray:
    """The task's input bands (rows `band_rows(task.rows, kh)` of each of its images) as (n, rows, W', C),
    n = 1 for a task of one image: a view of `shared` (the whole padded image(s) in shared memory) or the
    task's own array."""
    _, kh, kw, channels = kernels.shape
    (r0, r1), (first, last) = task.rows, band_rows(task.rows, kh)
    (n0, n1), one = task.images or (0, 1), task.images is None
    if shared is not None:
        batch = shared[None] if one else shared
        if batch.ndim != 4 or last > batch.shape[1] or n1 > batch.shape[0]:
            images = "" if one else f" of images [{n0}, {n1})"
            raise ShapeError(
                f"task {task.task_id}: rows [{r0}, {r1}){images} with kernel height {kh} exceed the "
                f"shared image{'' if one else 's'} of shape {shared.shape}"
            )
        band = batch[n0:n1, first:last]
    else:
        assert isinstance(task.source, np.ndarray)
        band = task.source[None] if one else task.source
        if band.ndim != 4 or band.shape[:2] != (n1 - n0, last - first):
            expected = f"{last - first} rows" if one else f"{n1 - n0} images of {last - first} rows"
            raise ShapeError(
                f"task {task.task_id}: input band shape {task.source.shape} does not hold rows "
                f"[{r0}, {r1}) plus a halo of {halo(kh)} (expected {expected})"
            )
    if band.shape[3] != channels:
        raise ShapeError(f"task {task.task_id}: input has {band.shape[3]} channel(s), kernels {channels}")
    if band.dtype != kernels.dtype:
        raise DTypeError(f"task {task.task_id}: input is {band.dtype} but bank is {kernels.dtype}")
    if kw > band.shape[2]:
        raise KernelTooLarge(f"kernel {kw}x{kh} does not fit input band {band.shape[2]}x{band.shape[1]}")
    return band


def output_slot(task: CorrelateTask, kernels: np.ndarray, block: np.ndarray, out_w: int) -> np.ndarray:
    """The task's part (n, k1 - k0, r1 - r0, out_w) of a shared output `block`: (N, K, OH, OW) for a batch
    task, (K, OH, OW) for a task of one image (n = 1)."""
    (k0, k1), (r0, r1), (n0, n1) = task.kernels, task.rows, task.images or (0, 1)
    batch = block if task.images is not None else block[None]
    fits = batch.ndim == 4 and batch.shape[3] == out_w
    if not fits or n1 > batch.shape[0] or k1 > batch.shape[1] or r1 > batch.shape[2]:
        what = f"images [{n0}, {n1}) x " if task.images is not None else ""
        raise ShapeError(
            f"task {task.task_id}: output block of shape {block.shape} cannot hold {what}kernels "
            f"[{k0}, {k1}) x rows [{r0}, {r1}) x {out_w} columns"
        )
    if block.dtype != kernels.dtype:
        raise DTypeError(f"task {task.task_id}: output is {block.dtype} but bank is {kernels.dtype}")
    return batch[n0:n1, k0:k1, r0:r1, :]
