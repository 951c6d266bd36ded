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

from rovit_jax.config_sections import resolve_sections
from rovit_jax.data import image_text, sources
from rovit_jax.data.pixels import Pixels
from rovit_jax.data.tokenizer import CLIP_VOCAB_FILE, CLIP_VOCAB_SIZE, open_clip_vocab_file
from rovit_jax.evaluation.retrieval import recall_at_k
from rovit_jax.losses import contrastive
from rovit_jax.models.layers import COMPUTE_DTYPES
from rovit_jax.models.two_tower import TwoTower
from rovit_jax.models.vit import vit_variant
from rovit_jax.ops.posemb import sample_crop_boxes
from rovit_jax.pretrain_settings import PRETRAIN_SECTIONS, pretrain_settings
from rovit_jax.run_config import run_problems, run_settings
from rovit_jax.train import mesh as mesh_lib


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"config key `{key}` = {value!r}: {why}")


def validate_config(
    config: ml_collections.ConfigDict, *, check_files: bool = True
) -> dict[str, Any]:
    """Checks every pretraining setting that would otherwise fail late or silently.

    Args:
      config: a pretraining config.
      check_files: also check the dataset settings and that the data and tokenizer files exist.
        False when only the model and the step are built (memory planning, `rovit_jax.plan`),
        which reads no data.

    Raises:
      rovit_jax.config_check.ConfigError (a ValueError) listing every problem found, one per
      line, each naming the config key and its value.

    Returns:
      {section: typed settings} of PRETRAIN_SECTIONS and "run" (`run_config.RunSettings`),
      resolved while checking.
    """
    from rovit_jax import config_check as cc  # Local: keeps this module's imports unchanged.

    p = cc.Problems()
    run = run_problems(p, config)

    # data, model, loss, cpe, pp, tokenizer, eval and optim: the typed sections check their
    # fields.
    sections = resolve_sections(PRETRAIN_SECTIONS, config, p)
    sections["run"] = run
    if check_files:
        _check_inputs(p, sections)
    pp, cpe, image = sections["pp"], sections["cpe"], sections["model.image"]
    patch = None if image is None else vit_variant(image.variant)["patch_size"]
    variant = None if image is None else image.variant
    if pp is not None and patch is not None:
        p.check(
            pp.image_size % patch == 0,
            "pp.image_size",
            pp.image_size,
            f"must be divisible by the patch size {patch} of model.image.variant={variant!r}",
        )
        if cpe is not None:
            grid = pp.image_size // patch
            p.check(
                cpe.up_size >= grid,
                "cpe.up_size",
                cpe.up_size,
                f"must be >= the pretraining patch grid {grid} "
                f"(pp.image_size={pp.image_size} / patch {patch})",
            )
    _check_tokenizer_and_tower(p, sections["tokenizer"], sections["model.text"])
    for tower in (sections["model.image"], sections["model.text"]):
        if tower is not None:
            try:
                tower.size()
            except ValueError as e:
                p.add(f"{tower.SECTION}.num_heads", tower.num_heads, str(e))
    cc.check_bool(p, config, "scan_layers", default=False)
    p.raise_if_any()
    return sections


def _check_inputs(p: Any, sections: dict[str, Any]) -> None:
    """The fields the training and retrieval data need, and the tokenizer file, so that a
    missing file is reported before anything is built. Remote paths (gs://...) and file
    patterns are not checked on disk."""
    from rovit_jax import config_check as cc

    data, retrieval, tok = sections["data"], sections["data.eval"], sections["tokenizer"]
    if data is not None:
        data.input_problems(p)
        if retrieval is not None:
            sources.retrieval_problems(p, data, retrieval)
    if tok is None:
        return  # its problems are reported with the tokenizer section
    if tok.model_path:
        cc.path_problems(
            p, "tokenizer.model_path", tok.model_path, kind="file", needed_for="the tokenizer"
        )
    elif tok.kind == "clip_bpe":
        p.check(
            open_clip_vocab_file() is not None,
            "tokenizer.model_path",
            tok.model_path,
            f"is empty and open_clip_torch (which packages CLIP's {CLIP_VOCAB_FILE}) is not "
            "installed: give the file's path",
        )
    elif data is not None and data.name != "shapes_world":
        p.add(
            "tokenizer.model_path",
            tok.model_path,
            f"is required (a SentencePiece .model file) for data.name={data.name!r}",
        )


def _check_tokenizer_and_tower(p: Any, tok: Any, text: Any) -> None:
    """What the text tower assumes about the tokenizer's ids."""
    if tok is None or text is None:
        return
    if tok.kind == "clip_bpe":
        p.check(
            not text.mask_padding,
            "model.text.mask_padding",
            text.mask_padding,
            "must be False with tokenizer.kind='clip_bpe': CLIP pads with id 0, which is also "
            "the piece '!', so masking from the first 0 would cut texts short",
        )
        p.check(
            tok.vocab_size >= CLIP_VOCAB_SIZE,
            "tokenizer.vocab_size",
            tok.vocab_size,
            f"must be >= {CLIP_VOCAB_SIZE}, the size of CLIP's vocabulary",
        )
    if text.pool_type == "eos":
        p.check(
            tok.kind == "clip_bpe",
            "model.text.pool_type",
            text.pool_type,
            "pools the position of the largest id, CLIP's end-of-text token: it needs "
            "tokenizer.kind='clip_bpe'",
        )


