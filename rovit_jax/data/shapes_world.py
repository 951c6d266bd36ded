"""A procedurally generated open-vocabulary "shapes world" (pure numpy + PIL).

Every scene is a small image with 1..max_objects shapes on a textured background, plus instance
masks, boxes, category labels and a caption naming every object. A category is a surface, a
pattern in a named colour ("striped red", "dotted blue": 4 patterns x 8 colours); each object's
silhouette is random and never named, so colour and pattern, and only they, tell the categories
apart. Categories fall into LVIS-style frequency groups; the rare group is what detection training
later holds out as "novel", while captions keep mentioning it during pretraining.

Box convention: normalised (y0, x0, y1, x1) in pixel-edge coordinates, i.e. for a visible mask whose
rows span [r0, r1] and columns [c0, c1] (inclusive), the box is (r0, c0, r1 + 1, c1 + 1) / S.
"""

from __future__ import annotations

import colorsys
import dataclasses
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


@dataclasses.dataclass(frozen=True)
class Category:
    """One object category of the shapes world: a surface (colour and pattern), whatever its shape."""

    id: int
    name: str  # "<pattern> <colour>", e.g. "striped red"
    colour: str
    pattern: str
    frequency: str  # "f" (frequent), "c" (common) or "r" (rare)


# colour name -> (hue in degrees, saturation, value); hues at least 25 degrees apart, all
# saturated and bright, so that no object colour is ever close to a (muted) background.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.85, 0.9),
    "orange": (28.0, 0.9, 0.95),
    "yellow": (55.0, 0.85, 0.95),
    "green": (120.0, 0.75, 0.8),
    "cyan": (182.0, 0.8, 0.9),
    "blue": (225.0, 0.8, 0.95),
    "purple": (275.0, 0.7, 0.85),
    "pink": (322.0, 0.55, 0.95),
}
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")

# The rare (novel) group is every colour of one pattern: no object with that pattern is ever a
# detection training target, while pretraining captions name it, as LVIS's rare categories are
# concepts a detector trained on the base categories never saw (with a rare pattern's colours seen
# on other patterns, a detector would tell novel categories apart from their words alone).
RARE_PATTERN = "checkered"


def _table() -> tuple[tuple[str, str, str], ...]:
    base = [(c, p) for p in PATTERNS if p != RARE_PATTERN for c in COLOURS]
    rows = [(c, p, "f" if i % 2 == 0 else "c") for i, (c, p) in enumerate(base)]
    return tuple(rows + [(c, RARE_PATTERN, "r") for c in COLOURS])


# A category is what an object's surface looks like: its colour and its pattern; its silhouette
# is a random nuisance. Captions name exactly that pair, so an image-text objective must see both
# colour and texture to tell the captions of a batch apart (colour alone leaves four categories
# per caption word; pattern alone, eight). A tiny ViT learns such patch-local features within a
# CPU budget; it did not learn 32 silhouettes there, even with labels (see the README).
CATEGORIES: tuple[Category, ...] = tuple(
    Category(id=i, name=f"{p} {c}", colour=c, pattern=p, frequency=f)
    for i, (c, p, f) in enumerate(_table())
)

# Share of object instances drawn from each frequency group (per category: frequent 4.7%,
# common 3.2%, rare 0.75%). Rare objects are rare, as in LVIS: unannotated in detection training,
# they are background there, and a detector that saw them in a fifth of all objects (an earlier
# draft) learned to suppress them outright; captions still name each rare category about a
# hundred times in the 6000 training images.
GROUP_SHARE: dict[str, float] = {"f": 0.56, "c": 0.38, "r": 0.06}

# Background kinds; named apart from the object patterns so that captions never share the words.
BACKGROUNDS: tuple[str, ...] = ("noisy", "lined", "tiled", "gradient")

_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)

