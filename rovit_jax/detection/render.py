"""Draws detections (boxes, masks, labelled scores) on an image and writes a PNG."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rovit_jax import paths

__all__ = [
    "PALETTE",
    "draw_detections",
    "one_label_per_object",
    "render_detection_grid",
    "render_detections",
    "save_png",
]

# Distinct, saturated colours (Tableau 10); a detection's colour is chosen by its label.
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `fill` (relative luminance)."""
    r, g, b = fill
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether rectangles (x0, y0, x1, y1) a and b intersect."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    *,
    masks: np.ndarray | None = None,
    max_boxes: int | None = None,
    min_score: float = 0.0,
    upscale: int | None = None,
    min_side: int = 512,
    mask_alpha: float = 0.45,
) -> Image.Image:
    """The image with detections drawn: translucent masks, box outlines and filled label tags.

    Args:
      image: uint8 [H, W, 3].
      boxes: [N, 4] (y0, x0, y1, x1) in pixels of `image`.
      scores: [N]; labels: [N] int indices into `names`.
      names: label names; each tag reads "<name> <score>".
      masks: optional bool [N, H, W] instance masks.
      max_boxes: draw at most this many (highest scores); None = all.
      min_score: skip detections scoring below this.
      upscale: integer zoom (nearest neighbour) before drawing; None = the smallest zoom that
        makes the shorter side at least `min_side` pixels, so tags stay legible on small images.
      mask_alpha: opacity of mask overlays.

    Returns:
      An RGB PIL image of size (W * upscale, H * upscale). Colours follow labels (PALETTE);
      the best detection is drawn last (on top).
    """
    image = np.asarray(image, np.uint8)
    h, w = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    scores = np.asarray(scores, np.float32).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if upscale is None:
        upscale = max(1, math.ceil(min_side / max(min(h, w), 1)))
    order = [int(i) for i in np.argsort(-scores, kind="stable") if scores[i] >= min_score]
    if max_boxes is not None:
        order = order[:max_boxes]
    order = order[::-1]  # lowest first, so the best ends on top

    canvas = image.astype(np.float32)
    if masks is not None:
        masks = np.asarray(masks, bool)
        for i in order:
            colour = np.asarray(PALETTE[labels[i] % len(PALETTE)], np.float32)
            m = masks[i]
            canvas[m] = (1 - mask_alpha) * canvas[m] + mask_alpha * colour
    im = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    if upscale > 1:
        im = im.resize((w * upscale, h * upscale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    side = min(im.width, im.height)
    width = max(2, round(side / 250))
    font = ImageFont.load_default(size=max(12, round(side / 36)))
    for i in order:
        colour = PALETTE[labels[i] % len(PALETTE)]
        y0, x0, y1, x1 = (float(v) * upscale for v in boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
    # Tags after every outline, placed best first so that a weaker detection's tag moves aside.
    placed: list[tuple[float, float, float, float]] = []
    for i in order[::-1]:
        colour = PALETTE[labels[i] % len(PALETTE)]
        y0, x0 = float(boxes[i][0]) * upscale, float(boxes[i][1]) * upscale
        name = names[labels[i]] if 0 <= labels[i] < len(names) else str(labels[i])
        text = f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(2, th // 4)
        tag_w, tag_h = tw + 2 * pad, th + 2 * pad
        # Above the box when there is room, else inside its top edge; kept within the image;
        # moved down past tags already placed.
        tx = min(max(x0, 0), max(im.width - tag_w, 0))
        ty = y0 - tag_h if y0 - tag_h >= 0 else max(y0, 0)
        for _ in range(len(placed)):
            hit = [r for r in placed if _overlap(r, (tx, ty, tx + tag_w, ty + tag_h))]
            if not hit:
                break
            ty = max(r[3] for r in hit)
        ty = min(ty, max(im.height - tag_h, 0))
        placed.append((tx, ty, tx + tag_w, ty + tag_h))
        draw.rectangle([tx, ty, tx + tag_w, ty + tag_h], fill=colour)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_text_colour(colour), font=font)
    return im


def save_png(image: Image.Image, path: str) -> None:
    """Writes PIL `image` as a PNG file at `path` (local or a bucket URL), all-or-nothing."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    paths.write_bytes(path, buffer.getvalue())


def render_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    names: Sequence[str],
    path: str,
    *,
    max_boxes: int = 10,
    min_score: float = 0.05,
    upscale: int = 4,
    masks: np.ndarray | None = None,
) -> None:
    """Writes `image` (uint8 [H, W, 3]) with the top boxes ([N, 4] yxyx pixels) and labels."""
    drawn = draw_detections(
        image,
        boxes,
        scores,
        classes,
        names,
        masks=masks,
        max_boxes=max_boxes,
        min_score=min_score,
        upscale=upscale,
    )
    save_png(drawn, path)


def one_label_per_object(
    boxes: np.ndarray,
    scores: np.ndarray,
    min_score: float,
    iou_threshold: float = 0.5,
    *,
    labels: np.ndarray | None = None,
    containment: float = 0.7,
) -> np.ndarray:
    """Indices of the detections to draw: score >= min_score, best first, and no box that
    overlaps an already kept one by IoU > iou_threshold (whatever its class), so that each object
    carries one label. With `labels`, a box is also dropped when it has the label of a kept box
    and more than `containment` of the smaller box's area lies in the other: partial boxes of
    one object (a side of a frame) stack inside its whole box below the IoU bar, while another
    object inside a box (a shape in a ring's hole) has another label.
    boxes [N, 4] (y0, x0, y1, x1), scores [N], labels [N] -> int [M]."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if scores[i] < min_score:
            break
        b = boxes[i]
        area = max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)
        clash = False
        for j in keep:
            o = boxes[j]
            ih = max(min(b[2], o[2]) - max(b[0], o[0]), 0.0)
            iw = max(min(b[3], o[3]) - max(b[1], o[1]), 0.0)
            inter = ih * iw
            other = max(o[2] - o[0], 0.0) * max(o[3] - o[1], 0.0)
            union = area + other - inter
            if union > 0 and inter / union > iou_threshold:
                clash = True
            elif labels is not None and labels[i] == labels[j]:
                smaller = min(area, other)
                clash = smaller > 0 and inter / smaller > containment
            if clash:
                break
        if not clash:
            keep.append(int(i))
    return np.asarray(keep, np.int64)


def render_detection_grid(
    panels: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    names: Sequence[str],
    path: str,
    *,
    min_score: float = 0.3,
    columns: int = 2,
    panel_side: int = 512,
) -> None:
    """Writes several images with their confident detections side by side, one label per object.

    Args:
      panels: [(image uint8 [H, W, 3], boxes [N, 4] yxyx pixels, scores [N], labels [N])].
      names: label names (e.g. a novel category's name marked by the caller).
      path: output PNG.
      min_score: detections scoring below this are not drawn.
      columns: panels per row.
      panel_side: each panel is zoomed (nearest neighbour) to at least this shorter side.
    """
    if not panels:
        raise ValueError("render_detection_grid needs at least one panel")
    drawn = []
    for image, boxes, scores, labels in panels:
        keep = one_label_per_object(boxes, scores, min_score, labels=np.asarray(labels).reshape(-1))
        drawn.append(
            draw_detections(
                image,
                np.asarray(boxes).reshape(-1, 4)[keep],
                np.asarray(scores).reshape(-1)[keep],
                np.asarray(labels).reshape(-1)[keep],
                names,
                min_side=panel_side,
            )
        )
    w = max(im.width for im in drawn)
    h = max(im.height for im in drawn)
    gap = 8
    rows = math.ceil(len(drawn) / columns)
    cols = min(columns, len(drawn))
    sheet = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for k, im in enumerate(drawn):
        sheet.paste(im, ((k % columns) * (w + gap), (k // columns) * (h + gap)))
    save_png(sheet, path)
