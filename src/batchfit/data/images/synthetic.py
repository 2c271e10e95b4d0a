"""Generated image folders with a learnable signal, saved as real JPEG (or PNG) files.

No labelled photo dataset ships offline, so tests, benchmarks and the recipe draw their own:
each class is a shape in a colour of its own (with jittered hue, size, position and rotation)
on textured noise, in images of varied sizes. A CNN learns the classes in a few epochs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import check_positive_int, expected
from .transforms import pillow

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
HUES = (0.0, 0.33, 0.6, 0.12, 0.8, 0.5, 0.95, 0.7)


def make_image_folder(folder: str | os.PathLike, per_class: int, *, classes: int = 4,
                      sizes: tuple[int, int] = (64, 160), seed: int = 0, format: str = "JPEG",
                      quality: int = 90) -> Path:
    """Write ``per_class`` generated images for each of ``classes`` (2 to 8) classes into ``folder``.

    ``folder/<shape>/<number>.jpg``: class ``k`` draws shape ``SHAPES[k]`` in hue ``HUES[k]``
    on textured noise; width and height are drawn uniformly from ``sizes``. The files are real
    JPEG (``quality``) or PNG files, a pure function of the arguments. Returns ``folder``.
    """
    check_positive_int("per_class", per_class)
    if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= len(SHAPES):
        raise expected("classes", f"an integer from 2 to {len(SHAPES)}", classes)
    if not (isinstance(sizes, (tuple, list)) and len(sizes) == 2 and 8 <= sizes[0] <= sizes[1]):
        raise expected("sizes", "a pair (smallest, largest) of image sides, at least 8", sizes)
    if format not in ("JPEG", "PNG"):
        raise expected("format", "'JPEG' or 'PNG'", format)
    folder = Path(folder)
    suffix = ".jpg" if format == "JPEG" else ".png"
    for label in range(classes):
        (folder / SHAPES[label]).mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            rng = np.random.default_rng([seed, label, number])
            image = draw_image(rng, label, int(rng.integers(sizes[0], sizes[1] + 1)),
                               int(rng.integers(sizes[0], sizes[1] + 1)))
            path = folder / SHAPES[label] / f"{number:05d}{suffix}"
            image.save(path, format=format, **({"quality": quality} if format == "JPEG" else {}))
    return folder


def draw_image(rng: np.random.Generator, label: int, width: int, height: int) -> Any:
    """One image of class ``label``: its shape and colour on textured noise (a Pillow image)."""
    image_module = pillow()
    from PIL import ImageDraw

    # Texture: coarse noise blown up (blobs) plus fine noise, in a random dull colour.
    coarse = rng.random((max(2, height // 16), max(2, width // 16), 3))
    background = np.asarray(image_module.fromarray((coarse * 255).astype(np.uint8)).resize(
        (width, height), image_module.Resampling.BICUBIC), dtype=np.float32)
    background = 0.5 * background + 40 * rng.standard_normal((height, width, 3)).astype(np.float32) + 60
    image = image_module.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    hue = (HUES[label] + rng.normal(0, 0.03)) % 1.0
    colour = tuple(int(255 * c) for c in _hsv_to_rgb(hue, 0.8 + 0.2 * rng.random(), 0.8 + 0.2 * rng.random()))
    side = min(width, height)
    radius = side * (0.2 + 0.15 * rng.random())
    cx = radius + (width - 2 * radius) * rng.random()
    cy = radius + (height - 2 * radius) * rng.random()
    angle = 2 * math.pi * rng.random()
    _draw_shape(draw, SHAPES[label], cx, cy, radius, angle, colour)
    return image


def _polygon(cx: float, cy: float, radius: float, angle: float, corners: int,
             inner: float | None = None) -> list[tuple[float, float]]:
    points = []
    steps = corners * (2 if inner else 1)
    for k in range(steps):
        r = radius if inner is None or k % 2 == 0 else radius * inner
        a = angle + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _draw_shape(draw: object, shape: str, cx: float, cy: float, r: float, angle: float,
                colour: tuple[int, ...]) -> None:
    d = draw  # ImageDraw.Draw, untyped
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=colour)  # type: ignore[attr-defined]
    elif shape == "ring":
        d.ellipse(box, outline=colour, width=max(2, int(r / 3)))  # type: ignore[attr-defined]
    elif shape == "square":
        d.polygon(_polygon(cx, cy, r, angle, 4), fill=colour)  # type: ignore[attr-defined]
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, r, math.pi / 4, 4, inner=0.5), fill=colour)  # type: ignore[attr-defined]
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy, r, angle, 3), fill=colour)  # type: ignore[attr-defined]
    elif shape == "star":
        d.polygon(_polygon(cx, cy, r, angle, 5, inner=0.45), fill=colour)  # type: ignore[attr-defined]
    elif shape == "bar":
        d.polygon(_polygon(cx, cy, r, angle, 2, inner=0.25), fill=colour)  # type: ignore[attr-defined]
    else:  # cross
        width = max(2, int(r / 2.5))
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=colour, width=width)  # type: ignore[attr-defined]


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