# An object must keep this many visible pixels, and this fraction of its unoccluded area.
_MIN_PIXELS = 10
_MIN_VISIBLE_FRACTION = 0.5
_PLACEMENT_ATTEMPTS = 8
_COUNT_DECAY = 0.75
# Outer diameter as a fraction of the image side (a 5x span; the visible extents span over 4x):
# the smallest objects still cover more than a patch of the 8-pixel patch grid at the 64-pixel
# pretraining resolution.
SIZE_RANGE = (0.14, 0.7)
# Object colours are the named COLOURS with this much hue jitter (degrees); backgrounds are muted
# (low saturation), so no background pixel ever looks like an object.
_HUE_JITTER = 6.0
# Patterns repeat every PATTERN_PERIOD of the image side (10 px at 128 px, 5 px at the 64 px of
# pretraining): the smallest objects still show about two periods. Each pattern's marks also have
# their own tone (stripes mid grey, dots near black, checks white): at detection's resolution a
# period spans more than a patch, so what the pretrained tower can tell apart there is mostly
# tone, not texture. The tones differ on average over a region too: darkened stripes (world
# 3.0.0) made striped and dotted surfaces equally dark on average (0.70 and 0.74 of the object's
# colour), and the detector confused the two. White is the tone the towers learn best (README,
# "The shapes world"), which is why the checks, the novel pattern, are white.
PATTERN_PERIOD = 0.08
_GREY_MARK = 128.0
_BLACK_MARK = 0.08
_WHITE_MARK = 245.0
_DOT_RADIUS = 0.3


def category_names() -> list[str]:
    """Category names in id order (the class list of the dataset)."""
    return [c.name for c in CATEGORIES]


def frequency_groups() -> dict[str, list[int]]:
    """Category ids per frequency group: {"f": [...], "c": [...], "r": [...]}."""
    groups: dict[str, list[int]] = {"f": [], "c": [], "r": []}
    for c in CATEGORIES:
        groups[c.frequency].append(c.id)
    return groups


def category_weights() -> np.ndarray:
    """Sampling probability of each category, float64 [num_categories], summing to 1."""
    groups = frequency_groups()
    weights = np.zeros(len(CATEGORIES))
    for group, ids in groups.items():
        weights[ids] = GROUP_SHARE[group] / len(ids)
    return weights / weights.sum()


_WEIGHTS = category_weights()


def plural(noun: str) -> str:
    """English plural of a category's last word: "cross" -> "crosses"."""
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


# ----------------------------------------------------------------------------------------------
# Drawing. Every shape is a list of unit-scale polygons in (x, y), y down, within about the unit
# disc; each is filled (255) or cut out (0) in order.


