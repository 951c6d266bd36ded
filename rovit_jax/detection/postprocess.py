"""Host-side post-processing of detections: back to original image coordinates, mask pasting."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["paste_masks", "to_original_coordinates"]


def to_original_coordinates(boxes: np.ndarray, scale: float, height: int, width: int) -> np.ndarray:
    """Pixel boxes [N, 4] of the resized+padded input -> boxes of the original image, clipped."""
    out = np.asarray(boxes, np.float32) / float(scale)
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, height)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, width)
    return out


def paste_masks(
    masks: np.ndarray, boxes: np.ndarray, height: int, width: int, *, threshold: float = 0.5
) -> np.ndarray:
    """Pastes box-relative mask probabilities into full images.

    Args:
      masks: [N, m, m] probabilities over each box.
      boxes: [N, 4] (y0, x0, y1, x1) in pixels of the target image.
      height, width: target image size.

    Returns:
      [N, height, width] bool masks (empty where a box has no pixel).
    """
    out = np.zeros((len(masks), height, width), bool)
    for i, (m, (y0, x0, y1, x1)) in enumerate(zip(masks, boxes)):
        top, left = int(np.floor(y0)), int(np.floor(x0))
        bottom, right = int(np.ceil(y1)), int(np.ceil(x1))
        h, w = bottom - top, right - left
        if h <= 0 or w <= 0:
            continue
        resized = np.asarray(
            Image.fromarray(np.asarray(m, np.float32)).resize((w, h), Image.BILINEAR)
        )
        t, b_ = max(top, 0), min(bottom, height)
        l_, r = max(left, 0), min(right, width)
        if t >= b_ or l_ >= r:
            continue
        out[i, t:b_, l_:r] = resized[t - top : b_ - top, l_ - left : r - left] >= threshold
    return out
