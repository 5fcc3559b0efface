"""Generate rmidl/data/default.png: the deterministic 1280x720 grayscale test picture of demos and benchmarks.

A synthetic street scene, so convolution banks have something photo-like to respond to: smooth gradients
(sky, ground, vignetting), hard edges of several orientations (buildings, roofs, road), curves (sun, arch,
tree), fine periodic detail (windows, checkerboard, rings, lettering) and texture (clouds, grass, noise).
Run it once from the repository root; the output is the same for the same numpy/Pillow/scipy versions.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.ndimage
from PIL import Image, ImageDraw

W, H = 1280, 720
SUPER = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges, like a real lens
SEED = 20240611


def fractal_noise(rng: np.random.Generator, shape: tuple[int, int], octaves: int, base: int) -> np.ndarray:
    """Sum of upsampled random grids (1/f-like texture), scaled to [0, 1]."""
    total = np.zeros(shape)
    for octave in range(octaves):
        cells = base * 2**octave
        grid = rng.standard_normal((max(2, cells * shape[0] // shape[1] + 1), cells + 1)).astype(np.float32)
        # Pillow's bicubic resize of a float image: smooth like scipy.ndimage.zoom, ~20x faster
        layer = Image.fromarray(grid).resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
        total += np.asarray(layer, dtype=np.float64) / 2**octave
    return (total - total.min()) / (total.max() - total.min())


def coverage(draw: Callable[[ImageDraw.ImageDraw, int], None]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the shapes `draw(canvas, scale)` paints at SUPER resolution."""
    canvas = Image.new("L", (W * SUPER, H * SUPER), 0)
    draw(ImageDraw.Draw(canvas), SUPER)
    return np.asarray(canvas.resize((W, H), Image.Resampling.BOX), dtype=np.float64) / 255


def rectangles(boxes: list[tuple[int, int, int, int]]) -> Callable[[ImageDraw.ImageDraw, int], None]:
    """A `coverage` painter of axis-aligned boxes (left, top, right, bottom) in output pixels."""

    def draw(canvas: ImageDraw.ImageDraw, scale: int) -> None:
        for box in boxes:
            canvas.rectangle([v * scale for v in box], fill=255)

    return draw


