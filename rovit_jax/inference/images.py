"""Images given to the predictor: arrays, PIL images or files, checked and decoded to uint8 RGB."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from rovit_jax import paths
from rovit_jax.data.image_text import (
    DEFAULT_MAX_PIXELS,
    MIN_IMAGE_SIDE,
    CorruptImageError,
    check_image_size,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageError",
    "ImageLike",
    "as_image_list",
    "list_images",
    "load_image",
]

# File name endings treated as images when a folder is listed.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

ImageLike = Union[np.ndarray, Image.Image, str, os.PathLike]


class ImageError(ValueError):
    """An image that cannot be used; the message names it (file path or kind) and why."""


def _check_size(height: int, width: int, what: str) -> None:
    try:
        check_image_size(height, width, max_pixels=DEFAULT_MAX_PIXELS, min_side=MIN_IMAGE_SIDE)
    except CorruptImageError as e:
        raise ImageError(f"{what}: {e}") from None


def _from_pil(im: Image.Image, what: str) -> np.ndarray:
    _check_size(im.height, im.width, what)
    # Phone photos store their rotation in EXIF; apply it so boxes match what viewers show.
    im = ImageOps.exif_transpose(im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(image: ImageLike) -> np.ndarray:
    """One image as uint8 [H, W, 3] RGB.

    Accepts a uint8 [H, W, 3] array (returned as is), a PIL image (any mode, converted to RGB)
    or the path of an image file, local or a bucket URL (EXIF orientation applied). The header
    is checked before the pixels are decoded, so decompression bombs are refused.

    Raises:
      FileNotFoundError: a path that does not exist (the message names it).
      IsADirectoryError: a path that is a folder.
      ImageError (a ValueError): an array of the wrong shape or dtype, an unreadable or undecodable file (the
        message names the file and why), or an image smaller than 2 pixels or larger than
        DEFAULT_MAX_PIXELS.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ImageError(
                f"an image array must be uint8 [H, W, 3] RGB, got {image.dtype} {image.shape}"
            )
        _check_size(image.shape[0], image.shape[1], "image array")
        return image
    if isinstance(image, Image.Image):
        return _from_pil(image, "PIL image")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not paths.exists(path):
            raise FileNotFoundError(f"image file not found: {path}")
        if paths.isdir(path):
            raise IsADirectoryError(f"{path} is a folder, not an image file")
        try:
            with paths.open_file(path, "rb") as f, Image.open(f) as im:
                what = f"image file {path}"
                _check_size(im.height, im.width, what)
                im.load()
                return _from_pil(im, what)
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files.
            raise ImageError(f"cannot read image file {path}: {type(e).__name__}: {e}") from None
    raise ImageError(
        "an image must be a uint8 [H, W, 3] numpy array, a PIL image or a file path, "
        f"got {type(image).__name__}"
    )


def as_image_list(images: Any) -> tuple[list[Any], bool]:
    """(list of images, whether a single image was given) for `predict`-style arguments."""
    single = isinstance(images, (np.ndarray, Image.Image, str, os.PathLike))
    if single:
        return [images], True
    if not isinstance(images, Sequence) or isinstance(images, bytes):
        raise ValueError(
            "images must be one image (array, PIL image or path) or a list of them, "
            f"got {type(images).__name__}"
        )
    if not images:
        raise ValueError("the list of images is empty")
    return list(images), False


def list_images(folder: str) -> list[str]:
    """Image files directly in `folder` (local or a bucket URL; by extension, case-insensitive),
    sorted by name."""
    if not paths.isdir(folder):
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = [
        os.path.join(folder, name)
        for name in paths.listdir(folder)
        if name.lower().endswith(IMAGE_EXTENSIONS) and paths.isfile(os.path.join(folder, name))
    ]
    if not files:
        raise ValueError(f"folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files
