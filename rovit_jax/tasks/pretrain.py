"""Region-aware image-text pretraining: two towers, cropped positional embeddings, focal loss."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rovit_jax.data import image_text, sources
from rovit_jax.evaluation.retrieval import recall_at_k
from rovit_jax.losses import contrastive
from rovit_jax.models.text import text_variant
from rovit_jax.models.two_tower import TwoTower
from rovit_jax.models.vit import vit_variant
from rovit_jax.ops.posemb import sample_crop_boxes
from rovit_jax.train import mesh as mesh_lib

LOSS_KINDS = ("softmax", "sigmoid", "focal")
IMAGE_POOLS = ("gap", "tok", "map")
TEXT_POOLS = ("mean", "last", "first", "map")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
REMAT = ("none", "full", "dots")


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"config key `{key}` = {value!r}: {why}")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every pretraining setting that would otherwise fail late or silently."""
    _check(
        config.data.name in sources.PRETRAIN_DATASETS,
        "data.name",
        config.data.name,
        f"choose one of {sources.PRETRAIN_DATASETS}",
    )
    patch = vit_variant(config.model.image.variant)["patch_size"]
    _check(
        config.pp.image_size % patch == 0,
        "pp.image_size",
        config.pp.image_size,
        f"must be divisible by the patch size {patch} of model.image.variant="
        f"{config.model.image.variant!r}",
    )
    _check(
        config.loss.kind in LOSS_KINDS,
        "loss.kind",
        config.loss.kind,
        f"unknown loss; choose one of {LOSS_KINDS}",
    )
    _check(0.0 <= config.loss.alpha <= 1.0, "loss.alpha", config.loss.alpha, "must be in [0, 1]")
    _check(config.loss.gamma >= 0.0, "loss.gamma", config.loss.gamma, "must be >= 0")
    _check(
        config.model.image.pool_type in IMAGE_POOLS,
        "model.image.pool_type",
        config.model.image.pool_type,
        f"unknown pooling; choose one of {IMAGE_POOLS}",
    )
    _check(
        config.model.text.pool_type in TEXT_POOLS,
        "model.text.pool_type",
        config.model.text.pool_type,
        f"unknown pooling; choose one of {TEXT_POOLS}",
    )
    text_variant(config.model.text.variant)  # Raises naming the variant.
    lo, hi = config.cpe.scale
    _check(
        0.0 < lo <= hi <= 1.0,
        "cpe.scale",
        tuple(config.cpe.scale),
        "crop area fractions must satisfy 0 < low <= high <= 1",
    )
    rlo, rhi = config.cpe.ratio
    _check(
        0.0 < rlo <= rhi,
        "cpe.ratio",
        tuple(config.cpe.ratio),
        "aspect ratios must satisfy 0 < low <= high",
    )
    grid = config.pp.image_size // patch
    _check(
        config.cpe.up_size >= grid,
        "cpe.up_size",
        config.cpe.up_size,
        f"must be >= the pretraining patch grid {grid}",
    )
    _check(
        config.compute_dtype in DTYPES,
        "compute_dtype",
        config.compute_dtype,
        f"choose one of {tuple(DTYPES)}",
    )
    _check(config.remat in REMAT, "remat", config.remat, f"choose one of {REMAT}")
    _check(config.batch_size > 0, "batch_size", config.batch_size, "must be positive")
    if config.pp.crop_scale is not None:
        clo, chi = config.pp.crop_scale
        _check(
            0.0 < clo <= chi <= 1.0,
            "pp.crop_scale",
            tuple(config.pp.crop_scale),
            "crop area fractions must satisfy 0 < low <= high <= 1",
        )


