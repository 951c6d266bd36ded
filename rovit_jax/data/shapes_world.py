"""A procedurally generated open-vocabulary "shapes world" (pure numpy + PIL).

Every scene is a small image with 1..max_objects coloured shapes on a textured background, plus
instance masks, boxes, category labels and a caption naming every object. Categories are
"colour shape" pairs split into LVIS-style frequency groups; the rare group is what detection
training later holds out as "novel", while captions keep mentioning it during pretraining.

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
    """One object category of the shapes world."""

    id: int
    name: str  # "colour shape", e.g. "red circle"
    shape: str
    colour: str
    frequency: str  # "f" (frequent), "c" (common) or "r" (rare)


# Saturated object colours; backgrounds are kept muted (low saturation, mid value) so no
# background pixel ever equals an object colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
}

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "cross",
    "ring",
    "diamond",
    "heart",
    "crescent",
)

# Share of object instances drawn from each frequency group.
GROUP_SHARE: dict[str, float] = {"f": 0.6, "c": 0.3, "r": 0.1}

_TABLE: tuple[tuple[str, str, str], ...] = (
    # frequent
    ("red", "circle", "f"),
    ("blue", "circle", "f"),
    ("green", "circle", "f"),
    ("red", "square", "f"),
    ("blue", "square", "f"),
    ("green", "triangle", "f"),
    ("yellow", "triangle", "f"),
    ("blue", "triangle", "f"),
    ("yellow", "star", "f"),
    ("purple", "hexagon", "f"),
    ("orange", "diamond", "f"),
    ("white", "cross", "f"),
    # common
    ("yellow", "circle", "c"),
    ("purple", "circle", "c"),
    ("white", "circle", "c"),
    ("green", "square", "c"),
    ("orange", "square", "c"),
    ("red", "triangle", "c"),
    ("blue", "star", "c"),
    ("red", "ring", "c"),
    ("blue", "ring", "c"),
    ("green", "hexagon", "c"),
    ("purple", "diamond", "c"),
    ("orange", "cross", "c"),
    ("yellow", "heart", "c"),
    ("white", "crescent", "c"),
    # rare: every shape and colour here also occurs in some frequent/common category
    ("purple", "star", "r"),
    ("orange", "circle", "r"),
    ("white", "square", "r"),
    ("green", "diamond", "r"),
    ("yellow", "hexagon", "r"),
    ("blue", "heart", "r"),
    ("red", "crescent", "r"),
    ("purple", "cross", "r"),
)

CATEGORIES: tuple[Category, ...] = tuple(
    Category(id=i, name=f"{colour} {shape}", shape=shape, colour=colour, frequency=freq)
    for i, (colour, shape, freq) in enumerate(_TABLE)
)

BACKGROUNDS: tuple[str, ...] = ("noisy", "striped", "checkered", "gradient")

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
_MIN_VISIBLE_FRACTION = 0.4
_PLACEMENT_ATTEMPTS = 8
_SIZE_RANGE = (0.08, 0.6)  # object extent as a fraction of the image side


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
    """English plural of a category's last word: "red cross" -> "red crosses"."""
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    return noun + "s"


# ----------------------------------------------------------------------------------------------
# Drawing.


