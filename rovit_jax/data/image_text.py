"""Image-text pretraining input: random-access sources, deterministic per-step batches, prefetch.

The batch of global step `s` is a pure function of (seed, s): example positions
`[s * B, (s + 1) * B)` of an endless stream that visits the dataset in a fresh permutation each
epoch. Each host takes its contiguous slice of those positions. Resuming therefore only needs the
step number, and any host count sees the same global batch.

What happens to hostile input (training, `PretrainBatches`). An unusable example is skipped: its
stream position gets a deterministic substitute (`stream.load_with_substitutes`) and is counted
once in `skipped` and in `skipped_by_reason[reason]`, the reason of the ORIGINAL example's first
problem (the caption is checked before the image is decoded):

  reason              skipped when
  ------------------  -----------------------------------------------------------------------
  missing_caption     the example has no "caption" (or it is None)
  empty_caption       the caption is empty or whitespace only
  non_utf8_caption    the caption is bytes that are not valid UTF-8 (or text holding lone
                      surrogates): skipped, not repaired — a mis-encoded caption is not a
                      trustworthy target. (The web-shard reader repairs such bytes with U+FFFD
                      itself and counts them in its `undecodable_captions`; the batcher then
                      sees valid text.)
  invalid_caption     the caption is neither text nor bytes
  undecodable_image   the image bytes cannot be decoded (random bytes, truncated JPEG / PNG, a
                      missing image, ...)
  unreadable_file     reading the image failed with an OSError (wrapped by the reader)
  image_too_large     the header claims more than `max_pixels` pixels (decompression bombs are
                      refused from the header, before any pixel is allocated)
  zero_size_image     the header claims a zero width or height (PNG, BMP and JPEG headers are
                      read even when PIL refuses to open them)
  image_too_small     a side is shorter than `MIN_IMAGE_SIDE` (2) pixels, e.g. a 1x1 image

A run of `max_substitutes + 1` consecutive unusable examples raises RuntimeError (the dataset
is broken, not one file). Errors other than `CorruptImageError` / `InvalidCaptionError` (a
reader bug, a missing dataset) are not caught: they stop the run with their own message.
`counts()` gives the tallies as flat `{"skipped/<reason>": n}` for logging.

Evaluation (`eval_batches`) never substitutes: an unusable image sets `mask` to 0 for its row,
and a caption that is not clean text is tokenized as best it can be (bytes decoded with U+FFFD
replacement, a missing caption as "") so the pairing of captions and images is kept.
"""

from __future__ import annotations

import io
import logging
import struct
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from PIL import Image

from rovit_jax.data.pixels import DEFAULT_PIXELS, Pixels
from rovit_jax.data.stream import (
    StreamBatches,
    UnusableExampleError,
    error_reason,
    eval_host_indices,
    load_with_substitutes,
)

if TYPE_CHECKING:
    from rovit_jax.data.tokenizer import Tokenizer

T = TypeVar("T")

# Refuse images that would decode to more pixels than this (decompression bombs).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# Refuse images with a side shorter than this: a 1-pixel side has no structure to crop or resize.
MIN_IMAGE_SIDE = 2

# Reasons an image is refused (decode_image), shared with the detection input.
IMAGE_SKIP_REASONS = (
    "undecodable_image",
    "unreadable_file",
    "image_too_large",
    "zero_size_image",
    "image_too_small",
)
CAPTION_SKIP_REASONS = ("missing_caption", "empty_caption", "non_utf8_caption", "invalid_caption")
# Keys of PretrainBatches.skipped_by_reason (see the module docstring).
PRETRAIN_SKIP_REASONS = CAPTION_SKIP_REASONS + IMAGE_SKIP_REASONS


class ImageTextSource(Protocol):
    """Random-access image-text pairs: `source[i] -> {"image": encoded bytes, "caption": str}`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class CorruptImageError(UnusableExampleError):
    """An example's image cannot be used (undecodable, too large or too small); see `reason`."""

    default_reason = "undecodable_image"


class InvalidCaptionError(UnusableExampleError):
    """An example's caption is missing, empty or not clean text; see `reason`."""

    default_reason = "invalid_caption"


