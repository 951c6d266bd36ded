"""Geometric transforms of detection examples onto a square canvas: large-scale jitter (training)
and resize-and-pad (inference).

The transforms return an example in the `data.detection_example` format for the square output
canvas (image `[S, S, 3]`, boxes normalised by S, masks `[N, S, S]` bool) plus

  "image_info": float32 [4] = (original height, original width, scale, 0), where `scale` maps
      original pixels to canvas pixels (`original = canvas / scale` when nothing was cropped; the
      resized size is rounded to whole pixels, so this is exact to within half a pixel);
  "valid_size": int32 [2] = (height, width) of the image content at the top left of the canvas;
      the rest of the canvas is padding (zero).

When masks are present the transformed boxes are recomputed as the tight bounds of the
transformed masks (as ViTDet does with LSJ): a crop that cuts a shape shrinks its extent along the
cut too, which clipping the old box cannot know. Instances whose box ends up thinner than
`min_box_size` canvas pixels (cropped away, or too small after downscaling) are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from rovit_jax.data.detection_example import drop_invalid_boxes, validate_example
from rovit_jax.data.pixels import DEFAULT_PIXELS, Pixels


def check_output_size(output_size: Any) -> int:
    if isinstance(output_size, bool) or not isinstance(output_size, (int, np.integer)):
        raise ValueError(f"output_size must be a positive integer, got {output_size!r}")
    if output_size < 1:
        raise ValueError(f"output_size must be a positive integer, got {output_size!r}")
    return int(output_size)


def check_min_box_size(min_box_size: float) -> float:
    if not np.isfinite(min_box_size) or min_box_size < 0:
        raise ValueError(f"min_box_size must be finite and >= 0, got {min_box_size!r}")
    return float(min_box_size)


def _resize_masks(
    masks: np.ndarray,
    factors: tuple[float, float],
    offset: tuple[int, int],
    content: tuple[int, int],
    size: int,
) -> np.ndarray:
    """Resamples bool [N, H, W] masks onto the canvas: bool [N, size, size].

    Canvas pixel (i, j) of the content region samples source position
    ((oy + i + 0.5) / fy, (ox + j + 0.5) / fx), exactly as the image resize does; bilinear
    (antialiased when shrinking) and thresholded at one half. Each instance is resampled only
    around its own extent, which keeps the cost proportional to the objects, not to N * size^2.
    """
    n, h, w = masks.shape
    fy, fx = factors
    oy, ox = offset
    ch, cw = content
    out = np.zeros((n, size, size), np.bool_)
    rows_any, cols_any = masks.any(axis=2), masks.any(axis=1)
    # Source margin covering the bilinear filter support (it widens to 1/f pixels when shrinking).
    margin_y, margin_x = int(np.ceil(1.0 / min(fy, 1.0))) + 1, int(np.ceil(1.0 / min(fx, 1.0))) + 1
    for k in range(n):
        rows, cols = np.flatnonzero(rows_any[k]), np.flatnonzero(cols_any[k])
        if rows.size == 0:
            continue
        # Canvas region that can receive this instance, one pixel of slack on each side.
        ya = max(int(np.floor(rows[0] * fy - oy)) - 1, 0)
        yb = min(int(np.ceil((rows[-1] + 1) * fy - oy)) + 1, ch)
        xa = max(int(np.floor(cols[0] * fx - ox)) - 1, 0)
        xb = min(int(np.ceil((cols[-1] + 1) * fx - ox)) + 1, cw)
        if ya >= yb or xa >= xb:
            continue
        # Its source window (continuous), and an integer crop of the mask around it.
        sy0, sy1 = (oy + ya) / fy, min((oy + yb) / fy, h)
        sx0, sx1 = (ox + xa) / fx, min((ox + xb) / fx, w)
        cy0, cy1 = max(int(np.floor(sy0)) - margin_y, 0), min(int(np.ceil(sy1)) + margin_y, h)
        cx0, cx1 = max(int(np.floor(sx0)) - margin_x, 0), min(int(np.ceil(sx1)) + margin_x, w)
        crop = Image.fromarray(masks[k, cy0:cy1, cx0:cx1].astype(np.uint8) * 255)
        box = (
            max(sx0 - cx0, 0.0),
            max(sy0 - cy0, 0.0),
            min(sx1 - cx0, cx1 - cx0),
            min(sy1 - cy0, cy1 - cy0),
        )
        region = np.asarray(crop.resize((xb - xa, yb - ya), Image.BILINEAR, box=box))
        out[k, ya:yb, xa:xb] = region >= 128
    return out


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """Pixel-edge tight bounds (y0, x0, y1, x1) of bool [N, S, S] masks; zeros for empty masks."""
    n, h, w = masks.shape
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    nonempty = rows.any(axis=1)
    y0 = np.argmax(rows, axis=1)
    y1 = h - np.argmax(rows[:, ::-1], axis=1)
    x0 = np.argmax(cols, axis=1)
    x1 = w - np.argmax(cols[:, ::-1], axis=1)
    boxes = np.stack([y0, x0, y1, x1], axis=1).astype(np.float32)
    return np.where(nonempty[:, None], boxes, 0.0).reshape(n, 4)


def _transform(
    example: dict[str, Any],
    *,
    size: int,
    scale: float,
    unit_offset: tuple[float, float],
    flip: bool,
    min_box_size: float,
) -> dict[str, Any]:
    """Scale by `scale`, crop a size x size window, optionally mirror, pad to the square canvas.

    `unit_offset` in [0, 1)^2 places the crop window within the scaled image when it is larger
    than the canvas (0 = top / left).
    """
    image = example["image"]
    h, w = image.shape[:2]
    nh, nw = max(int(round(h * scale)), 1), max(int(round(w * scale)), 1)
    fy, fx = nh / h, nw / w  # exact per-axis factors after rounding the scaled size
    oy = min(int(unit_offset[0] * (max(nh - size, 0) + 1)), max(nh - size, 0))
    ox = min(int(unit_offset[1] * (max(nw - size, 0) + 1)), max(nw - size, 0))
    ch, cw = min(nh - oy, size), min(nw - ox, size)

    # The crop window in source coordinates; resizing only it equals resize-then-crop.
    box = (ox / fx, oy / fy, min((ox + cw) / fx, w), min((oy + ch) / fy, h))
    content = np.asarray(Image.fromarray(image).resize((cw, ch), Image.BILINEAR, box=box))
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:ch, :cw] = content[:, ::-1] if flip else content

    out = {k: v for k, v in example.items() if k not in ("image", "boxes", "labels", "masks")}
    out["image"] = canvas
    if "masks" in example:
        masks = _resize_masks(example["masks"], (fy, fx), (oy, ox), (ch, cw), size)
        if flip:
            masks[:, :ch, :cw] = masks[:, :ch, cw - 1 :: -1]
        boxes = _tight_boxes(masks)
    else:
        pix = example["boxes"].astype(np.float64) * np.array([h, w, h, w])
        pix = pix * np.array([fy, fx, fy, fx]) - np.array([oy, ox, oy, ox])
        pix = np.clip(pix, 0.0, np.array([ch, cw, ch, cw], np.float64))
        if flip:
            pix = np.stack([pix[:, 0], cw - pix[:, 3], pix[:, 2], cw - pix[:, 1]], axis=1)
        boxes = pix.astype(np.float32).reshape(-1, 4)
        masks = None
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_box_size) & (
        (boxes[:, 3] - boxes[:, 1]) >= min_box_size
    )
    keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # never keep empty boxes
    out["boxes"] = boxes[keep] / np.float32(size)
    out["labels"] = example["labels"][keep]
    if masks is not None:
        out["masks"] = masks[keep]
    out["image_info"] = np.array([h, w, scale, 0.0], np.float32)
    out["valid_size"] = np.array([ch, cw], np.int32)
    return out


def large_scale_jitter(
    example: Mapping[str, Any],
    rng: np.random.Generator,
    *,
    output_size: int,
    scale_range: Sequence[float] = (0.1, 2.0),
    flip: bool = True,
    min_box_size: float = 1.0,
) -> dict[str, Any]:
    """Large-scale jitter (ViTDet / Copy-Paste): random scale, random crop, pad, random flip.

    The image is resized so its long side is `output_size * s`, s ~ U(scale_range); a random
    output_size x output_size window is cropped where the result is larger; the content is
    mirrored left-right with probability 1/2 when `flip`; the canvas is padded with zeros at the
    bottom / right. Boxes and masks follow the image (see the module docstring for the output
    format, box recomputation from masks and the `min_box_size` drop rule).

    Args:
      example: an example in the module's format (validated here; bad boxes are dropped).
      rng: the only source of randomness; four draws per call whatever the options.
      output_size: canvas side S in pixels.
      scale_range: (low, high) with 0 < low <= high.
      flip: allow the random horizontal flip.
      min_box_size: instances whose canvas box is thinner than this (pixels) are dropped.

    Returns:
      example with image uint8 [S, S, 3], boxes float32 [K, 4] normalised by S, labels int32 [K],
      masks bool [K, S, S] (if given), image_info float32 [4], valid_size int32 [2].
    """
    size = check_output_size(output_size)
    min_box_size = check_min_box_size(min_box_size)
    low, high = (float(v) for v in scale_range)
    if not (0.0 < low <= high and np.isfinite(high)):
        raise ValueError(
            f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}"
        )
    ex, _ = drop_invalid_boxes(validate_example(example))
    s = rng.uniform(low, high)
    unit_offset = rng.random(2)
    mirror = rng.random() < 0.5
    h, w = ex["image"].shape[:2]
    return _transform(
        ex,
        size=size,
        scale=size * s / max(h, w),
        unit_offset=(float(unit_offset[0]), float(unit_offset[1])),
        flip=bool(flip and mirror),
        min_box_size=min_box_size,
    )


def resize_and_pad(
    example: Mapping[str, Any], *, output_size: int, min_box_size: float = 1.0
) -> dict[str, Any]:
    """Evaluation transform: long side resized to output_size, zero padding at the bottom / right.

    Predictions in canvas pixels map back to the original image by dividing by
    `image_info[2]` (the scale). Same output format as `large_scale_jitter`.
    """
    size = check_output_size(output_size)
    min_box_size = check_min_box_size(min_box_size)
    ex, _ = drop_invalid_boxes(validate_example(example))
    h, w = ex["image"].shape[:2]
    return _transform(
        ex,
        size=size,
        scale=size / max(h, w),
        unit_offset=(0.0, 0.0),
        flip=False,
        min_box_size=min_box_size,
    )


def float_canvas(
    canvas: np.ndarray, valid_size: np.ndarray, pixels: Pixels = DEFAULT_PIXELS
) -> np.ndarray:
    """uint8 [S, S, 3] canvas -> float32 normalised as the backbone's `pixels` (default: in
    [-1, 1]), exactly 0 on padding (ViTDet pads with 0)."""
    image = pixels.normalise(canvas)
    image[int(valid_size[0]) :] = 0.0
    image[:, int(valid_size[1]) :] = 0.0
    return image
