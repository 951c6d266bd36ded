"""Image-text pretraining input: random-access sources, deterministic per-step batches, prefetch.

The batch of global step `s` is a pure function of (seed, s): example positions
`[s * B, (s + 1) * B)` of an endless stream that visits the dataset in a fresh permutation each
epoch. Each host takes its contiguous slice of those positions. Resuming therefore only needs the
step number, and any host count sees the same global batch.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
from PIL import Image

from rovit_jax.data.stream import EpochShuffledStream, load_with_substitutes

if TYPE_CHECKING:
    from rovit_jax.data.tokenizer import Tokenizer

T = TypeVar("T")

# Refuse images that would decode to more pixels than this (decompression bombs).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


class ImageTextSource(Protocol):
    """Random-access image-text pairs: `source[i] -> {"image": encoded bytes, "caption": str}`."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class CorruptImageError(ValueError):
    """An example's image bytes could not be decoded (or exceed the pixel budget)."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes encoded image bytes to uint8 `[H, W, 3]` RGB; raises CorruptImageError.

    The header is read first so an oversized image is refused before its pixels are allocated.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            if width * height > max_pixels:
                raise CorruptImageError(
                    f"image of {width}x{height} exceeds max_pixels={max_pixels}"
                )
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except CorruptImageError:
        raise
    except Exception as e:  # PIL raises many types for bad data; all mean "unusable example".
        raise CorruptImageError(f"undecodable image ({type(e).__name__}: {e})") from e


def _as_str(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8")
    if isinstance(x, np.ndarray):
        return _as_str(x.item())
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
        return {"image": ex[self._image_key], "caption": _as_str(ex[self._caption_key])}


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (antialiased) resize of uint8 `[H, W, 3]` to `[size, size, 3]`."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception-style crop: area fraction ~ U(scale), log-uniform aspect, then resize."""
    h, w = image.shape[:2]
    area = rng.uniform(*scale) * h * w
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    ch = int(round(min(h, np.sqrt(area / aspect))))
    cw = int(round(min(w, np.sqrt(area * aspect))))
    ch, cw = max(ch, 1), max(cw, 1)
    y0 = int(rng.integers(0, h - ch + 1))
    x0 = int(rng.integers(0, w - cw + 1))
    return resize_image(np.ascontiguousarray(image[y0 : y0 + ch, x0 : x0 + cw]), size)


def preprocess_image(
    image: np.ndarray,
    rng: np.random.Generator | None,
    *,
    size: int,
    crop_scale: Sequence[float] | None,
    flip: bool,
) -> np.ndarray:
    """uint8 `[H, W, 3]` -> float32 `[size, size, 3]` in [-1, 1]. Random ops only if rng given."""
    if rng is not None and crop_scale is not None:
        image = random_resized_crop(image, rng, size, scale=tuple(crop_scale))
    else:
        image = resize_image(image, size)
    if rng is not None and flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return image.astype(np.float32) / 127.5 - 1.0


def worker_pool(num_workers: int) -> ThreadPoolExecutor | None:
    """Threads that decode and augment a batch's examples (PIL releases the GIL), or None."""
    if int(num_workers) != num_workers or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    return ThreadPoolExecutor(int(num_workers)) if num_workers > 1 else None


def map_in_order(pool: ThreadPoolExecutor | None, fn: Callable[[Any], T], items) -> list[T]:
    """[fn(x) for x in items], on the pool when there is one; results keep the input order, so
    batches do not depend on the number of workers."""
    if pool is None:
        return [fn(x) for x in items]
    return list(pool.map(fn, items))


class PretrainBatches:
    """Deterministic per-step training batches for this host.

    `batch(step)` returns `{"image": f32 [b, S, S, 3], "text": i32 [b, L]}` where b is this host's
    share of `global_batch`. An example whose image cannot be decoded is replaced by a
    deterministic substitute and counted in `skipped` (replaced stream positions), so one bad file
    never stops training. `num_workers` threads decode a batch in parallel; the batch is the same
    for any number of workers.
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
    ):
        self.stream = EpochShuffledStream(
            len(source),
            global_batch=global_batch,
            seed=seed,
            process_index=process_index,
            process_count=process_count,
        )
        self.pool = worker_pool(num_workers)
        self.source, self.tokenizer = source, tokenizer
        self.global_batch, self.image_size, self.seed = global_batch, image_size, seed
        self.crop_scale, self.flip = crop_scale, flip
        self.max_pixels, self.max_substitutes = max_pixels, max_substitutes
        self.skipped = 0
        self.index_at, self.positions = self.stream.index_at, self.stream.positions

    def _example(self, position: int) -> tuple[np.ndarray, str, bool]:
        """(image [S, S, 3], caption, whether a substitute was used) of a stream position."""
        epoch, index = self.index_at(position)

        def load(idx: int) -> tuple[np.ndarray, str]:
            ex = self.source[idx]
            return decode_image(ex["image"], max_pixels=self.max_pixels), ex["caption"]

        idx, (image, caption), substituted = load_with_substitutes(
            index,
            len(self.source),
            load,
            errors=(CorruptImageError,),
            max_substitutes=self.max_substitutes,
            what="image",
        )
        rng = np.random.default_rng([self.seed, epoch, idx, 1])
        image = preprocess_image(
            image, rng, size=self.image_size, crop_scale=self.crop_scale, flip=self.flip
        )
        return image, caption, substituted

    def batch(self, step: int) -> dict[str, np.ndarray]:
        examples = map_in_order(self.pool, self._example, self.stream.host_positions(step))
        images, captions, substituted = zip(*examples)
        self.skipped += sum(substituted)  # One count per replaced stream position.
        return {"image": np.stack(images), "text": self.tokenizer.encode(list(captions))}


def prefetch(
    make_batch: Callable[[int], Any], start_step: int, end_step: int, *, depth: int = 2
) -> Iterator[tuple[int, Any]]:
    """Yields `(step, make_batch(step))` for steps in [start, end), produced on a background thread.

    Host-side decoding then overlaps the device step. Exceptions from the producer are re-raised.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for step in range(start_step, end_step):
                if stop.is_set():
                    return
                q.put((step, make_batch(step)))
        except BaseException as e:  # pylint: disable=broad-except
            q.put(e)
            return
        q.put(None)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # Unblock a producer waiting on a full queue.
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def eval_batches(
    source: ImageTextSource,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[dict[str, np.ndarray]]:
    """Ordered, unaugmented batches over the whole source, padded to full batches with a mask.

    Every host yields the same number of batches (big_vision-style padding), holding its
    `batch_size // process_count` slice of each global batch; `mask` is 0 on padding and on
    undecodable images, `index` is the dataset index (-1 on padding).
    """
    n = len(source)
    local = batch_size // process_count
    num_batches = -(-n // batch_size)
    blank = np.zeros((image_size, image_size, 3), np.float32)
    for b in range(num_batches):
        images, captions, mask, index = [], [], [], []
        for i in range(
            b * batch_size + process_index * local, b * batch_size + (process_index + 1) * local
        ):
            ok = i < n
            image, caption = blank, ""
            if ok:
                ex = source[i]
                caption = ex["caption"]
                try:
                    image = preprocess_image(
                        decode_image(ex["image"], max_pixels=max_pixels),
                        None,
                        size=image_size,
                        crop_scale=None,
                        flip=False,
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
