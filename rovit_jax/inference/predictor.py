"""Predictor: images + free-text queries in, boxes, masks and scores out (and two-tower retrieval).

    from rovit_jax.inference import Predictor

    predictor = Predictor.from_checkpoint("runs/shapes_detect")
    dets = predictor.predict("scene.png", ["striped red", "dotted blue"], score_threshold=0.3)
    dets.boxes, dets.scores, dets.names, dets.masks  # original pixels (y0, x0, y1, x1), [N, H, W]

Inference follows the evaluation path: images are resized and padded like
`detection_input.eval_detection_batches`, queries become a text classifier through the run's
prompt ensemble (`text.templates`), `rcnn.detect` runs the detector (with VLM score fusion by
default), and boxes and masks go back to original pixels with `to_original_coordinates` and
`paste_masks`. Each jitted function compiles once per (batch bucket, query bucket): batches are
padded to a power of two (up to `max_batch`, larger inputs run in chunks) and vocabularies to
`text_classifier.BUCKETS`, texts are embedded in fixed chunks of `TEXT_CHUNK`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rovit_jax import paths
from rovit_jax.data.detection_input import eval_detection_batches
from rovit_jax.data.image_text import DEFAULT_MAX_PIXELS, preprocess_image
from rovit_jax.data.pixels import Pixels
from rovit_jax.detection import rcnn
from rovit_jax.detection.postprocess import paste_masks, to_original_coordinates
from rovit_jax.detection.text_classifier import PROMPT_ENSEMBLES, build_text_classifier, clean_name
from rovit_jax.inference.images import ImageLike, as_image_list, list_images, load_image
from rovit_jax.runs import (
    CheckpointKindError,
    LoadedRun,
    load_run,
    training_names,
    vlm_tower_params,
)

__all__ = ["Detections", "Predictor", "TEXT_CHUNK"]

# Texts are embedded in chunks of this many (padded), so any number of queries reuses one shape.
TEXT_CHUNK = 64


@dataclasses.dataclass
class Detections:
    """Detections of one image, by decreasing score.

    Attributes:
      boxes: float32 [N, 4] (y0, x0, y1, x1) in pixels of the original image.
      scores: float32 [N].
      labels: int32 [N], index of the query each detection answers.
      names: the N query strings (`queries[labels[i]]`).
      masks: bool [N, H, W] instance masks at the original size, or None when the detector was
        trained without masks.
      image_size: (H, W) of the original image.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list[str]
    masks: np.ndarray | None
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)