def build_model(config: ml_collections.ConfigDict) -> TwoTower:
    """The two-tower model described by `config.model` (and pp/cpe/dtype/remat)."""
    img = vit_variant(config.model.image.variant)
    grid = config.pp.image_size // img["patch_size"]
    dtype = DTYPES[config.compute_dtype]
    image = dict(
        img,
        posemb_grid=(grid, grid),
        pool_type=config.model.image.pool_type,
        cpe_up_size=int(config.cpe.up_size),
        dtype=dtype,
        remat_policy=config.remat,
    )
    text = dict(
        text_variant(config.model.text.variant),
        vocab_size=int(config.tokenizer.vocab_size),
        max_len=int(config.tokenizer.max_len),
        pool_type=config.model.text.pool_type,
        dtype=dtype,
        remat_policy=config.remat,
    )
    bias = config.model.bias_init
    return TwoTower(
        image=image,
        text=text,
        embed_dim=int(config.model.embed_dim),
        temperature_init=float(config.model.temperature_init),
        bias_init=None if bias is None else float(bias),
        dtype=dtype,
    )


class PretrainTask:
    """Image-text contrastive pretraining with optional CPE; zero-shot retrieval as evaluation."""

    def __init__(self, config: ml_collections.ConfigDict):
        validate_config(config)
        self.config = config
        self.model = build_model(config)
        self._mesh: Mesh | None = None

    # ---- data ---------------------------------------------------------------------------------
    @cached_property
    def _data(self) -> sources.ImageTextData:
        """Tokenizer, training source and retrieval-evaluation data (see data.sources)."""
        return sources.image_text_data(self.config)

    def train_batches(self, process_index: int, process_count: int) -> image_text.PretrainBatches:
        pp = self.config.pp
        return image_text.PretrainBatches(
            self._data.train,
            self._data.tokenizer,
            global_batch=int(self.config.batch_size),
            image_size=int(pp.image_size),
            seed=int(self.config.seed),
            crop_scale=None if pp.crop_scale is None else tuple(pp.crop_scale),
            flip=bool(pp.flip),
            num_workers=int(self.config.data.get("num_workers") or 1),
            process_index=process_index,
            process_count=process_count,
        )

    def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        b, s, length = (
            int(self.config.batch_size),
            int(self.config.pp.image_size),
            int(self.config.tokenizer.max_len),
        )
        return {
            "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
            "text": jax.ShapeDtypeStruct((b, length), jnp.int32),
        }

    # ---- model and loss -----------------------------------------------------------------------
    def validate(self, mesh: Mesh) -> None:
        shards = mesh_lib.num_batch_shards(mesh)
        _check(
            self.config.batch_size % shards == 0,
            "batch_size",
            self.config.batch_size,
            f"must be divisible by the {shards} batch shards of the mesh {dict(mesh.shape)}",
        )
        _check(
            self.config.eval.batch_size % shards == 0,
            "eval.batch_size",
            self.config.eval.batch_size,
            f"must be divisible by the {shards} batch shards of the mesh {dict(mesh.shape)}",
        )
        self._mesh = mesh

    def init_params(self, rng: jax.Array) -> Any:
        shapes = self.batch_shapes()
        images = jnp.zeros((1,) + shapes["image"].shape[1:], jnp.float32)
        tokens = jnp.zeros((1,) + shapes["text"].shape[1:], jnp.int32)
        return self.model.init(rng, images, tokens)["params"]

    def _use_chunked(self) -> bool:
        chunked = self.config.loss.chunked
        if chunked == "auto":
            return self._mesh is not None and mesh_lib.num_batch_shards(self._mesh) > 1
        return bool(chunked)

    def loss_fn(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        images, tokens = batch["image"], batch["text"]
        boxes = None
        if self.config.cpe.enabled:
            boxes = sample_crop_boxes(
                rng,
                images.shape[0],
                scale=tuple(self.config.cpe.scale),
                ratio=tuple(self.config.cpe.ratio),
            )
        (zimg, ztxt), aux = self.model.apply(
            {"params": params}, images, tokens, crop_boxes=boxes, train=True
        )
        scale, bias = aux["scale"], aux["bias"]
        loss_cfg = self.config.loss
        if self._use_chunked():
            loss = contrastive.chunked_contrastive_loss(
                zimg,
                ztxt,
                scale,
                bias,
                kind=loss_cfg.kind,
                mesh=self._mesh,
                batch_axes=mesh_lib.BATCH_AXES,
                alpha=loss_cfg.alpha,
                gamma=loss_cfg.gamma,
            )
        else:
            logits = scale * zimg @ ztxt.T + bias
            loss = contrastive.contrastive_loss_fn(
                loss_cfg.kind, alpha=loss_cfg.alpha, gamma=loss_cfg.gamma
            )(logits)
        return loss, {"scale": scale, "bias": jnp.asarray(bias, jnp.float32)}

    # ---- evaluation ---------------------------------------------------------------------------
    def evaluate(self, trainer, params: Any) -> dict[str, float]:
        """Zero-shot retrieval recall@1/5/10 both ways on the evaluation data (whole PE, no CPE).

        One caption per image pairs caption i with image i; datasets with several captions per
        image rank every caption against every image (an image's captions all count as hits).
        """
        data = self._data
        embed = self._embed_fn(trainer)
        zimgs, ztxts, keep = [], [], []
        for batch in image_text.eval_batches(
            data.eval_images,
            data.tokenizer,
            batch_size=int(self.config.eval.batch_size),
            image_size=int(self.config.pp.image_size),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        ):
            global_batch = trainer.global_batch({"image": batch["image"], "text": batch["text"]})
            zi, zt = embed(params, global_batch["image"], global_batch["text"])
            mask = multihost_utils.process_allgather(batch["mask"], tiled=True)
            zimgs.append(np.asarray(zi))
            ztxts.append(np.asarray(zt))
            keep.append(mask)
        keep_all = np.concatenate(keep)
        zimg = np.concatenate(zimgs)[: len(data.eval_images)]
        if data.eval_captions is None:
            ztxt = np.concatenate(ztxts)[: len(data.eval_images)]
            text_to_image = np.arange(len(ztxt))
            text_keep = keep_all[: len(ztxt)]
        else:
            ztxt = self._embed_captions(trainer, params, data.eval_captions)
            text_to_image = np.asarray(data.eval_text_to_image)
            text_keep = keep_all[text_to_image]
        # Undecodable images leave the evaluation together with their captions.
        image_keep = keep_all[: len(zimg)]
        new_index = np.cumsum(image_keep) - 1
        sim = zimg[image_keep].astype(np.float64) @ ztxt[text_keep].astype(np.float64).T
        metrics = recall_at_k(
            sim, new_index[text_to_image[text_keep]], ks=tuple(self.config.eval.recall_ks)
        )
        metrics["num_pairs"] = float(text_keep.sum())
        metrics["num_images"] = float(image_keep.sum())
        return metrics

    def _embed_captions(self, trainer, params: Any, captions: list[str]) -> np.ndarray:
        """[len(captions), E] text embeddings, in global batches of `eval.batch_size`."""
        if getattr(self, "_text_embed_cache", None) is None:
            self._text_embed_cache = jax.jit(
                lambda p, tokens: self.model.apply(
                    {"params": p}, tokens, method=self.model.embed_texts
                ),
                in_shardings=(trainer.param_shardings(), trainer.batch_sharding),
                out_shardings=trainer.replicated,
            )
        size = int(self.config.eval.batch_size)
        local = size // jax.process_count()
        start = jax.process_index() * local
        out = []
        for i in range(0, len(captions), size):
            chunk = list(captions[i : i + size])
            chunk += [""] * (size - len(chunk))
            tokens = self._data.tokenizer.encode(chunk[start : start + local])
            batch = trainer.global_batch({"text": tokens})
            out.append(np.asarray(self._text_embed_cache(params, batch["text"])))
        return np.concatenate(out)[: len(captions)]

    def _embed_fn(self, trainer):
        if getattr(self, "_embed_cache", None) is None:

            def embed(params, images, tokens):
                (zimg, ztxt), _ = self.model.apply({"params": params}, images, tokens)
                return zimg, ztxt

            self._embed_cache = jax.jit(
                embed,
                in_shardings=(
                    trainer.param_shardings(),
                    trainer.batch_sharding,
                    trainer.batch_sharding,
                ),
                out_shardings=(trainer.replicated, trainer.replicated),
            )
        return self._embed_cache
