"""A montage of feature maps for a screen: tiles on one shared colour scale, labelled, with a colour bar.

The scale is shared so that a colour means the same response in every tile: symmetric around 0 for
signed maps (diverging colours, 0 in the middle), 0 to the top for non-negative ones (after a ReLU).
Its ends are the 0.5th/99.5th percentiles of all maps' |values|, so a few extreme responses do not
wash the rest out. Big maps are averaged down (box filter) so the whole montage fits a screen. Each
tile has a frame and a label; cells past the last map stay blank, without a frame. matplotlib (the
`plot` extra) draws labels and the colour bar; without it the montage is the framed grayscale tiles
alone, and a warning says so.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rmidl._files import atomic_write, shown

__all__ = ["Layout", "compose", "layout", "save_montage", "shared_scale"]

log = logging.getLogger(__name__)

SCREEN = (1600, 1000)
"""Largest montage grid (width, height) in pixels, colour bar and margins aside."""
GAP = 6
"""Pixels between tiles (and around the grid)."""
_TAIL = 0.5  # percent of |values| beyond the scale's ends
_SAMPLE = 1 << 18  # values the percentile is estimated from
_DIVERGING, _SEQUENTIAL = "RdBu_r", "magma"
_BACKGROUND = 255  # white: gaps and empty cells, never inside a framed tile
_FRAME = 0


@dataclass(frozen=True)
class Layout:
    """Where tiles go: a `columns` x `rows` grid of `tile` = (height, width) tiles, GAP apart."""

    count: int
    columns: int
    rows: int
    tile: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the whole grid, gaps and a 1-px frame around each tile included."""
        th, tw = self.tile
        return self.rows * (th + 2 + GAP) + GAP, self.columns * (tw + 2 + GAP) + GAP

    def origin(self, index: int) -> tuple[int, int]:
        """(top, left) of tile `index`'s pixels, inside its frame."""
        row, column = divmod(index, self.columns)
        th, tw = self.tile
        return GAP + 1 + row * (th + 2 + GAP), GAP + 1 + column * (tw + 2 + GAP)


def layout(count: int, height: int, width: int, screen: tuple[int, int] = SCREEN) -> Layout:
    """A near-square grid (in pixels) of `count` maps of height x width, tiles shrunk to fit `screen`
    (width, height); never enlarged."""
    screen_w, screen_h = screen
    columns = max(1, min(count, math.ceil(math.sqrt(count * height / width * screen_w / screen_h))))
    rows = math.ceil(count / columns)
    fit_w = (screen_w - GAP) / columns - GAP - 2
    fit_h = (screen_h - GAP) / rows - GAP - 2
    factor = min(1.0, fit_w / width, fit_h / height)
    tile = (max(1, math.floor(height * factor)), max(1, math.floor(width * factor)))
    return Layout(count, columns, rows, tile)