def _bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n, at most `cap`."""
    return min(1 << max(n - 1, 0).bit_length(), cap)


def _chunks(items: list[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Predictor:
    """Open-vocabulary detection and two-tower embeddings from a training run.

    Build with `Predictor.from_checkpoint(workdir)`. A detection run gives every method; a
    pretraining run gives `embed_images`, `embed_texts` and `retrieve` only.

    Attributes:
      kind: "detect" or "pretrain".
      run: the loaded run (configs, parameters, tokenizer).
      fusion: whether `predict` fuses detector and VLM scores (the paper's inference).
      image_size: S, the square canvas (detector) or the tower's input size (pretraining run).
      base_names: cleaned names of the detector's training categories; a query among them is
        weighted as a base category in score fusion (`infer.w_base`), any other as novel
        (`infer.w_novel`). May be replaced.
      num_compiles: how many times a jitted function was traced (each trace is one compile).
      images_embedded: how many images the image tower has embedded (`retrieve` caches per
        file, so asking again for an unchanged folder adds none).
    """

    def __init__(
        self,
        run: LoadedRun,
        *,
        fusion: bool = True,
        image_size: int | None = None,
        max_batch: int = 8,
        attention: str | None = None,
    ):
        from rovit_jax.models.attention import ATTENTION_IMPLS
        from rovit_jax.pretrain_settings import pretrain_settings
        from rovit_jax.tasks.pretrain import build_model

        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")
        if image_size is not None and (
            isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
        ):
            raise ValueError(f"image_size must be a positive integer or None, got {image_size!r}")
        if attention is not None and attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.run = run
        self.kind = run.kind
        self.fusion = bool(fusion)
        self.max_batch = 1 << (max_batch.bit_length() - 1)  # a power of two <= max_batch
        self.tokenizer = run.tokenizer
        pretrained = pretrain_settings(run.pretrain_config)
        self.two_tower = build_model(run.pretrain_config, pretrained, attention=attention)
        self.embed_dim = pretrained["model"].embed_dim
        self.text_len = int(self.tokenizer.max_len)
        self.num_compiles = 0
        self.images_embedded = 0
        self._tower_image_size = pretrained["pp"].image_size  # whole-image embeddings
        self.pixels = Pixels.from_settings(pretrained["pp"])  # the towers' pixel convention
        self._tower_params = jax.device_put(run.pretrain_params)
        self._text_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._image_cache: dict[tuple[str, int, str], np.ndarray] = {}
        self.task = None
        self.has_masks = False
        self.base_names: frozenset[str] = frozenset()
        self.templates: tuple[str, ...] = ("{}",)
        if run.kind == "detect":
            self._init_detector(image_size, attention)
        else:
            self.image_size = int(image_size or pretrained["pp"].image_size)
            patch = self.two_tower.image["patch_size"]
            if self.image_size % patch:
                raise ValueError(
                    f"image_size={self.image_size} must be divisible by the image tower's patch "
                    f"size {patch}"
                )
        self._embed_tokens = jax.jit(self._counted(self._embed_tokens_impl))
        self._embed_pixels = jax.jit(self._counted(self._embed_pixels_impl))

    @classmethod
    def from_checkpoint(
        cls,
        workdir: str,
        *,
        step: int | None = None,
        fusion: bool = True,
        image_size: int | None = None,
        max_batch: int = 8,
        attention: str | None = None,
    ) -> Predictor:
        """Loads a detection run (or a pretraining run, for embeddings and retrieval only).

        Args:
          workdir: the run's directory (config.json, checkpoints/<step>/); a detection run's
            pretraining run is found at `init.pretrain_workdir` or `<workdir>/pretrain`.
          step: checkpoint step of the run; None = the latest complete one.
          fusion: VLM score fusion in `predict` (the paper's inference); False = detector only.
          image_size: detector canvas S (default `det.image_size` of the run); for a pretraining
            run, the image tower's input size (default `pp.image_size`).
          max_batch: largest batch run at once (a power of two; more images run in chunks).
          attention: the attention kernel (rovit_jax.models.attention); None = the run's.

        Raises:
          FileNotFoundError: the directory, its checkpoint or its pretraining run is missing.
          CheckpointKindError (a ValueError): the directory is not a training run.
        """
        return cls(
            load_run(workdir, step=step),
            fusion=fusion,
            image_size=image_size,
            max_batch=max_batch,
            attention=attention,
        )

    # ---- set-up --------------------------------------------------------------------------------
    def _init_detector(self, image_size: int | None, attention: str | None) -> None:
        from rovit_jax.tasks.detect import DetectTask

        run = self.run
        config = ml_collections.ConfigDict(run.config.to_dict())
        # Inference only: never (re)train the pretraining run; read it where it was found.
        config.init.run_pretraining = False
        config.init.pretrain_workdir = run.pretrain_workdir
        config.init.detector_workdir = ""
        if image_size is not None:
            config.det.image_size = int(image_size)
        if attention is not None:
            config.attention = attention
        try:
            # The pretraining run is already loaded; DetectTask would read it again.
            task = DetectTask(
                config,
                run.workdir,
                check_files=False,
                pretrained=run.towers,
            )
            _ = task.model  # checks the canvas against the backbone's patch size
        except ValueError as e:
            if image_size is None:
                raise
            raise ValueError(f"image_size={image_size} does not suit this detector: {e}") from e
        self.task = task
        self.image_size = task.rcnn.image_size
        self.has_masks = task.settings["data"].has_masks
        self.templates = tuple(PROMPT_ENSEMBLES[task.settings["text"].templates])
        self.base_names = training_names(config)
        self._params = jax.device_put(run.params)
        self._vlm_params = vlm_tower_params(self._tower_params)
        self._detect = jax.jit(self._counted(self.detection_function()))

    def _counted(self, fn):
        def traced(*args):
            self.num_compiles += 1  # runs only while jax traces, i.e. once per compile
            return fn(*args)

        return traced

    def detection_function(self):
        """The pure detector, `(params, vlm_params, images, text_emb, text_valid, is_novel)`.

        images [B, S, S, 3] float32 (resized and padded, in [-1, 1], 0 on padding);
        text_emb [K, E] unit-norm; text_valid, is_novel [K] bool. Returns `rcnn.detect`'s dict:
        boxes [B, D, 4] canvas pixels, scores [B, D], classes [B, D], valid [B, D],
        masks [B, D, 28, 28] probabilities. Parameters: `detector_params`, `vlm_params`.
        """
        self.require_detector("detection_function")
        task, fusion = self.task, self.fusion

        def detect(params, vlm_params, images, text_emb, text_valid, is_novel):
            vlm = None
            if fusion:
                vlm = lambda im, bx: task.frozen_vlm.region_embeddings(vlm_params, im, bx)  # noqa: E731
            return rcnn.detect(
                task.model,
                params,
                images,
                text_emb,
                text_valid,
                is_novel,
                task.rcnn,
                vlm_region_embeddings_fn=vlm,
                vlm_logit_scale=jnp.exp(vlm_params["t"]) if fusion else None,
            )

        return detect

    @property
    def detector_params(self) -> Any:
        self.require_detector("detector_params")
        return self._params

    @property
    def vlm_params(self) -> Any:
        """The pretrained towers without the text tower (what score fusion reads)."""
        self.require_detector("vlm_params")
        return self._vlm_params

    @property
    def tower_params(self) -> Any:
        """The pretrained two towers' parameters."""
        return self._tower_params

    def require_detector(self, what: str = "detection") -> None:
        """Raises CheckpointKindError unless this predictor holds a detector run."""
        if self.kind != "detect":
            raise CheckpointKindError(
                f"{self.run.workdir} is a pretraining checkpoint (task 'pretrain'): it can embed "
                f"images and texts and retrieve, but {what} needs a detector run (a workdir "
                "trained with a detection config, e.g. configs/shapes_detect.py)"
            )

    # ---- texts ---------------------------------------------------------------------------------
    def _token_counts(self, texts: list[str]) -> np.ndarray:
        """Untruncated token counts (special ids included) of `texts`."""
        return self.tokenizer.lengths(texts)

    def _check_texts(self, texts: Any, what: str) -> list[str]:
        if isinstance(texts, (str, bytes)):
            raise ValueError(
                f"{what}s must be a list of strings, not one string; wrap it: [{texts!r}]"
            )
        if not isinstance(texts, Sequence) or not texts:
            raise ValueError(f"give at least one {what} (a non-empty list of strings)")
        for t in texts:
            if not isinstance(t, str) or not clean_name(t):
                raise ValueError(f"every {what} must be a non-empty string, got {t!r}")
        return list(texts)

    def _check_lengths(self, pairs: list[tuple[str, str, str]], what: str) -> None:
        """Raises for texts the text tower would truncate. pairs: (original, template, text)."""
        counts = self._token_counts([text for _, _, text in pairs])
        for (original, template, text), n in zip(pairs, counts):
            if n > self.text_len:
                how = f" as {text!r} (prompt template {template!r})" if template != "{}" else ""
                raise ValueError(
                    f"{what} {original!r} is {int(n)} tokens long{how}, special ids included, but the "
                    f"text tower reads at most {self.text_len} tokens (tokenizer.max_len): it "
                    "would be truncated; shorten it"
                )

    def _embed_tokens_impl(self, params, tokens):
        return self.two_tower.apply({"params": params}, tokens, method=self.two_tower.embed_texts)

    def _embed_text_list(self, texts: Sequence[str]) -> np.ndarray:
        """[N, E] embeddings of already checked texts, cached per text."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for chunk in _chunks(missing, TEXT_CHUNK):
            tokens = self.tokenizer.encode(chunk + [""] * (TEXT_CHUNK - len(chunk)))
            emb = np.asarray(self._embed_tokens(self._tower_params, jnp.asarray(tokens)))
            for text, row in zip(chunk, emb):
                self._text_cache[text] = row
        out = np.stack([self._text_cache[t] for t in texts]).astype(np.float32)
        while len(self._text_cache) > 100_000:
            self._text_cache.popitem(last=False)
        return out

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, E] unit-norm text-tower embeddings of the raw texts (no prompt template).

        Raises ValueError for an empty list, a non-string or empty text, or a text longer than
        the tokenizer's max_len (naming the text and the limit; texts are never truncated).
        """
        texts = self._check_texts(texts, "text")
        self._check_lengths([(t, "{}", t) for t in texts], "text")
        return self._embed_text_list(texts)

    def query_classifier(self, queries: Sequence[str]) -> dict[str, np.ndarray]:
        """The text classifier of `queries` as `predict` builds it.

        Each query is put into the run's prompt templates (`text.templates`), embedded and
        averaged (`build_text_classifier`); the vocabulary is padded to a bucket.

        Returns {"embeddings": float32 [K, E], "valid": bool [K], "is_novel": bool [K]} with
        K = bucket_size(len(queries)); row i < len(queries) is query i.
        """
        queries = self._check_texts(queries, "query")
        templates = self.templates
        pairs = [(q, t, t.format(clean_name(q))) for q in queries for t in templates]
        self._check_lengths(pairs, "query")
        emb, valid = build_text_classifier(queries, self._embed_text_list, templates=templates)
        is_novel = np.zeros(valid.shape, bool)
        is_novel[: len(queries)] = [clean_name(q) not in self.base_names for q in queries]
        return {"embeddings": emb, "valid": valid, "is_novel": is_novel}

    # ---- detection -----------------------------------------------------------------------------
    def predict(
        self,
        images: ImageLike | Sequence[ImageLike],
        queries: Sequence[str],
        *,
        score_threshold: float = 0.3,
        max_detections: int = 100,
    ) -> Detections | list[Detections]:
        """Detects the objects the queries name.

        Args:
          images: one image or a list: uint8 [H, W, 3] RGB arrays, PIL images or file paths.
          queries: free-text category names, e.g. ["striped red", "a red shape"].
          score_threshold: detections scoring below it are dropped.
          max_detections: at most this many per image (and at most the run's
            `infer.max_detections`, the size of the compiled top-k).

        Returns:
          `Detections` for one image, or a list of them (one per image, in order) for a list.

        Raises:
          CheckpointKindError: the predictor was loaded from a pretraining run.
          FileNotFoundError / ImageError (a ValueError): an image that cannot be read, named.
          ValueError: no queries, an empty query or one the text tower would truncate.
        """
        self.require_detector("detection")
        if not isinstance(score_threshold, (int, float)) or not np.isfinite(score_threshold):
            raise ValueError(f"score_threshold must be a finite number, got {score_threshold!r}")
        if isinstance(max_detections, bool) or not isinstance(max_detections, int):
            raise ValueError(f"max_detections must be an integer >= 1, got {max_detections!r}")
        if max_detections < 1:
            raise ValueError(f"max_detections must be an integer >= 1, got {max_detections!r}")
        items, single = as_image_list(images)
        queries = self._check_texts(queries, "query")
        first = [load_image(im) for im in items[: self.max_batch]]  # bad input fails early
        text = {k: jnp.asarray(v) for k, v in self.query_classifier(queries).items()}
        results: list[Detections] = []
        for i, chunk in enumerate(_chunks(items, self.max_batch)):
            arrays = first if i == 0 else [load_image(im) for im in chunk]
            results += self._predict_arrays(
                arrays, text, queries, float(score_threshold), max_detections
            )
        return results[0] if single else results

    def _predict_arrays(
        self,
        arrays: list[np.ndarray],
        text: dict[str, jax.Array],
        queries: list[str],
        score_threshold: float,
        max_detections: int,
    ) -> list[Detections]:
        bucket = _bucket(len(arrays), self.max_batch)
        source = [{"image": a, "image_id": i} for i, a in enumerate(arrays)]
        (batch,) = eval_detection_batches(
            source,
            batch_size=bucket,
            image_size=self.image_size,
            max_pixels=DEFAULT_MAX_PIXELS,
            pixels=self.pixels,
        )
        if not batch["mask"][: len(arrays)].all():
            raise ValueError("an image could not be prepared for the detector (see the log)")
        out = jax.device_get(
            self._detect(
                self._params,
                self._vlm_params,
                jnp.asarray(batch["image"]),
                text["embeddings"],
                text["valid"],
                text["is_novel"],
            )
        )
        results = []
        for j in range(len(arrays)):
            h, w, scale = batch["image_info"][j][:3]
            h, w = int(h), int(w)
            scores = out["scores"][j]
            keep = np.flatnonzero(out["valid"][j] & (scores >= score_threshold))
            keep = keep[np.argsort(-scores[keep], kind="stable")][:max_detections]
            boxes = to_original_coordinates(out["boxes"][j][keep], scale, h, w)
            labels = out["classes"][j][keep].astype(np.int32)
            masks = None
            if self.has_masks:
                masks = paste_masks(out["masks"][j][keep], boxes, h, w)
            results.append(
                Detections(
                    boxes=boxes.astype(np.float32),
                    scores=scores[keep].astype(np.float32),
                    labels=labels,
                    names=[queries[int(c)] for c in labels],
                    masks=masks,
                    image_size=(h, w),
                )
            )
        return results

    # ---- image embeddings and retrieval --------------------------------------------------------
    def _embed_pixels_impl(self, params, images):
        return self.two_tower.apply({"params": params}, images, method=self.two_tower.embed_images)

    def _embed_arrays(self, arrays: list[np.ndarray]) -> np.ndarray:
        size = self.image_size if self.kind == "pretrain" else self._tower_image_size
        self.images_embedded += len(arrays)
        out = []
        for chunk in _chunks(arrays, self.max_batch):
            bucket = _bucket(len(chunk), self.max_batch)
            pixels = np.zeros((bucket, size, size, 3), np.float32)
            for i, a in enumerate(chunk):
                pixels[i] = preprocess_image(
                    a, None, size=size, crop_scale=None, flip=False, pixels=self.pixels
                )
            emb = self._embed_pixels(self._tower_params, jnp.asarray(pixels))
            out.append(np.asarray(emb)[: len(chunk)])
        return np.concatenate(out).astype(np.float32)

    def embed_images(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """float32 [N, E] unit-norm image-tower embeddings (whole image, resized as evaluation).

        A detector run embeds at its pretraining resolution (`pp.image_size`).
        """
        items, _ = as_image_list(images)
        return self._embed_arrays([load_image(im) for im in items])

    def retrieve(
        self, folder_or_paths: str | os.PathLike | Sequence[str], query: str, k: int = 5
    ) -> list[tuple[str, float]]:
        """The `k` images most similar to `query`: [(path, cosine similarity)], best first.

        `folder_or_paths` is a folder (its image files, see `images.list_images`) or a list of
        image paths, local or bucket URLs. Image embeddings are cached per file (path, size,
        modification time or object generation), so asking a folder again embeds only new or
        changed files.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if isinstance(folder_or_paths, (str, os.PathLike)):
            folder = os.fspath(folder_or_paths)
            files = list_images(folder) if paths.isdir(folder) else [folder]
        else:
            files = [os.fspath(p) for p in folder_or_paths]
            if not files:
                raise ValueError("the list of image paths is empty")
        keys = []
        for p in files:
            if not paths.isfile(p):
                raise FileNotFoundError(f"image file not found: {p}")
            # (size, modification time or a bucket object's generation): a rewritten file is
            # embedded again.
            keys.append((paths.absolute(p), *paths.version(p)))
        todo = [i for i, key in enumerate(keys) if key not in self._image_cache]
        for chunk in _chunks(todo, self.max_batch):
            emb = self._embed_arrays([load_image(files[i]) for i in chunk])
            for i, row in zip(chunk, emb):
                self._image_cache[keys[i]] = row
        zimg = np.stack([self._image_cache[key] for key in keys])
        (ztxt,) = self.embed_texts([query])
        sims = zimg.astype(np.float64) @ ztxt.astype(np.float64)
        order = np.argsort(-sims, kind="stable")[:k]
        logging.debug("retrieved %d of %d images for %r", len(order), len(files), query)
        return [(files[i], float(sims[i])) for i in order]