def _polygon(radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Unit-scale polygon vertices [V, 2] as (x, y) from polar radii/angles."""
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)


def _regular(n: int, offset: float) -> np.ndarray:
    angles = offset + np.arange(n) * 2.0 * np.pi / n
    return _polygon(np.ones(n), angles)


_STAR = _polygon(np.tile([1.0, 0.45], 5), -np.pi / 2 + np.arange(10) * np.pi / 5)
_CROSS = np.array(
    [
        (-0.3, -1),
        (0.3, -1),
        (0.3, -0.3),
        (1, -0.3),
        (1, 0.3),
        (0.3, 0.3),
        (0.3, 1),
        (-0.3, 1),
        (-0.3, 0.3),
        (-1, 0.3),
        (-1, -0.3),
        (-0.3, -0.3),
    ],
    dtype=np.float64,
)
_DIAMOND = np.array([(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)])


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], axis=-1)
    pts -= (pts.max(0) + pts.min(0)) / 2  # centre the bounding box
    return pts / np.abs(pts).max()


_HEART = _heart()


def _rotate(points: np.ndarray, theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return points @ np.array([[c, s], [-s, c]])


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Boolean mask [size, size] of one shape centred at (cx, cy) with outer radius r (pixels)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)

    def poly(unit: np.ndarray, angle: float) -> None:
        pts = _rotate(unit, angle) * r + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)

    disc = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(disc, fill=255)
    elif shape == "ring":
        draw.ellipse(disc, fill=255)
        ri = 0.55 * r
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    elif shape == "crescent":
        draw.ellipse(disc, fill=255)
        ox, oy = 0.45 * r * np.cos(theta), 0.45 * r * np.sin(theta)
        ri = 0.85 * r
        draw.ellipse((cx + ox - ri, cy + oy - ri, cx + ox + ri, cy + oy + ri), fill=0)
    elif shape == "square":
        poly(_regular(4, np.pi / 4), theta)
    elif shape == "triangle":
        poly(_regular(3, -np.pi / 2), theta)
    elif shape == "hexagon":
        poly(_regular(6, 0.0), theta)
    elif shape == "star":
        poly(_STAR, theta)
    # Small tilts only: a cross turned 45 degrees or a flat diamond would read as other shapes.
    elif shape == "cross":
        poly(_CROSS, 0.3 * np.sin(theta))
    elif shape == "diamond":
        poly(_DIAMOND, 0.3 * np.sin(theta))
    elif shape == "heart":
        poly(_HEART, 0.3 * np.sin(theta))
    else:
        raise ValueError(f"shape={shape!r} is not one of {SHAPES}")
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
    elif kind == "striped":
        phi = rng.uniform(0.0, np.pi)
        period = rng.uniform(0.05, 0.2) * size
        t = (xx * np.cos(phi) + yy * np.sin(phi)) / period
        sel = (np.floor(t) % 2 == 0)[..., None]
        img = np.where(sel, a, b)
    elif kind == "checkered":
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


def _shade(
    rng: np.random.Generator,
    colour: str,
    ys: np.ndarray,
    xs: np.ndarray,
    cx: float,
    cy: float,
    r: float,
) -> np.ndarray:
    """Jittered, mildly shaded object colour at the given pixels, float [P, 3]."""
    base = np.asarray(COLOURS[colour], dtype=np.float64) + rng.uniform(-12.0, 12.0, 3)
    gy, gx = rng.uniform(-0.12, 0.12, 2)
    light = 1.0 + (gy * (ys - cy) + gx * (xs - cx)) / max(r, 1.0)
    return np.clip(base[None, :] * light[:, None], 0.0, 255.0)


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
    """A caption naming every object, counts grouped per category ("two red circles").

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
      max_objects: maximum number of objects (>= 1); the scene holds 1..max_objects.

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
    placed: list[tuple[int, float, float, float]] = []  # (label, cx, cy, r)

    num_wanted = int(rng.integers(1, max_objects + 1))
    log_lo, log_hi = np.log(_SIZE_RANGE[0]), np.log(_SIZE_RANGE[1])
    for _ in range(num_wanted):
        label = int(rng.choice(len(CATEGORIES), p=_WEIGHTS))
        shape = CATEGORIES[label].shape
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
            placed.append((label, float(cx), float(cy), r))
            break

    if not placed:  # crowded-out fallback: one mid-sized object in the centre always fits
        label = int(rng.choice(len(CATEGORIES), p=_WEIGHTS))
        cx = cy = size / 2
        r = 0.2 * size
        theta = float(rng.uniform(0.0, 2.0 * np.pi))
        mask = _shape_mask(CATEGORIES[label].shape, size, cx, cy, r, theta)
        owner[mask] = 0
        placed.append((label, cx, cy, r))

    image = background
    masks = np.stack([owner == k for k in range(len(placed))])
    boxes = np.zeros((len(placed), 4), dtype=np.float32)
    for k, (label, cx, cy, r) in enumerate(placed):
        ys, xs = np.nonzero(masks[k])
        image[ys, xs] = _shade(rng, CATEGORIES[label].colour, ys, xs, cx, cy, r)
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
