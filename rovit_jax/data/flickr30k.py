"""Karpathy-split caption datasets (Flickr30k, COCO, Flickr8k) for zero-shot retrieval.

The Karpathy split JSON (dataset_flickr30k.json, dataset_coco.json) holds
  {"dataset": "flickr30k", "images": [{"filename", "imgid", "split": "train" | "val" | "test" |
   "restval", "sentences": [{"raw", "tokens", ...}, ...], "filepath"?}, ...]}
("filepath", e.g. "val2014", exists for COCO only). Images are found at
image_dir/filepath/filename, or image_dir/filename.

Retrieval (recall@K with several captions per image): embed the images of
`KarpathyCaptionsSource(..., grouped=True)` (one example per image) and the texts of
`captions()`, then

  recall_at_k(image_emb @ text_emb.T, source.retrieval_groups())

(`rovit_jax.evaluation.retrieval.recall_at_k`: similarity [num_images, num_captions],
text_to_image [num_captions]).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from rovit_jax import paths
from rovit_jax.data.coco import check_dir, load_json, read_image_bytes, require_keys
from rovit_jax.data.image_text import CorruptImageError


class KarpathyCaptionsSource:
    """ImageTextSource over one or more splits of a Karpathy split JSON.

    Images are ordered by "imgid"; each image's sentences keep their JSON order ("raw" text,
    stripped). With `grouped=False` (default) there is one example per (image, sentence) pair,
    image-major: `source[i] -> {"image": bytes, "caption": str}`. With `grouped=True` there is one
    example per image: `{"image", "caption": first sentence, "captions": all sentences}`.
    A missing image file raises CorruptImageError naming it.
    """

    def __init__(
        self,
        karpathy_json: str | os.PathLike,
        image_dir: str | os.PathLike,
        split: str | Sequence[str] = "test",
        *,
        grouped: bool = False,
    ):
        """Reads the JSON.

        Args:
          karpathy_json: path of the Karpathy split JSON.
          image_dir: folder of the images (with the "filepath" subfolders for COCO).
          split: a split name or several (e.g. ("train", "restval") for COCO training).
          grouped: one example per image instead of one per sentence.

        Raises:
          FileNotFoundError: the JSON or the image folder does not exist.
          ValueError: a required key is missing, or no image is in the requested split(s).
        """
        path = os.fspath(karpathy_json)
        data = load_json(path, "Karpathy split JSON")
        self.image_dir = check_dir(image_dir)
        where = f"Karpathy split JSON {path}"
        require_keys(data, ("images",), where)
        splits = (split,) if isinstance(split, str) else tuple(split)
        self.dataset = str(data.get("dataset", ""))
        chosen = []
        available = set()
        for i, im in enumerate(data["images"]):
            require_keys(im, ("filename", "split", "sentences"), f"{where}: images[{i}]")
            available.add(im["split"])
            if im["split"] in splits:
                chosen.append((int(im.get("imgid", i)), i, im))
        if not chosen:
            raise ValueError(
                f"{where} has no image in split {split!r} (splits: {sorted(available)})"
            )
        chosen.sort(key=lambda t: (t[0], t[1]))
        self.image_ids = [imgid for imgid, _, _ in chosen]
        self._paths: list[list[str]] = []
        self._sentences: list[list[str]] = []
        for imgid, _, im in chosen:
            sentences = []
            for k, s in enumerate(im["sentences"]):
                require_keys(s, ("raw",), f"{where}: image {imgid} sentences[{k}]")
                sentences.append(str(s["raw"]).strip())
            if not sentences:
                raise ValueError(f"{where}: image {imgid} ({im['filename']}) has no sentences")
            candidates = [os.path.join(self.image_dir, str(im["filename"]))]
            if im.get("filepath"):
                candidates.insert(
                    0, os.path.join(self.image_dir, str(im["filepath"]), str(im["filename"]))
                )
            self._paths.append(candidates)
            self._sentences.append(sentences)
        self.grouped = grouped
        self._pairs = [(k, j) for k, sents in enumerate(self._sentences) for j in range(len(sents))]

    @property
    def num_images(self) -> int:
        return len(self._sentences)

    def __len__(self) -> int:
        return self.num_images if self.grouped else len(self._pairs)

    def image_bytes(self, image_index: int) -> bytes:
        """Encoded bytes of image `image_index` (imgid order); CorruptImageError if missing."""
        candidates = self._paths[image_index]
        for path in candidates:
            if paths.isfile(path):
                return read_image_bytes(path)
        raise CorruptImageError(f"image file not found: {' or '.join(candidates)}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if self.grouped:
            sentences = self._sentences[index]
            return {
                "image": self.image_bytes(index),
                "caption": sentences[0],
                "captions": list(sentences),
            }
        k, j = self._pairs[index]
        return {"image": self.image_bytes(k), "caption": self._sentences[k][j]}

    def captions(self) -> list[str]:
        """Every sentence of the split(s), image-major (the ungrouped example order)."""
        return [s for sents in self._sentences for s in sents]

    def retrieval_groups(self) -> np.ndarray:
        """int32 [num_captions]: for each caption of `captions()`, the index of its image.

        Image indices count images in imgid order, i.e. the examples of `grouped=True`.
        """
        return np.asarray([k for k, _ in self._pairs], np.int32)
