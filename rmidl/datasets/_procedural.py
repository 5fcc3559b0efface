"""Seeded procedural steel-surface textures (NEU-like defect classes) as float images in [0, 1].

Every class draws on the same rolled-steel background (grey level, illumination gradient, grain,
rolling streaks), so the defect's structure, not the brightness, tells the classes apart.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy.ndimage import distance_transform_edt, gaussian_filter, map_coordinates

__all__ = ["PROCEDURAL", "background", "dihedral"]


def _noise(rng: np.random.Generator, size: int, sigma: float | tuple[float, float]) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation (smooth fields made on a coarser grid)."""
    step = int(sigma // 2) if isinstance(sigma, (int, float)) else 1
    if isinstance(sigma, (int, float)) and step > 1:  # same statistics, less work: filter a coarse grid
        coarse = gaussian_filter(rng.standard_normal((size // step + 2,) * 2, np.float32), sigma / step,
                                 mode="wrap")
        side = coarse.shape[0] * step
        field = np.asarray(Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR))
        field = field[:size, :size]
    else:
        field = gaussian_filter(rng.standard_normal((size, size), np.float32), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-12)


@functools.cache
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates of a size x size image (float32, read-only, made once per size)."""
    y, x = np.mgrid[:size, :size].astype(np.float32)
    y.flags.writeable = x.flags.writeable = False
    return y, x


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Rolled steel: a grey level, a soft illumination gradient, fine grain and horizontal streaks."""
    y, x = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    gradient = (math.cos(angle) * x + math.sin(angle) * y) / size - 0.5
    level = rng.uniform(0.4, 0.6)
    return (level + rng.uniform(0.0, 0.06) * gradient + 0.015 * _noise(rng, size, 0.7)
            + 0.01 * _noise(rng, size, (0.6, rng.uniform(4, 10))))


def _lines(size: int, starts: np.ndarray, ends: np.ndarray, width: float) -> np.ndarray:
    """Straight segments with a Gaussian cross-section of std `width` and peak 1 (overlaps clipped)."""
    impulses = np.zeros((size, size), np.float32)
    step = 0.25
    for start, end in zip(starts, ends, strict=True):
        count = max(2, int(np.linalg.norm(end - start) / step))
        points = np.rint(start + np.linspace(0, 1, count)[:, None] * (end - start)).astype(np.int64)
        inside = ((points >= 0) & (points < size)).all(axis=1)
        np.add.at(impulses, (points[inside, 0], points[inside, 1]), step)
    return np.minimum(gaussian_filter(impulses, width) * float(np.sqrt(2 * np.pi) * width), 1.0)


def scratches(rng: np.random.Generator, size: int) -> np.ndarray:
    """A few thin straight scratches, nearly parallel, bright or dark."""
    count = int(rng.integers(5, 14))
    theta = rng.uniform(0, np.pi) + rng.normal(0, 0.08, count)
    centres = rng.uniform(0, size, (count, 2))
    half = rng.uniform(0.15, 0.5, count)[:, None] * size * np.stack([np.sin(theta), np.cos(theta)], axis=1)
    lines = _lines(size, centres - half, centres + half, rng.uniform(0.8, 1.5))
    return background(rng, size) + rng.uniform(0.25, 0.4) * lines


def crazing(rng: np.random.Generator, size: int) -> np.ndarray:
    """A network of fine, irregular cracks: the cell borders of a warped Voronoi tessellation."""
    seeds = np.ones((size, size), bool)
    count = int(rng.integers(25, 70) * (size / 200) ** 2) + 2
    seeds[rng.integers(0, size, count), rng.integers(0, size, count)] = False
    _, nearest = distance_transform_edt(seeds, return_indices=True)
    cells = nearest[0] * size + nearest[1]  # which seed each pixel is closest to
    borders = np.zeros((size, size), np.float32)
    borders[:-1] += cells[:-1] != cells[1:]
    borders[:, :-1] += cells[:, :-1] != cells[:, 1:]
    width = rng.uniform(0.5, 0.9)
    cracks = np.minimum(gaussian_filter(np.minimum(borders, 1.0), width) * 2.5 * width, 1.0)
    y, x = _grid(size)
    amount = rng.uniform(2, 5)
    cracks = map_coordinates(cracks, [y + amount * _noise(rng, size, 6), x + amount * _noise(rng, size, 6)],
                             order=1, mode="reflect")
    cracks *= 0.6 + 0.4 * (_noise(rng, size, 10) > -0.5)  # some crack sections fainter
    return background(rng, size) - rng.uniform(0.25, 0.4) * cracks


def pitted(rng: np.random.Generator, size: int) -> np.ndarray:
    """Many small dark pits of a few sizes, scattered."""
    pits = np.zeros((size, size), np.float32)
    for sigma in (0.8, 1.4, 2.2):
        impulses = np.zeros((size, size), np.float32)
        count = int(rng.integers(40, 120) * (size / 200) ** 2)
        rows, cols = rng.integers(0, size, count), rng.integers(0, size, count)
        impulses[rows, cols] = rng.uniform(0.5, 1.0, count)
        blurred = gaussian_filter(impulses, sigma, mode="wrap") * 2 * np.pi * sigma**2
        np.maximum(pits, np.minimum(blurred, 1.0), out=pits)
    return background(rng, size) - rng.uniform(0.3, 0.45) * pits


def inclusion(rng: np.random.Generator, size: int) -> np.ndarray:
    """Elongated dark inclusions along the rolling direction."""
    impulses = np.zeros((size, size), np.float32)
    count = int(rng.integers(6, 16))
    impulses[rng.integers(0, size, count), rng.integers(0, size, count)] = 1.0
    sigma = (rng.uniform(1.0, 2.2), rng.uniform(8, 20))
    streaks = gaussian_filter(impulses, sigma, mode="wrap") * 2 * np.pi * sigma[0] * sigma[1]
    streaks = np.minimum(streaks * rng.uniform(1.5, 3.0), 1.0)
    return background(rng, size) - rng.uniform(0.3, 0.45) * streaks


def patches(rng: np.random.Generator, size: int) -> np.ndarray:
    """Large irregular blotches of another grey level."""
    field = _noise(rng, size, rng.uniform(10, 20) * size / 200)
    threshold = rng.uniform(0.0, 0.8)
    blotches = 1 / (1 + np.exp(-(field - threshold) / 0.12))
    return background(rng, size) - rng.uniform(0.2, 0.35) * blotches


def rolled_in_scale(rng: np.random.Generator, size: int) -> np.ndarray:
    """Scale flakes pressed into the surface: many small, stretched, dark flecks."""
    field = _noise(rng, size, (rng.uniform(1.2, 2.5), rng.uniform(2.5, 5)))
    flakes = 1 / (1 + np.exp(-(field - rng.uniform(0.8, 1.3)) / 0.15))
    return background(rng, size) - rng.uniform(0.25, 0.4) * flakes


def dihedral(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 rotations/reflections of a square image, uniformly."""
    turned = np.rot90(image, int(rng.integers(4)))
    return np.ascontiguousarray(turned[:, ::-1] if rng.random() < 0.5 else turned)


def warp(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mild random smooth warp (a few pixels), so no two crops share an exact pixel grid."""
    size = image.shape[0]
    y, x = _grid(size)
    amount = rng.uniform(0.5, 2.0)
    coords = [y + amount * _noise(rng, size, 20), x + amount * _noise(rng, size, 20)]
    return map_coordinates(image, coords, order=1, mode="reflect")


# name -> generator(rng, size) -> float image around [0, 1] (clipped by the caller)
PROCEDURAL: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "crazing": crazing,
    "inclusion": inclusion,
    "patches": patches,
    "pitted": pitted,
    "rolled_in_scale": rolled_in_scale,
    "scratches": scratches,
}