def shared_scale(maps: np.ndarray) -> tuple[float, float]:
    """(low, high) of the one colour scale of all maps: (-m, m) if any value is negative, else (0, m),
    with m the 99.5th percentile of |values| (the largest |value| if that is 0; 1 for all-zero maps)."""
    flat = maps.reshape(-1)
    sample = np.abs(flat[:: max(1, flat.size // _SAMPLE)].astype(np.float64))
    top = float(np.percentile(sample, 100 - _TAIL)) or float(np.abs(maps).max()) or 1.0
    return (-top, top) if float(maps.min()) < 0 else (0.0, top)


def _shrunk(feature_map: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    if feature_map.shape == tile:
        return feature_map.astype(np.float32)
    image = Image.fromarray(np.ascontiguousarray(feature_map, dtype=np.float32), mode="F")
    return np.asarray(image.resize((tile[1], tile[0]), Image.Resampling.BOX))


def compose(maps: np.ndarray, grid: Layout, scale: tuple[float, float]) -> np.ndarray:
    """The grid as (H, W) float32 in [0, 1] on `scale` (clipped), NaN for gaps and empty cells, and -1
    for the frames."""
    sheet = np.full(grid.size, np.nan, np.float32)
    low, high = scale
    th, tw = grid.tile
    for index, feature_map in enumerate(maps):
        top, left = grid.origin(index)
        sheet[top - 1 : top + th + 1, left - 1 : left + tw + 1] = -1.0
        tile = (_shrunk(feature_map, grid.tile) - np.float32(low)) / np.float32(high - low)
        sheet[top : top + th, left : left + tw] = np.clip(tile, 0, 1)
    return sheet


def _matplotlib() -> Any | None:
    try:
        import matplotlib.backends.backend_agg
        import matplotlib.figure
    except ImportError:
        return None
    return matplotlib


def _gray(sheet: np.ndarray) -> np.ndarray:
    pixels = np.full(sheet.shape, _BACKGROUND, np.uint8)
    inside = sheet >= 0
    pixels[inside] = np.rint(sheet[inside] * 255).astype(np.uint8)
    pixels[sheet == -1] = _FRAME
    return pixels


def _drawn(mpl: Any, sheet: np.ndarray, grid: Layout, scale: tuple[float, float],
           labels: list[str]) -> Any:
    """A matplotlib Figure: the coloured grid, a label on each tile and the colour bar of the scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    low, high = scale
    colours = mpl.colormaps[_DIVERGING if low < 0 else _SEQUENTIAL]
    rgb = np.full((*sheet.shape, 3), 1.0, np.float32)
    inside = sheet >= 0
    rgb[inside] = colours(sheet[inside])[:, :3]
    rgb[sheet == -1] = 0.0
    dpi, bar = 100, 1.3  # inches right of the grid for the colour bar and its numbers
    height, width = sheet.shape
    figure = mpl.figure.Figure(figsize=(width / dpi + bar, height / dpi + 0.2), dpi=dpi)
    FigureCanvasAgg(figure)
    grid_w = (width / dpi) / (width / dpi + bar)
    axes = figure.add_axes((0.0, 0.0, grid_w, 1.0))
    axes.imshow(rgb, interpolation="nearest")
    axes.set_axis_off()
    size = max(6.0, min(10.0, grid.tile[1] / 8))
    for index, label in enumerate(labels):
        top, left = grid.origin(index)
        axes.text(left + 2, top + 2, label, fontsize=size, va="top", ha="left",
                  bbox={"facecolor": "white", "alpha": 0.75, "pad": 1.0, "linewidth": 0})
    colour_axes = figure.add_axes((grid_w + 0.1 * (1 - grid_w), 0.1, 0.15 * (1 - grid_w), 0.8))
    mappable = ScalarMappable(norm=Normalize(low, high), cmap=colours)
    what = "symmetric around 0" if low < 0 else "from 0"
    figure.colorbar(mappable, cax=colour_axes, label=f"response (one scale for every map, {what})")
    return figure


def save_montage(maps: object, path: str | os.PathLike[str], *, labels: list[str] | None = None,
                 screen: tuple[int, int] = SCREEN) -> Path:
    """Write the montage of (K, H, W) `maps` to the PNG `path` (replaced atomically); return the path.

    `labels` (default: the map numbers) name the tiles. Without matplotlib the PNG holds the framed
    grayscale tiles alone (black is the scale's low end, white its high end; gaps and empty cells are
    white, and unframed), and a warning says so.
    """
    stack = np.asarray(maps)
    if stack.ndim != 3 or 0 in stack.shape:
        raise ValueError(f"montage maps must be a non-empty (K, H, W) array, got shape {stack.shape}")
    names = [str(k) for k in range(len(stack))] if labels is None else list(labels)
    grid = layout(len(stack), stack.shape[1], stack.shape[2], screen)
    scale = shared_scale(stack)
    sheet = compose(stack, grid, scale)
    target = Path(path)
    mpl = _matplotlib()
    with atomic_write(target, f"montage {shown(target)}") as handle:
        if mpl is None:
            log.warning("%s has no labels or colour bar: matplotlib is not installed "
                        "(pip install 'rmidl[plot]')", target.name)
            Image.fromarray(_gray(sheet)).save(handle, format="PNG")
        else:
            _drawn(mpl, sheet, grid, scale, names).savefig(handle, format="png")
    log.debug("montage of %d maps, tiles %dx%d, scale [%g, %g]", len(stack), grid.tile[1], grid.tile[0],
              *scale)
    return target