def check_image_size(
    height: int, width: int, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_IMAGE_SIDE
) -> None:
    """Raises CorruptImageError (zero_size_image / image_too_small / image_too_large)."""
    if height <= 0 or width <= 0:
        raise CorruptImageError(
            f"image of {width}x{height} (WxH) has no pixels", reason="zero_size_image"
        )
    if min(height, width) < min_side:
        raise CorruptImageError(
            f"image of {width}x{height} (WxH) has a side shorter than {min_side} pixels",
            reason="image_too_small",
        )
    if height * width > max_pixels:
        raise CorruptImageError(
            f"image of {width}x{height} exceeds max_pixels={max_pixels}", reason="image_too_large"
        )


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) a PNG, BMP or JPEG header declares, read without decoding; else None.

    PIL refuses to open some headers (e.g. a PNG of width 0) without saying why; this lets
    `decode_image` still name the reason.
    """
    data = bytes(data[:65536])
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return height, width
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return abs(height), abs(width)  # negative height: rows stored top-down
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 9 <= len(data) and data[pos] == 0xFF:
            marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
                height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
                return height, width
            pos += 2 + length
    return None


def decode_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_IMAGE_SIDE
) -> np.ndarray:
    """Decodes encoded image bytes to uint8 `[H, W, 3]` RGB; raises CorruptImageError only.

    The header is read first so an oversized (or empty, or too small) image is refused before
    its pixels are allocated; the error's `reason` says which rule refused it (see the module
    docstring).
    """
    if isinstance(data, np.ndarray) and data.dtype.kind in "SO" and data.size == 1:
        data = data.item()  # a bytes scalar held in an array (tfds records)
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptImageError(
            f"undecodable image: expected encoded bytes, got {type(data).__name__}",
            reason="undecodable_image",
        )
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            check_image_size(height, width, max_pixels=max_pixels, min_side=min_side)
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except CorruptImageError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, when above max_pixels
        raise CorruptImageError(
            f"image exceeds PIL's decompression-bomb limit (max_pixels={max_pixels}): {e}",
            reason="image_too_large",
        ) from e
    except Exception as e:  # PIL raises many types for bad data; all mean "unusable example".
        size = declared_size(data)
        if size is not None and 0 in size:
            raise CorruptImageError(
                f"image of {size[1]}x{size[0]} (WxH) has no pixels", reason="zero_size_image"
            ) from e
        raise CorruptImageError(
            f"undecodable image ({type(e).__name__}: {e})", reason="undecodable_image"
        ) from e
    if image.shape != (height, width, 3):
        raise CorruptImageError(
            f"undecodable image: header says {width}x{height}, decoded {image.shape}",
            reason="undecodable_image",
        )
    return image


def caption_text(value: Any) -> str:
    """A training caption as clean text; raises InvalidCaptionError naming the reason.

    Accepts str, UTF-8 bytes, or a one-element array of either. Empty / whitespace-only text,
    bytes that are not UTF-8 and text with lone surrogates are refused (see the module
    docstring); the text is otherwise returned unchanged.
    """
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if value is None:
        raise InvalidCaptionError("the example has no caption", reason="missing_caption")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidCaptionError(
                f"caption is not valid UTF-8 ({e})", reason="non_utf8_caption"
            ) from e
    if not isinstance(value, str):
        raise InvalidCaptionError(
            f"caption must be text, got {type(value).__name__}", reason="invalid_caption"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates, e.g. from errors="surrogateescape"
        raise InvalidCaptionError(
            f"caption is not valid Unicode ({e})", reason="non_utf8_caption"
        ) from e
    if not value.strip():
        raise InvalidCaptionError(f"empty caption {value!r}", reason="empty_caption")
    return value


def _eval_caption(value: Any) -> str:
    """Best-effort text of an evaluation caption (never raises: pairs must stay aligned)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value.encode("utf-8", errors="replace").decode("utf-8")
    return "" if value is None else str(value)


def _as_text(x: Any) -> str | bytes:
    """A tfds text feature as str; bytes that are not UTF-8 are returned as they are, so the
    batcher can skip and count them (`caption_text`)."""
    if isinstance(x, np.ndarray):
        return _as_text(x.item())
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            return x
    return str(x)