def over(picture: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> None:
    """Paint `value` over `picture` where `alpha` covers it."""
    picture *= 1 - alpha
    picture += alpha * value


def scene() -> np.ndarray:
    rng = np.random.default_rng(SEED)
    y, x = np.mgrid[:H, :W] / np.array([H, W])[:, None, None]
    horizon = 0.55

    # sky: brighter towards the horizon, with soft clouds
    picture = 0.45 + 0.4 * y / horizon
    clouds = fractal_noise(rng, (H, W), 5, 4)
    picture += 0.25 * np.clip(clouds - 0.5, 0, None) * (y < horizon)
    sun = np.hypot((x - 0.8) * W / H, y - 0.18)
    picture += 0.5 * np.exp(-((sun / 0.05) ** 8)) + 0.15 * np.exp(-sun / 0.1)

    # distant hills: a fractal ridge, lighter than the foreground (atmospheric perspective)
    ridge = horizon - 0.12 * fractal_noise(rng, (1, W), 6, 3)[0] - 0.02
    over(picture, (y >= ridge[None, :]).astype(float), 0.55 + 0.1 * fractal_noise(rng, (H, W), 4, 16))

    # ground: grass texture, streaked vertically and coarser towards the viewer
    grass = fractal_noise(rng, (H, W * 4), 3, 64)[:, ::4]
    ground = 0.3 + 0.15 * grass + 0.15 * (y - horizon)
    over(picture, (y >= horizon).astype(float), ground)

    def road(canvas: ImageDraw.ImageDraw, s: int) -> None:
        corners = [(600, 396), (680, 396), (1180, 720), (100, 720)]
        canvas.polygon([(cx * s, cy * s) for cx, cy in corners], fill=255)

    over(picture, coverage(road), 0.22 + 0.05 * fractal_noise(rng, (H, W), 3, 80))

    def lane_marks(canvas: ImageDraw.ImageDraw, s: int) -> None:
        for t0 in np.linspace(0.05, 0.95, 9):
            t1 = t0 + 0.05
            top, bottom = 396 + t0**2 * 324, 396 + t1**2 * 324
            half0, half1 = 1 + 6 * t0**2, 1 + 6 * t1**2
            canvas.polygon(
                [((640 - half0) * s, top * s), ((640 + half0) * s, top * s),
                 ((640 + half1) * s, bottom * s), ((640 - half1) * s, bottom * s)],
                fill=255,
            )

    over(picture, coverage(lane_marks), 0.9)

    # buildings: flat walls with window grids, a pitched roof, an arched door
    walls = [(60, 170, 250, 400, 0.62), (250, 230, 400, 400, 0.38), (860, 120, 1010, 400, 0.5),
             (1010, 250, 1200, 400, 0.7)]
    for left, top, right, bottom, shade in walls:
        over(picture, coverage(rectangles([(left, top, right, bottom)])), shade + 0.4 * (x - left / W))
        panes = [
            (wx, wy, wx + 10, wy + 16)
            for wy in range(top + 14, bottom - 40, 28)
            for wx in range(left + 12, right - 18, 22)
        ]
        over(picture, coverage(rectangles(panes)), 1.05 - shade)

    def roof(canvas: ImageDraw.ImageDraw, s: int) -> None:
        canvas.polygon([(240 * s, 230 * s), (325 * s, 150 * s), (410 * s, 230 * s)], fill=255)

    over(picture, coverage(roof), 0.2)

    def arch(canvas: ImageDraw.ImageDraw, s: int) -> None:
        canvas.rectangle([300 * s, 340 * s, 350 * s, 400 * s], fill=255)
        canvas.ellipse([300 * s, 315 * s, 350 * s, 365 * s], fill=255)

    over(picture, coverage(arch), 0.08)

    # fine detail: a checkerboard sign and a ring target (many spatial frequencies), lettering
    over(picture, coverage(rectangles([(1024, 264, 1180, 372)])), 0.85)
    squares = [
        (1030 + col * 12, 270 + row * 12, 1042 + col * 12, 282 + row * 12)
        for row in range(8)
        for col in range(12)
        if (row + col) % 2 == 0
    ]
    over(picture, coverage(rectangles(squares)), 0.1)
    rings = np.hypot(x * W - 935, y * H - 200)
    target = 0.5 + 0.45 * np.cos(rings**2 / 90)
    over(picture, (rings < 55).astype(float), target)

    def lettering(canvas: ImageDraw.ImageDraw, s: int) -> None:
        canvas.text((880 * s, 300 * s), "RMIDL 2026", fill=255, font_size=18 * s)

    over(picture, coverage(lettering), 0.95)

    # a tree: trunk and a canopy of overlapping leaf clusters with fine leafy texture
    def trunk(canvas: ImageDraw.ImageDraw, s: int) -> None:
        corners = [(190, 480), (210, 480), (217, 600), (183, 600)]
        canvas.polygon([(cx * s, cy * s) for cx, cy in corners], fill=255)

    over(picture, coverage(trunk), 0.15)
    clusters = rng.normal([200, 420], [45, 35], (40, 2))
    radii = rng.uniform(18, 34, 40)

    def canopy(canvas: ImageDraw.ImageDraw, s: int) -> None:
        for (cx, cy), r in zip(clusters, radii, strict=True):
            canvas.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=255)

    leaves = 0.18 + 0.25 * fractal_noise(rng, (H, W), 3, 160)
    over(picture, coverage(canopy), leaves)

    # camera: slight lens blur, vignetting, sensor noise
    picture = scipy.ndimage.gaussian_filter(picture, 0.6)
    picture *= 1 - 0.35 * ((x - 0.5) ** 2 + (y - 0.5) ** 2)
    picture += rng.normal(0, 0.006, picture.shape)
    return np.clip(np.rint(picture * 255), 0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "rmidl" / "data" / "default.png"
    parser.add_argument("--out", type=Path, default=default, help=f"where to write (default {default})")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(scene()).save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