def _polygon(radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Unit-scale polygon vertices [V, 2] as (x, y) from polar radii/angles."""
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)


def _regular(n: int, offset: float) -> np.ndarray:
    angles = offset + np.arange(n) * 2.0 * np.pi / n
    return _polygon(np.ones(n), angles)


def _star(points: int, inner: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    return _polygon(np.tile([1.0, inner], points), angles)


def _disc(cx: float, cy: float, r: float, rx: float | None = None) -> np.ndarray:
    """A disc (or an ellipse with x semi-axis rx) as a 48-gon."""
    t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    return np.stack([cx + (r if rx is None else rx) * np.cos(t), cy + r * np.sin(t)], -1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int = 32) -> np.ndarray:
    t = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], -1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=-1)
    pts -= (pts.max(0) + pts.min(0)) / 2  # centre the bounding box
    return pts / np.abs(pts).max()


def _pts(*xy: tuple[float, float]) -> np.ndarray:
    return np.array(xy, dtype=np.float64)


_FILL, _CUT = 255, 0
_PETALS = [
    _disc(0.58 * np.cos(a), 0.58 * np.sin(a), 0.42) for a in -np.pi / 2 + np.arange(5) * 0.4 * np.pi
]

# shape -> (parts [(polygon, fill)], upright): upright shapes only tilt a little, since e.g. a
# cross turned 45 degrees, a crown upside down or a flat diamond would read as something else.
_SHAPE_PARTS: dict[str, tuple[list[tuple[np.ndarray, int]], bool]] = {
    "circle": ([(_disc(0, 0, 1), _FILL)], False),
    "square": ([(_regular(4, np.pi / 4), _FILL)], False),
    "triangle": ([(_regular(3, -np.pi / 2), _FILL)], False),
    "star": ([(_star(5, 0.45), _FILL)], False),
    "cross": (
        [
            (
                _pts(
                    *[(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3)],
                    *[(0.3, 1), (-0.3, 1), (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
                ),
                _FILL,
            )
        ],
        True,
    ),
    "ring": ([(_disc(0, 0, 1), _FILL), (_disc(0, 0, 0.55), _CUT)], False),
    "oval": ([(_disc(0, 0, 0.5, rx=1.0), _FILL)], False),
    "bar": ([(_rect(-1, -0.28, 1, 0.28), _FILL)], False),
    "arrow": (
        [
            (
                _pts(
                    (-1, -0.2),
                    (0.15, -0.2),
                    (0.15, -0.6),
                    (1, 0),
                    (0.15, 0.6),
                    (0.15, 0.2),
                    (-1, 0.2),
                ),
                _FILL,
            )
        ],
        False,
    ),
    "heart": ([(_heart(), _FILL)], True),
    "crescent": ([(_disc(0, 0, 1), _FILL), (_disc(0.45, 0, 0.85), _CUT)], False),
    "house": (
        [
            (
                _pts((-0.65, 1), (-0.65, 0), (-0.95, 0), (0, -1), (0.95, 0), (0.65, 0), (0.65, 1)),
                _FILL,
            )
        ],
        True,
    ),
    "hexagon": ([(_regular(6, 0.0), _FILL)], False),
    "diamond": ([(_pts((0, -1), (0.62, 0), (0, 1), (-0.62, 0)), _FILL)], True),
    "semicircle": ([(np.concatenate([_arc(0, -0.5, 1, 0, np.pi)]), _FILL)], False),
    "trapezoid": ([(_pts((-1, 0.6), (1, 0.6), (0.42, -0.6), (-0.42, -0.6)), _FILL)], False),
    "frame": ([(_regular(4, np.pi / 4), _FILL), (0.55 * _regular(4, np.pi / 4), _CUT)], False),
    "tee": (
        [
            (
                _pts(
                    (-1, -1),
                    (1, -1),
                    (1, -0.45),
                    (0.28, -0.45),
                    (0.28, 1),
                    (-0.28, 1),
                    (-0.28, -0.45),
                    (-1, -0.45),
                ),
                _FILL,
            )
        ],
        False,
    ),
    "chevron": (
        [(_pts((-1, -0.75), (0, 0.15), (1, -0.75), (1, -0.05), (0, 0.85), (-1, -0.05)), _FILL)],
        False,
    ),
    "flower": ([*[(p, _FILL) for p in _PETALS], (_disc(0, 0, 0.4), _FILL)], False),
    "drop": (
        [(_disc(0, 0.38, 0.62), _FILL), (_pts((0, -1), (-0.56, 0.12), (0.56, 0.12)), _FILL)],
        False,
    ),
    "bolt": (
        [
            (
                _pts(
                    (-0.15, -1),
                    (0.65, -1),
                    (0.15, -0.15),
                    (0.6, -0.15),
                    (-0.45, 1),
                    (-0.05, 0.12),
                    (-0.5, 0.12),
                ),
                _FILL,
            )
        ],
        False,
    ),
    "crown": (
        [
            (
                _pts(
                    (-1, 0.75),
                    (-1, -0.8),
                    (-0.5, -0.05),
                    (0, -0.9),
                    (0.5, -0.05),
                    (1, -0.8),
                    (1, 0.75),
                ),
                _FILL,
            )
        ],
        True,
    ),
    "dumbbell": (
        [
            (_disc(-0.62, 0, 0.38), _FILL),
            (_disc(0.62, 0, 0.38), _FILL),
            (_rect(-0.62, -0.14, 0.62, 0.14), _FILL),
        ],
        False,
    ),
    "wedge": (
        [(np.concatenate([_pts((0, 0)), _arc(0, 0, 1, 0.65, 2 * np.pi - 0.65)]), _FILL)],
        False,
    ),
    "sparkle": ([(_star(4, 0.3), _FILL)], False),
    "bowtie": (
        [(_pts((-1, -0.8), (0, -0.15), (1, -0.8), (1, 0.8), (0, 0.15), (-1, 0.8)), _FILL)],
        False,
    ),
    "corner": (
        [(_pts((-0.8, -1), (-0.25, -1), (-0.25, 0.45), (0.8, 0.45), (0.8, 1), (-0.8, 1)), _FILL)],
        False,
    ),
    "arch": (
        [
            (_disc(0, -0.1, 0.9), _FILL),
            (_rect(-0.9, -0.1, 0.9, 1), _FILL),
            (_disc(0, 0.15, 0.42), _CUT),
            (_rect(-0.42, 0.15, 0.42, 1.01), _CUT),
        ],
        True,
    ),
    "mushroom": (
        [
            (np.concatenate([_arc(0, 0.05, 1, np.pi, 2 * np.pi)]), _FILL),
            (_rect(-0.28, 0, 0.28, 0.95), _FILL),
        ],
        True,
    ),
    "fish": (
        [(_disc(-0.25, 0, 0.42, rx=0.72), _FILL), (_pts((0.3, 0), (1, -0.55), (1, 0.55)), _FILL)],
        False,
    ),
    "hexagram": ([(_regular(3, -np.pi / 2), _FILL), (_regular(3, np.pi / 2), _FILL)], False),
}


# Silhouettes an object may take (a nuisance: no caption names them).
SHAPES: tuple[str, ...] = tuple(_SHAPE_PARTS)


def _rotate(points: np.ndarray, theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return points @ np.array([[c, s], [-s, c]])


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Boolean mask [size, size] of one shape centred at (cx, cy) with outer radius r (pixels)."""
    if shape not in _SHAPE_PARTS:
        raise ValueError(f"shape={shape!r} is not one of {tuple(_SHAPE_PARTS)}")
    parts, upright = _SHAPE_PARTS[shape]
    angle = 0.3 * np.sin(theta) if upright else theta
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for unit, fill in parts:
        pts = _rotate(unit, angle) * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    return np.asarray(canvas) > 0


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform()
    s = rng.uniform(0.05, 0.3)
    v = rng.uniform(0.25, 0.7)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """Muted textured background, float32 [size, size, 3] in [0, 255], and its kind."""
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    a, b = _muted_colour(rng), _muted_colour(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "noisy":
        img = a + rng.normal(0.0, rng.uniform(6.0, 16.0), (size, size, 3))
    elif kind == "lined":
        phi = rng.uniform(0.0, np.pi)
        period = rng.uniform(0.05, 0.2) * size
        t = (xx * np.cos(phi) + yy * np.sin(phi)) / period
        sel = (np.floor(t) % 2 == 0)[..., None]
        img = np.where(sel, a, b)
    elif kind == "tiled":
        cell = max(2.0, rng.uniform(0.04, 0.15) * size)
        sel = ((np.floor(yy / cell) + np.floor(xx / cell)) % 2 == 0)[..., None]
        img = np.where(sel, a, b)
    else:  # gradient
        phi = rng.uniform(0.0, 2.0 * np.pi)
        t = (xx - size / 2) * np.cos(phi) + (yy - size / 2) * np.sin(phi)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = a + (b - a) * t[..., None]
    img = img + rng.normal(0.0, 3.0, (size, size, 3))
    return np.clip(img, 0.0, 255.0).astype(np.float32), kind


def _object_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    """RGB of a named colour with a little jitter, float [3] in [0, 255]."""
    hue, sat, val = COLOURS[colour]
    h = (hue + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) / 360.0 % 1.0
    s = np.clip(sat + rng.uniform(-0.08, 0.08), 0.0, 1.0)
    v = np.clip(val + rng.uniform(-0.08, 0.05), 0.0, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v)) * 255.0


def _pattern_on(
    pattern: str, ys: np.ndarray, xs: np.ndarray, theta: float, period: float, phase: np.ndarray
) -> np.ndarray:
    """Which of the given pixels carry the pattern's marks: bool [P].

    The pattern lives in the object's own frame (turned by theta, shifted by phase) with a period
    in pixels fixed per image, so that it reads the same on small and large objects.
    """
    c, s = np.cos(theta), np.sin(theta)
    u = ((xs + 0.5) * c + (ys + 0.5) * s) / period + phase[0]
    v = (-(xs + 0.5) * s + (ys + 0.5) * c) / period + phase[1]
    if pattern == "plain":
        return np.zeros(ys.shape, dtype=bool)
    if pattern == "striped":
        return (u % 1.0) < 0.5
    if pattern == "checkered":
        return ((np.floor(2.0 * u) + np.floor(2.0 * v)) % 2) == 0
    if pattern == "dotted":
        du, dv = u % 1.0 - 0.5, v % 1.0 - 0.5
        return du * du + dv * dv < _DOT_RADIUS**2
    raise ValueError(f"pattern={pattern!r} is not one of {PATTERNS}")


def _paint(
    rng: np.random.Generator,
    category: Category,
    ys: np.ndarray,
    xs: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    theta: float,
    size: int,
) -> np.ndarray:
    """The category's surface, mildly shaded across the object, at the given pixels: float [P, 3]."""
    base = _object_colour(rng, category.colour)
    gy, gx = rng.uniform(-0.12, 0.12, 2)
    light = 1.0 + (gy * (ys - cy) + gx * (xs - cx)) / max(r, 1.0)
    marks = _pattern_on(
        category.pattern, ys, xs, theta, PATTERN_PERIOD * size, rng.uniform(0.0, 1.0, 2)
    )
    surface = np.where(marks[:, None], _mark_colour(category.pattern, base)[None, :], base[None, :])
    return np.clip(surface * light[:, None], 0.0, 255.0)


def _mark_colour(pattern: str, base: np.ndarray) -> np.ndarray:
    """The colour of a pattern's marks on an object of colour base: float [3] in [0, 255]."""
    if pattern == "striped":
        return np.full(3, _GREY_MARK)
    if pattern == "dotted":
        return base * _BLACK_MARK
    return np.full(3, _WHITE_MARK)  # checkered (plain has no marks)


# ----------------------------------------------------------------------------------------------
# Captions.


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _count_phrase(count: int, name: str) -> str:
    if count == 1:
        return _with_article(name)
    word = _NUMBER_WORDS[count] if count < len(_NUMBER_WORDS) else str(count)
    return f"{word} {plural(name)}"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _relation(box_a: np.ndarray, box_b: np.ndarray) -> str:
    """Where box a sits relative to box b (image coordinates, y down)."""
    dy = (box_a[0] + box_a[2] - box_b[0] - box_b[2]) / 2
    dx = (box_a[1] + box_a[3] - box_b[1] - box_b[3]) / 2
    if max(abs(dx), abs(dy)) < 0.1:
        return "next to"
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def make_caption(
    rng: np.random.Generator, labels: np.ndarray, boxes: np.ndarray, background: str
) -> str:
    """A caption naming every object, counts grouped per category ("two striped reds").

    Args:
      rng: random generator choosing the template and the order of mentions.
      labels: int [N] category ids, N >= 1.
      boxes: float [N, 4] normalised (y0, x0, y1, x1) boxes (used for spatial relations).
      background: background kind, one of BACKGROUNDS.
    """
    if len(labels) == 0:
        raise ValueError("labels must contain at least one object")
    order: list[int] = []
    counts: dict[int, int] = {}
    for label in labels.tolist():
        if label not in counts:
            order.append(label)
            counts[label] = 0
        counts[label] += 1
    order = [order[i] for i in rng.permutation(len(order))]
    phrases = [_count_phrase(counts[c], CATEGORIES[c].name) for c in order]
    listing = _join(phrases)
    total = len(labels)
    bg = f"on a {background} background"

    template = int(rng.integers(8))
    if template == 7 and total == 2 and labels[0] != labels[1]:
        a, b = (0, 1) if rng.uniform() < 0.5 else (1, 0)
        rel = _relation(boxes[a], boxes[b])
        first = _with_article(CATEGORIES[int(labels[a])].name)
        second = _with_article(CATEGORIES[int(labels[b])].name)
        return f"{first} {rel} {second} {bg}."
    if template == 0:
        return f"a photo of {listing}."
    if template == 1:
        word = _NUMBER_WORDS[total] if total < len(_NUMBER_WORDS) else str(total)
        return f"{word} {'shape' if total == 1 else 'shapes'}: {listing}."
    if template == 2:
        return f"{listing} {bg}."
    if template == 3:
        return f"an image of {listing} {bg}."
    if template == 4:
        return f"there {'is' if total == 1 else 'are'} {listing} in the picture."
    if template == 5:
        return f"a picture showing {listing}."
    return f"{listing}, drawn {bg}."


# ----------------------------------------------------------------------------------------------
# Scenes.


def render_scene(
    rng: np.random.Generator, image_size: int, *, max_objects: int = 6
) -> dict[str, Any]:
    """Renders one random scene.

    Objects are placed one after another, later ones on top. A placement is rejected (and retried
    a few times) when it would leave the new object or any earlier one with too few visible pixels,
    so every returned object keeps at least 40% of its own area visible.

    Args:
      rng: numpy random generator; the scene is a deterministic function of its state.
      image_size: image side S in pixels (>= 16).
      max_objects: maximum number of objects (>= 1); the scene holds 1..max_objects, n objects
        with probability proportional to 0.75^n.

    Returns:
      dict with
        image: uint8 [S, S, 3];
        boxes: float32 [N, 4] normalised (y0, x0, y1, x1) tight bounds of each visible mask;
        masks: bool [N, S, S] visible pixels of each object (pairwise disjoint);
        labels: int32 [N] category ids;
        caption: str naming every object.
    """
    if int(image_size) != image_size or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
    if int(max_objects) != max_objects or max_objects < 1:
        raise ValueError(f"max_objects must be an integer >= 1, got {max_objects!r}")
    size = int(image_size)
    background, bg_kind = _background(rng, size)

    owner = np.full((size, size), -1, dtype=np.int32)  # index of the top-most object per pixel
    visible: list[int] = []  # visible pixel count per placed object
    needed: list[float] = []  # minimum visible pixel count per placed object
    placed: list[tuple[int, float, float, float, float]] = []  # (label, cx, cy, r, theta)

    # Fewer objects are likelier (P(n) ~ 0.75^n): a caption naming one or two shapes ties each
    # name to its object far sooner than one naming six, while crowded scenes still occur.
    counts = np.arange(1, max_objects + 1)
    p_count = _COUNT_DECAY ** (counts - 1)
    num_wanted = int(rng.choice(counts, p=p_count / p_count.sum()))
    log_lo, log_hi = np.log(SIZE_RANGE[0]), np.log(SIZE_RANGE[1])
    for _ in range(num_wanted):
        label = int(rng.choice(len(CATEGORIES), p=_WEIGHTS))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        for _attempt in range(_PLACEMENT_ATTEMPTS):
            r = 0.5 * size * float(np.exp(rng.uniform(log_lo, log_hi)))
            # Allow up to 40% of the radius to leave the frame.
            cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, 2)
            theta = float(rng.uniform(0.0, 2.0 * np.pi))
            mask = _shape_mask(shape, size, float(cx), float(cy), r, theta)
            area = int(mask.sum())
            if area < _MIN_PIXELS:
                continue
            under = owner[mask]
            lost = np.bincount(under[under >= 0], minlength=len(visible))
            remaining = np.asarray(visible, dtype=np.int64) - lost
            if np.any(remaining < np.asarray(needed)):
                continue
            owner[mask] = len(visible)
            visible[:] = remaining.tolist()
            visible.append(area)
            needed.append(max(_MIN_PIXELS, _MIN_VISIBLE_FRACTION * area))
            placed.append((label, float(cx), float(cy), r, theta))
            break

    if not placed:  # crowded-out fallback: one mid-sized object in the centre always fits
        label = int(rng.choice(len(CATEGORIES), p=_WEIGHTS))
        cx = cy = size / 2
        r = 0.2 * size
        theta = float(rng.uniform(0.0, 2.0 * np.pi))
        mask = _shape_mask(SHAPES[int(rng.integers(len(SHAPES)))], size, cx, cy, r, theta)
        owner[mask] = 0
        placed.append((label, cx, cy, r, theta))

    image = background
    masks = np.stack([owner == k for k in range(len(placed))])
    boxes = np.zeros((len(placed), 4), dtype=np.float32)
    for k, (label, cx, cy, r, theta) in enumerate(placed):
        ys, xs = np.nonzero(masks[k])
        image[ys, xs] = _paint(rng, CATEGORIES[label], ys, xs, cx, cy, r, theta, size)
        boxes[k] = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    boxes /= size
    labels = np.array([p[0] for p in placed], dtype=np.int32)
    caption = make_caption(rng, labels, boxes, bg_kind)
    return {
        "image": np.round(image).astype(np.uint8),
        "boxes": boxes,
        "masks": masks,
        "labels": labels,
        "caption": caption,
    }