class TfdsImageTextSource:
    """Wraps a tfds dataset stored as array_record for random access, images left encoded."""

    def __init__(
        self, builder, split: str, *, image_key: str = "image", caption_key: str = "caption"
    ):
        import tensorflow_datasets as tfds  # Heavy import kept local.

        if split not in builder.info.splits:
            raise ValueError(
                f"split {split!r} not in dataset {builder.info.full_name} "
                f"(has {list(builder.info.splits)})"
            )
        self._source = builder.as_data_source(
            split, decoders={image_key: tfds.decode.SkipDecoding()}
        )
        self._image_key, self._caption_key = image_key, caption_key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        ex = self._source[int(index)]
        return {"image": ex[self._image_key], "caption": _as_text(ex[self._caption_key])}


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of uint8 `[H, W, 3]` to `[size, size, 3]`."""
    return DEFAULT_PIXELS.resize(image, size)


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    pixels: Pixels = DEFAULT_PIXELS,
) -> np.ndarray:
    """Inception-style crop: area fraction ~ U(scale), log-uniform aspect, then resize (with
    `pixels.interpolation`)."""
    h, w = image.shape[:2]
    area = rng.uniform(*scale) * h * w
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    ch = int(round(min(h, np.sqrt(area / aspect))))
    cw = int(round(min(w, np.sqrt(area * aspect))))
    ch, cw = max(ch, 1), max(cw, 1)
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    return pixels.resize(np.ascontiguousarray(image[y0 : y0 + ch, x0 : x0 + cw]), size)


def preprocess_image(
    image: np.ndarray,
    rng: np.random.Generator | None,
    *,
    size: int,
    crop_scale: Sequence[float] | None,
    flip: bool,
    pixels: Pixels = DEFAULT_PIXELS,
) -> np.ndarray:
    """uint8 `[H, W, 3]` -> float32 `[size, size, 3]`, normalised as `pixels` says (default: in
    [-1, 1]). Random ops only if rng is given; without it, the evaluation view of `pixels`."""
    if rng is None:
        image = pixels.eval_view(image, size)
    elif crop_scale is not None:
        image = random_resized_crop(image, rng, size, scale=tuple(crop_scale), pixels=pixels)
    else:
        image = pixels.resize(image, size)
    if rng is not None and flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return pixels.normalise(image)


class PretrainBatches(StreamBatches):
    """Deterministic per-step training batches for this host.

    `batch(step)` returns `{"image": f32 [b, S, S, 3], "text": i32 [b, L]}` where b is this host's
    share of `global_batch`. An unusable example (see the module docstring's table) is replaced
    by a deterministic substitute and counted once per replaced stream position, in `skipped`
    (the total, read by the training loop) and in `skipped_by_reason`; so one bad file never
    stops training. `num_workers` threads decode a batch in parallel; batches and counts are the
    same for any number of workers.
    """

    def __init__(
        self,
        source: ImageTextSource,
        tokenizer: Tokenizer,
        *,
        global_batch: int,
        image_size: int,
        seed: int,
        crop_scale: Sequence[float] | None = None,
        flip: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_substitutes: int = 64,
        num_workers: int = 1,
        worker_processes: int = 0,
        pixels: Pixels = DEFAULT_PIXELS,
    ):
        super().__init__(
            len(source),
            global_batch=global_batch,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
            num_workers=num_workers,
            worker_processes=worker_processes,
            tallies={"skipped": PRETRAIN_SKIP_REASONS},
        )
        self.source, self.tokenizer = source, tokenizer
        self.image_size = image_size
        self.crop_scale, self.flip = crop_scale, flip
        self.max_pixels, self.max_substitutes = max_pixels, max_substitutes
        self.pixels = pixels

    def _load(self, idx: int) -> tuple[np.ndarray, str]:
        """(decoded image uint8 [H, W, 3], caption) of dataset index `idx`, or raises."""
        ex = self.source[idx]
        caption = caption_text(ex.get("caption") if isinstance(ex, Mapping) else None)
        image = decode_image(
            ex.get("image") if isinstance(ex, Mapping) else None, max_pixels=self.max_pixels
        )
        return image, caption

    def _row(self, position: int) -> tuple[tuple[np.ndarray, np.ndarray], str | None, dict]:
        """((image [S, S, 3], caption ids [max_len]), skip reason or None, no other tallies).

        Captions are tokenized here, with the image, so that worker processes do it too.
        """
        epoch, index = self.index_at(position)
        failures: list[Exception] = []
        idx, (image, caption), substituted = load_with_substitutes(
            index,
            len(self.source),
            self._load,
            errors=(CorruptImageError, InvalidCaptionError),
            max_substitutes=self.max_substitutes,
            what="image-text example",
            failures=failures,
        )
        rng = np.random.default_rng([self.seed, epoch, idx, 1])
        image = preprocess_image(
            image,
            rng,
            size=self.image_size,
            crop_scale=self.crop_scale,
            flip=self.flip,
            pixels=self.pixels,
        )
        # Counted under the original example's problem, whatever its substitutes' were.
        reason = error_reason(failures[0]) if substituted else None
        return (image, self.tokenizer.encode([caption])[0]), reason, {}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        images, texts = zip(*self._rows(step))
        return {"image": self.stack(images), "text": np.stack(texts)}


def eval_batches(
    source: ImageTextSource,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    pixels: Pixels = DEFAULT_PIXELS,
) -> Iterator[dict[str, np.ndarray]]:
    """Ordered, unaugmented batches over the whole source, padded to full batches with a mask.

    Every host yields the same number of batches (big_vision-style padding), holding its
    `batch_size // process_count` slice of each global batch; `mask` is 0 on padding and on
    unusable images (CorruptImageError, any reason), `index` is the dataset index (-1 on
    padding). Captions are never refused here (see the module docstring).
    """
    n = len(source)
    blank = np.zeros((image_size, image_size, 3), np.float32)
    for indices in eval_host_indices(n, batch_size, process_index, process_count):
        images, captions, mask, index = [], [], [], []
        for i in indices:
            ok = i < n
            image, caption = blank, ""
            if ok:
                try:
                    ex = source[i]
                    caption = _eval_caption(ex.get("caption"))
                    image = preprocess_image(
                        decode_image(ex.get("image"), max_pixels=max_pixels),
                        None,
                        size=image_size,
                        crop_scale=None,
                        flip=False,
                        pixels=pixels,
                    )
                except CorruptImageError as e:
                    logging.warning("evaluation: skipping example %d: %s", i, e)
                    ok = False
            images.append(image)
            captions.append(caption)
            mask.append(ok)
            index.append(i if i < n else -1)
        yield {
            "image": np.stack(images),
            "text": tokenizer.encode(captions),
            "mask": np.asarray(mask, np.bool_),
            "index": np.asarray(index, np.int32),
        }