def build_model(
    config: ml_collections.ConfigDict,
    settings: dict[str, Any] | None = None,
    attention: str | None = None,
    compute_dtype: str | None = None,
) -> TwoTower:
    """The two-tower model described by `config.model` (and pp/cpe/dtype/remat/attention);
    `settings`: the config's typed sections when already resolved (`pretrain_settings(config)`
    otherwise); `attention`, `compute_dtype`: the attention kernel and compute dtype when not
    the config's (a detection run's own choices for the towers it reuses)."""
    settings = pretrain_settings(config) if settings is None else settings
    run = run_settings(config)
    attention = run.attention if attention is None else attention
    tok, model = settings["tokenizer"], settings["model"]
    img_cfg, txt_cfg = settings["model.image"], settings["model.text"]
    img = img_cfg.size()
    grid = settings["pp"].image_size // img["patch_size"]
    dtype = COMPUTE_DTYPES[run.compute_dtype if compute_dtype is None else compute_dtype]
    scan_layers = bool(config.get("scan_layers", False))
    image = dict(
        img,
        posemb_grid=(grid, grid),
        pool_type=img_cfg.pool_type,
        pre_norm=img_cfg.pre_norm,
        activation=img_cfg.activation,
        norm_eps=img_cfg.norm_eps,
        cpe_up_size=settings["cpe"].up_size,
        dtype=dtype,
        remat_policy=config.remat,
        scan_layers=scan_layers,
        attention=attention,
    )
    text = dict(
        txt_cfg.size(),
        vocab_size=tok.vocab_size,
        max_len=tok.max_len,
        pool_type=txt_cfg.pool_type,
        causal=txt_cfg.causal,
        pad_id=tok.pad_id,
        mask_padding=txt_cfg.mask_padding,
        activation=txt_cfg.activation,
        norm_eps=txt_cfg.norm_eps,
        dtype=dtype,
        remat_policy=config.remat,
        scan_layers=scan_layers,
        attention=attention,
    )
    return TwoTower(
        image=image,
        text=text,
        embed_dim=model.embed_dim,
        temperature_init=model.temperature_init,
        bias_init=model.bias_init,
        image_head=model.image_head,
        head_bias=model.head_bias,
        dtype=dtype,
    )


class PretrainTask:
    """Image-text contrastive pretraining with optional CPE; zero-shot retrieval as evaluation."""

    def __init__(self, config: ml_collections.ConfigDict, *, check_files: bool = True):
        # check_files=False: planning only (see validate_config); the data is never read then.
        # The typed sections (PRETRAIN_SECTIONS), resolved once while validating.
        self.settings = validate_config(config, check_files=check_files)
        self.config = config
        self.model = build_model(config, self.settings)
        self._mesh: Mesh | None = None

    # ---- data ---------------------------------------------------------------------------------
    @cached_property
    def _data(self) -> sources.ImageTextData:
        """Tokenizer, training source and retrieval-evaluation data (see data.sources)."""
        return sources.image_text_data(self.settings)

    def train_batches(self, process_index: int, process_count: int) -> image_text.PretrainBatches:
        pp = self.settings["pp"]
        return image_text.PretrainBatches(
            self._data.train,
            self._data.tokenizer,
            global_batch=int(self.config.batch_size),
            image_size=pp.image_size,
            seed=int(self.config.seed),
            crop_scale=pp.crop_scale,
            flip=pp.flip,
            pixels=Pixels.from_settings(pp),
            num_workers=self.settings["data"].num_workers,
            worker_processes=self.settings["data"].worker_processes,
            process_index=process_index,
            process_count=process_count,
        )

    def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        b, s, length = (
            int(self.config.batch_size),
            self.settings["pp"].image_size,
            self.settings["tokenizer"].max_len,
        )
        return {
            "image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
            "text": jax.ShapeDtypeStruct((b, length), jnp.int32),
        }

    # ---- model and loss -----------------------------------------------------------------------
    def validate(self, mesh: Mesh) -> None:
        from rovit_jax import config_check as cc

        cc.check_batches_fit_mesh(self.config, dict(mesh.shape))
        self._mesh = mesh

    def init_params(self, rng: jax.Array) -> Any:
        return self.init_model_params(rng)

    def init_model_params(self, rng: jax.Array) -> Any:
        shapes = self.batch_shapes()
        images = jnp.zeros((1,) + shapes["image"].shape[1:], jnp.float32)
        tokens = jnp.zeros((1,) + shapes["text"].shape[1:], jnp.int32)
        return self.model.init(rng, images, tokens)["params"]

    def _use_chunked(self) -> bool:
        chunked = self.settings["loss"].chunked
        if chunked == "auto":
            return self._mesh is not None and mesh_lib.num_batch_shards(self._mesh) > 1
        return bool(chunked)

    def loss_fn(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        images, tokens = batch["image"], batch["text"]
        boxes = None
        cpe = self.settings["cpe"]
        if cpe.enabled:
            boxes = sample_crop_boxes(rng, images.shape[0], scale=cpe.scale, ratio=cpe.ratio)
        (zimg, ztxt), aux = self.model.apply(
            {"params": params}, images, tokens, crop_boxes=boxes, train=True
        )
        scale, bias = aux["scale"], aux["bias"]
        loss_cfg = self.settings["loss"]
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
            batch_size=self.settings["eval"].batch_size,
            image_size=self.settings["pp"].image_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            pixels=Pixels.from_settings(self.settings["pp"]),
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
            sim, new_index[text_to_image[text_keep]], ks=self.settings["eval"].recall_ks
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
        size = self.settings["eval"].batch_size
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
