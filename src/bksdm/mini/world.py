"""A procedural text-to-image world: one or two simple shapes on a plain background, with English captions.

Every scene is a deterministic function of ``(seed, index)``; images are generated on the fly. Each shape has a
kind, a colour, a size and a quadrant; the labels are kept so generated images can be checked against prompts.

>>> world = ShapesWorld(seed=0)
>>> image, caption, scene = world.sample(3)     # PIL image (32x32 RGB), "a small red circle at the top left", labels
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 215), "yellow": (235, 200, 30),
           "purple": (140, 50, 180)}
SIZES = {"small": 3.5, "large": 6.5}  # half-extent in pixels at 32 px
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (230, 230, 225)
JITTER = 1.5  # the largest shift of a shape's centre, in pixels at 32 px (each axis, uniform)
WORDS = sorted({"a", "at", "the", "and", *KINDS, *COLOURS, *SIZES, *" ".join(POSITIONS).split()})


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.kind} at the {self.position}"


def caption(shapes: tuple[Shape, ...]) -> str:
    return " and ".join(s.phrase() for s in shapes)


def parse_caption(text: str) -> tuple[Shape, ...]:
    """The shapes a caption describes (inverse of :func:`caption`); raises ValueError on other text."""
    shapes = []
    for part in text.strip().lower().split(" and "):
        w = part.split()
        if len(w) < 7 or w[0] != "a" or w[4:6] != ["at", "the"]:
            raise ValueError(f"not a mini-world caption: {text!r}")
        shape = Shape(w[3], w[2], w[1], " ".join(w[6:]))
        if shape.kind not in KINDS or shape.colour not in COLOURS or shape.size not in SIZES or shape.position not in POSITIONS:
            raise ValueError(f"not a mini-world caption: {text!r}")
        shapes.append(shape)
    return tuple(shapes)


def shape_mask(kind: str, cy: float, cx: float, r: float, n: int) -> np.ndarray:
    """(n, n) bool: the pixels (centres at +0.5) a shape of ``kind`` with centre (cy, cx) and half-extent ``r`` covers."""
    y, x = np.mgrid[0:n, 0:n] + 0.5
    if kind == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    if kind == "square":
        return (np.abs(y - cy) <= r * 0.85) & (np.abs(x - cx) <= r * 0.85)
    if kind == "cross":  # never in the world's scenes: the DreamBooth example teaches it as a new subject
        arm = max(1.0, r * 0.35)
        return ((np.abs(y - cy) <= arm) & (np.abs(x - cx) <= r)) | ((np.abs(x - cx) <= arm) & (np.abs(y - cy) <= r))
    # upward triangle: apex at top, base at bottom
    top, bottom = cy - r, cy + r
    half = (y - top) / (2 * r) * r
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)


def centre(position: str, size: int = 32) -> tuple[float, float]:
    """(y, x) of the centre of ``position``'s quadrant before jitter, in pixels of a ``size`` picture."""
    row, col = position.split()
    scale = size / 32
    return (8 if row == "top" else 24) * scale, (8 if col == "left" else 24) * scale


def render(shapes: tuple[Shape, ...], size: int = 32, jitter: tuple[tuple[float, float], ...] | None = None) -> Image.Image:
    """Draw ``shapes`` on the plain background; ``jitter`` moves each centre by (dy, dx) pixels."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    scale = size / 32
    for i, s in enumerate(shapes):
        cy, cx = centre(s.position, size)
        if jitter is not None:
            cy, cx = cy + jitter[i][0] * scale, cx + jitter[i][1] * scale
        img[shape_mask(s.kind, cy, cx, SIZES[s.size] * scale, size)] = COLOURS[s.colour]
    return Image.fromarray(img)


class ShapesWorld:
    """Scenes of one or two shapes in distinct quadrants, deterministic from ``(seed, index)``."""

    def __init__(self, seed: int = 0, size: int = 32, max_shapes: int = 2):
        self.seed, self.size, self.max_shapes = seed, size, max_shapes

    def scene(self, index: int) -> tuple[tuple[Shape, ...], tuple[tuple[float, float], ...]]:
        rng = np.random.default_rng([self.seed, index])
        n = 1 + int(rng.integers(self.max_shapes))
        quads = rng.choice(len(POSITIONS), size=n, replace=False)
        shapes = tuple(
            Shape(KINDS[rng.integers(len(KINDS))], list(COLOURS)[rng.integers(len(COLOURS))],
                  list(SIZES)[rng.integers(len(SIZES))], POSITIONS[q])
            for q in sorted(quads)
        )
        jitter = tuple((float(rng.uniform(-JITTER, JITTER)), float(rng.uniform(-JITTER, JITTER))) for _ in shapes)
        return shapes, jitter

    def sample(self, index: int) -> tuple[Image.Image, str, tuple[Shape, ...]]:
        shapes, jitter = self.scene(index)
        return render(shapes, self.size, jitter), caption(shapes), shapes

    def pairs(self, start: int = 0, count: int | None = None) -> Iterator[tuple[Image.Image, str]]:
        """(image, caption) pairs from ``start`` on: the source interface the distillation data accepts."""
        i = start
        while count is None or i < start + count:
            image, text, _ = self.sample(i)
            yield image, text
            i += 1

    def prompts(self, count: int, start: int = 10**6) -> list[str]:
        """Evaluation prompts, from an index range disjoint from training (which counts up from 0)."""
        return [self.sample(start + i)[1] for i in range(count)]
