"""Draws detections on an image and writes a PNG."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


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
) -> None:
    """Writes `image` (uint8 [H, W, 3]) with the top boxes ([N, 4] yxyx pixels) and labels."""
    im = Image.fromarray(np.asarray(image, np.uint8)).resize(
        (image.shape[1] * upscale, image.shape[0] * upscale), Image.NEAREST
    )
    draw = ImageDraw.Draw(im)
    order = np.argsort(-np.asarray(scores))[:max_boxes]
    for i in order:
        if scores[i] < min_score:
            continue
        y0, x0, y1, x1 = (float(v) * upscale for v in boxes[i])
        draw.rectangle([x0, y0, x1, y1], outline=(255, 0, 255), width=2)
        draw.text((x0 + 2, y0 + 1), f"{names[int(classes[i])]} {scores[i]:.2f}", fill=(255, 255, 0))
    im.save(path)
