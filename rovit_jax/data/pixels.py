"""How a tower wants its pixels: the one place images are resized for evaluation and normalised.

A pretraining run's `pp.*` section records it, so detection finetuning, the predictor and the
exports feed its towers what they were trained (or imported) with:

- normalisation: each channel becomes (x / 255 - mean) / std, computed as x / (255 std) -
  mean / std, so that this project's default (mean = std = 0.5) is exactly x / 127.5 - 1;
  OpenAI CLIP and open_clip use the ImageNet-like constants `CLIP_MEAN` / `CLIP_STD`, SigLIP
  0.5 / 0.5;
- resampling: bilinear (this project, big_vision) or bicubic (CLIP), always antialiased (PIL);
- evaluation view: "squash" (resize the whole image to S x S, this project and SigLIP) or
  "crop" (resize the shorter side to S, then take the centre S x S, as CLIP evaluates).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from PIL import Image

EVAL_RESIZES = ("squash", "crop")
INTERPOLATIONS = ("bilinear", "bicubic")
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP / open_clip
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclasses.dataclass(frozen=True)
class Pixels:
    """A tower's pixel convention (see the module docstring)."""

    mean: tuple[float, float, float] = DEFAULT_MEAN
    std: tuple[float, float, float] = DEFAULT_STD
    interpolation: str = "bilinear"
    eval_resize: str = "squash"

    def __post_init__(self):
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must be 3 values, std > 0; got {self.mean}, {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {INTERPOLATIONS}: {self.interpolation!r}"
            )
        if self.eval_resize not in EVAL_RESIZES:
            raise ValueError(f"eval_resize must be one of {EVAL_RESIZES}: {self.eval_resize!r}")

    @classmethod
    def from_settings(cls, pp: Any) -> Pixels:
        """From a pretraining config's typed `pp` section (`PreprocessSettings`)."""
        return cls(tuple(pp.mean), tuple(pp.std), pp.interpolation, pp.eval_resize)

    def normalise(self, image: np.ndarray) -> np.ndarray:
        """uint8 [..., 3] -> float32 [..., 3]."""
        scale = np.float32(255.0) * np.asarray(self.std, np.float32)
        shift = np.asarray(self.mean, np.float32) / np.asarray(self.std, np.float32)
        if len(set(self.mean)) == 1 and len(set(self.std)) == 1:
            # One constant for every channel: scalar arithmetic, about 2.5x faster than
            # broadcasting a [3] vector over the pixels (and the same values).
            return image.astype(np.float32) / scale[0] - shift[0]
        return image.astype(np.float32) / scale - shift

    def resize(self, image: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
        """uint8 [H, W, 3] -> uint8 [height, width (= height), 3], antialiased."""
        width = height if width is None else width
        if image.shape[:2] == (height, width):
            return image
        pil = Image.fromarray(image).resize((width, height), _PIL[self.interpolation])
        return np.asarray(pil)

    def eval_view(self, image: np.ndarray, size: int) -> np.ndarray:
        """The uint8 [size, size, 3] an evaluation feeds the tower (see `eval_resize`)."""
        if self.eval_resize == "squash":
            return self.resize(image, size)
        h, w = image.shape[:2]
        # The shorter side becomes `size`, the longer one int(size * long / short) (as
        # torchvision's Resize(size)), then the centre crop (torchvision's CenterCrop offsets).
        if h <= w:
            nh, nw = size, int(size * w / h)
        else:
            nh, nw = int(size * h / w), size
        resized = self.resize(image, nh, nw)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        return np.ascontiguousarray(resized[top : top + size, left : left + size])

    def describe(self) -> str:
        """In words, for export metadata."""
        view = (
            "resized to S x S"
            if self.eval_resize == "squash"
            else "shorter side resized to S, centre S x S crop"
        )
        return (
            f"{view} ({self.interpolation}, antialiased); (x / 255 - mean) / std with mean "
            f"{list(self.mean)}, std {list(self.std)}"
        )


DEFAULT_PIXELS = Pixels()
