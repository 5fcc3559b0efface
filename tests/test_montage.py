"""The montage of `rmidl run --out DIR/`: one shared scale, tiles apart and framed, empty cells blank,
labels and a colour bar with matplotlib, a size that fits a screen, and a Pillow fallback without it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rmidl import montage
from rmidl.imaging import save_maps


def test_a_big_bank_fits_a_screen() -> None:
    """The paper's job: 128 maps of 1270x710 (W x H) shrink to a grid within 1600x1000."""
    grid = montage.layout(128, 710, 1270)
    height, width = grid.size
    assert width <= montage.SCREEN[0] and height <= montage.SCREEN[1]
    assert grid.columns * grid.rows >= 128 > grid.columns * (grid.rows - 1)
    th, tw = grid.tile
    assert abs(tw / th - 1270 / 710) < 0.1 and tw >= 60, "tiles keep their shape and stay legible"
    assert montage.layout(4, 20, 30).tile == (20, 30), "small maps are not enlarged"


def test_the_scale_is_shared_and_symmetric_for_signed_maps(rng) -> None:
    signed = rng.standard_normal((3, 50, 50)) * np.array([1.0, 10.0, 0.1])[:, None, None]
    low, high = montage.shared_scale(signed)
    assert low == -high and high == pytest.approx(np.percentile(np.abs(signed), 99.5), rel=0.05)
    assert montage.shared_scale(np.abs(signed))[0] == 0.0  # non-negative maps: from 0
    assert montage.shared_scale(np.zeros((2, 3, 3))) == (0.0, 1.0)


def test_a_colour_means_one_value_in_every_tile() -> None:
    """Three constant maps, -2, 0 and +2, on one scale [-2, 2]: 0, 0.5 and 1 wherever they are; the
    fourth cell of the 2x2 grid is empty (NaN) and frameless; gaps are NaN, frames -1."""
    maps = np.stack([np.full((10, 12), v, np.float32) for v in (-2.0, 0.0, 2.0)])
    grid = montage.layout(3, 10, 12)
    sheet = montage.compose(maps, grid, (-2.0, 2.0))
    assert (grid.columns, grid.rows) == (2, 2)
    for index, value in enumerate((0.0, 0.5, 1.0)):
        top, left = grid.origin(index)
        np.testing.assert_array_equal(sheet[top : top + 10, left : left + 12], value)
        assert (sheet[top - 1, left - 1 : left + 13] == -1).all(), "each tile has a frame"
        assert np.isnan(sheet[top - 1 - montage.GAP // 2, left]), "and a gap around it"
    top, left = grid.origin(3)
    assert np.isnan(sheet[top - 1 : top + 11, left - 1 : left + 13]).all(), "the empty cell is blank"


def test_with_matplotlib_labels_and_a_colour_bar(tmp_path: Path, rng) -> None:
    pytest.importorskip("matplotlib")
    maps = rng.standard_normal((5, 40, 60)).astype(np.float32)
    grid = montage.layout(5, 40, 60)
    scale = montage.shared_scale(maps)
    figure = montage._drawn(montage._matplotlib(), montage.compose(maps, grid, scale), grid, scale,
                            [f"map {k}" for k in range(5)])
    image_axes, bar_axes = figure.axes
    assert [t.get_text() for t in image_axes.texts] == [f"map {k}" for k in range(5)]
    assert bar_axes.get_ylim() == pytest.approx(scale) and "symmetric around 0" in bar_axes.get_ylabel()
    path = montage.save_montage(maps, tmp_path / "montage.png")
    with Image.open(path) as drawn:
        width, height = drawn.size
    assert grid.size[1] < width <= montage.SCREEN[0] + 200 and height <= montage.SCREEN[1] + 50


def test_without_matplotlib_framed_gray_tiles_and_one_warning(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setattr(montage, "_matplotlib", lambda: None)
    maps = np.stack([np.full((10, 12), v, np.float32) for v in (-2.0, 0.0, 2.0)])
    with caplog.at_level(logging.WARNING, logger="rmidl.montage"):
        written = save_maps(maps, tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        "montage.png has no labels or colour bar: matplotlib is not installed (pip install 'rmidl[plot]')"]
    grid = montage.layout(3, 10, 12)
    with Image.open(written[-1]) as saved:
        pixels = np.asarray(saved)
    assert pixels.shape == grid.size
    for index, gray in enumerate((0, 128, 255)):
        top, left = grid.origin(index)
        assert (pixels[top : top + 10, left : left + 12] == gray).all()
        assert (pixels[top - 1, left : left + 12] == 0).all()
    top, left = grid.origin(3)
    assert (pixels[top - 1 : top + 11, left - 1 : left + 13] == 255).all(), "the empty cell is blank"
