"""`rmidl run`: correlate one image with a kernel bank on the cluster (or the local pool), save the maps."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from rmidl.client.cli.common import (
    EXIT_OK,
    HERE,
    add_cluster_arguments,
    add_coordinator_arguments,
    add_security_arguments,
    choose_cluster,
    config_from_args,
    note,
)
from rmidl.client.coordinator import Coordinator
from rmidl.errors import OptionError
from rmidl.validate import MODES

HELP = "correlate IMAGE with a kernel bank on the cluster and save the feature maps"

BANK_SYNTAX = """\
kernel banks (--kernels), as rmidl.load_kernels reads them; shapes are K x kh x kw (numpy order):
  PATH.npy, PATH.npz      a saved (K, kh, kw) or (K, kh, kw, C) array (npz: its only array or 'kernels')
  random:KxHxW[:SEED]     K kernels HxW of normal values, std 1/sqrt(H*W), seeded (default seed 0)
  random:KxHxWxC[:SEED]   the same with C channels, for colour images
  gabor:K[xS][:SIGMA]     K Gabor kernels SxS (default 11) at K orientations; sigma default S/4.5,
                          wavelength sigma/0.56: S >= 6 keeps it at 2 px or more (e.g. gabor:8x11)
  gaussian:S[:SIGMA]      one SxS Gaussian summing to 1 (default sigma as OpenCV's)
  box:S                   one SxS mean filter
  sobel                   2 kernels 3x3: d/dx, d/dy
  laplacian               one 3x3 4-neighbour Laplacian

IMAGE may be `default`: the built-in 1280x720 grayscale picture. Sizes are printed WxH, as image
tools print them (a 1280x720 image has 720 rows)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = BANK_SYNTAX
    parser.add_argument("image", metavar="IMAGE",
                        help="PNG, JPEG, TIFF, BMP or PGM/PPM file, or `default` (the built-in image)")
    parser.add_argument("--kernels", required=True, metavar="BANK",
                        help="bank file (.npy/.npz) or spec such as random:128x11x11, gabor:8x11, sobel "
                        "(syntax below)")
    parser.add_argument("--mode", default="valid", help=f"one of {', '.join(MODES)}")
    parser.add_argument("--convolve", action="store_true", help="true convolution (flipped kernels)")
    add_cluster_arguments(parser, fallback=HERE)
    add_coordinator_arguments(parser, moved="data")
    add_security_arguments(parser)
    parser.add_argument("--out", metavar="PATH",
                        help="PATH.npy / PATH.npz saves the maps; a directory gets one PNG per map and "
                        "montage.png (labelled, one colour scale, with a colour bar when matplotlib is "
                        "installed)")


def _check_out(out: str | None) -> Path | None:
    """Refuse a bad --out before any work: .npy, .npz, or a directory (existing or without a suffix)."""
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() in (".npy", ".npz") or path.is_dir() or not path.suffix:
        if path.suffix and not path.parent.is_dir():
            why = "is not a directory" if path.parent.exists() else "does not exist"
            raise OptionError(f"--out {out!r}: directory {str(path.parent)!r} {why}")
        return path
    raise OptionError(f"--out {out!r} must end in .npy or .npz, or name a directory")


def parse_workers(text: str | None) -> list[str] | None:
    """--workers 'w0,w1' -> ['w0', 'w1'] (None when not given)."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise OptionError(f"--workers {text!r} is not a comma-separated list of worker names")
    return names


def save(maps: np.ndarray, path: Path) -> str:
    """Write the maps to PATH.npy, PATH.npz or PNGs in a directory; say where they went.

    Every file goes through a temporary sibling renamed on success: a full disk or a refused write
    leaves no truncated file, and an earlier file of the same name stays whole.
    """
    from rmidl._files import atomic_write, shown

    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        # one line, not a traceback, for a directory named like the file or a full disk
        with atomic_write(path, f"--out {shown(path)}") as handle:
            if suffix == ".npy":
                np.save(handle, maps)
            else:
                np.savez(handle, maps=maps)
        return str(path)
    from rmidl.imaging import save_maps

    written = save_maps(maps, path)
    return f"{len(written)} PNG files in {path}"


class _Progress:
    """A tqdm bar on a terminal, nothing otherwise; fed from the scheduler's threads."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._lock = threading.Lock()
        self.enabled = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(total=total, unit="task", file=sys.stderr, leave=False)
            self._bar.n = done
            self._bar.refresh()

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()


def summary(seconds: float, flops: float, tasks_by: dict[str, int]) -> str:
    per_worker = " ".join(f"{name}={n}" for name, n in sorted(tasks_by.items())) or "-"
    rate = flops / seconds / 1e9 if seconds > 0 else float("inf")
    return f"{seconds:.3f} s, {rate:.1f} GFLOP/s, tasks per worker: {per_worker}"


def _load_image(path: str, gray: bool) -> np.ndarray:
    """IMAGE as `rmidl run` reads it: a file, or `default` (the built-in picture, unless a file of that
    name is here)."""
    from rmidl.imaging import default_image, load_image

    if path == "default" and not Path(path).exists():
        return default_image(np.float32) if gray else np.repeat(default_image(np.float32)[:, :, None], 3, 2)
    return load_image(path, gray=gray)


def run(args: argparse.Namespace) -> int:
    from rmidl.client.cli.inputs import image_and_bank
    from rmidl.validate import check_mode, prepare

    mode = check_mode(args.mode)
    out = _check_out(args.out)
    workers = parse_workers(args.workers)
    # every check of the input before a cluster is chosen, contacted or told about
    image, kernels = image_and_bank(args.kernels, lambda gray: _load_image(args.image, gray), mode)
    prepared = prepare(image, kernels, mode)
    target = choose_cluster(args, config_from_args(args), fallback=HERE)
    progress = _Progress()
    shm = not args.no_shared_memory
    image, kernels = prepared.image, prepared.kernels
    with Coordinator(target.ns, local_threads=args.local_threads, shared_memory=shm, config=target.config,
                     workers=workers) as co:
        if target.note:  # once the options are all accepted: a refused command says one line only
            note(args, target.note)
        start = time.perf_counter()
        try:
            operation = co.convolve if args.convolve else co.correlate
            maps = operation(image, kernels, mode=mode, progress=progress)
        finally:
            progress.close()
        seconds = time.perf_counter() - start
        job = co.last_job()
    k, oh, ow = maps.shape
    where = save(maps, out) if out is not None else "not saved (no --out)"
    print(f"{k} maps of {ow}x{oh} ({mode}): {summary(seconds, job['flops'], job['tasks_by'])}; {where}")
    return EXIT_OK
