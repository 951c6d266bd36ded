"""Open-vocabulary Mask R-CNN on a plain ViT (ViTDet-style), as flax modules.

The module only holds parameters and the dense parts (backbone, pyramid, heads). Anchor
matching, proposal selection, RoI sampling and losses are pure functions in
`rovit_jax.detection`, which call these submodules through `model.apply(..., method=...)`.

Parameters::

  backbone/...     ViT image tower (loaded from a pretraining checkpoint's `img`)
  fpn/...          simple feature pyramid
  rpn/...          RPN head shared over levels
  box_head/...     convs + FC + box deltas + region embedding
  mask_head/...    class-agnostic mask head
  bg_embedding     [E] background row of the classifier (unit-normalised when used): with
                   background="text" a fixed text embedding (the task stores the text tower's
                   embedding of "." there and it gets no gradient), with "learned" a free one
  cls_log_scale    scalar: logits = cos / (base_temperature * exp(-cls_log_scale))
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rovit_jax.models.detection_heads import BoxHead, MaskHead, RPNHead
from rovit_jax.models.fpn import SimpleFeaturePyramid
from rovit_jax.models.vit import ViT

__all__ = ["BACKGROUND_MODES", "OpenVocabDetector"]

BACKGROUND_MODES = ("text", "learned")


class OpenVocabDetector(nn.Module):
    """Backbone + pyramid + RPN + box/mask heads; see module docstring for the layout.

    Attributes:
      backbone: ViT keyword arguments (incl. window_size / global_blocks for ViTDet).
      min_level, max_level: pyramid levels.
      fpn_channels: pyramid width.
      num_anchors: anchors per location.
      embed_dim: text embedding size E (the region embedding's space).
      head_conv_dim, head_fc_dim, mask_conv_dim: head widths.
      base_temperature: logits = cos(region, text) * exp(cls_log_scale) / base_temperature.
      box_stages: box/class heads, one per Cascade R-CNN stage ("box_head", then
        "box_head_stage2", ...); 1 = one head (the authors').
      background: "text" (the authors': the background row is a fixed text embedding, held in
        `bg_embedding` behind stop_gradient) or "learned" (`bg_embedding` is trained). Both
        modes have the same parameters, so either loads the other's checkpoints.
    """

    backbone: dict
    min_level: int = 2
    max_level: int = 5
    fpn_channels: int = 256
    num_anchors: int = 3
    rpn_box_bias_init: float = 0.0  # see RPNHead.box_bias_init
    embed_dim: int = 768
    head_conv_dim: int = 256
    head_num_convs: int = 4
    head_fc_dim: int = 1024
    mask_conv_dim: int = 256
    mask_num_convs: int = 4
    base_temperature: float = 0.01
    background: str = "text"
    box_stages: int = 1
    dtype: Any = jnp.float32

    def setup(self):
        if self.background not in BACKGROUND_MODES:
            raise ValueError(
                f"background must be one of {BACKGROUND_MODES}, got {self.background!r}"
            )
        self.vit = ViT(**{"dtype": self.dtype, **dict(self.backbone)}, name="backbone")
        self.fpn = SimpleFeaturePyramid(
            patch_size=self.backbone["patch_size"],
            min_level=self.min_level,
            max_level=self.max_level,
            channels=self.fpn_channels,
            dtype=self.dtype,
            name="fpn",
        )
        self.rpn = RPNHead(
            num_anchors=self.num_anchors,
            channels=self.fpn_channels,
            box_bias_init=self.rpn_box_bias_init,
            dtype=self.dtype,
            name="rpn",
        )
        self.box_heads = [
            BoxHead(
                embed_dim=self.embed_dim,
                conv_dim=self.head_conv_dim,
                num_convs=self.head_num_convs,
                fc_dim=self.head_fc_dim,
                dtype=self.dtype,
                # The first stage keeps the single head's name: its checkpoints load either way.
                name="box_head" if k == 0 else f"box_head_stage{k + 1}",
            )
            for k in range(self.box_stages)
        ]
        self.mask = MaskHead(
            conv_dim=self.mask_conv_dim,
            num_convs=self.mask_num_convs,
            dtype=self.dtype,
            name="mask_head",
        )
        self.bg_embedding = self.param(
            "bg_embedding", nn.initializers.normal(self.embed_dim**-0.5), (self.embed_dim,)
        )
        self.cls_log_scale = self.param("cls_log_scale", nn.initializers.zeros, ())

    def features(self, images: jax.Array, train: bool = False) -> dict[int, jax.Array]:
        """[B, S, S, 3] -> {level: [B, S / 2**l, S / 2**l, C]}."""
        _, aux = self.vit(images, train=train)
        return self.fpn(aux["patch_grid"])

    def rpn_outputs(self, features: dict[int, jax.Array]):
        return self.rpn(features)

    def box_outputs(self, roi_features: jax.Array, stage: int = 0) -> tuple[jax.Array, jax.Array]:
        """[B, R, S, S, C] -> (deltas [B, R, 4], unit embeddings [B, R, E]) of stage's head."""
        return self.box_heads[stage](roi_features)

    def mask_outputs(self, roi_features: jax.Array) -> jax.Array:
        return self.mask(roi_features)

    def background_embedding(self) -> jax.Array:
        """[E] unit-norm background row of the classifier (shared with the VLM's classifier)."""
        bg = self.bg_embedding.astype(jnp.float32)
        if self.background == "text":
            bg = jax.lax.stop_gradient(bg)
        return bg / jnp.maximum(jnp.linalg.norm(bg), 1e-12)

    def class_logits(
        self, region_embeddings: jax.Array, text_embeddings: jax.Array, text_valid: jax.Array
    ) -> jax.Array:
        """Cosine logits over [background, vocabulary].

        Args:
          region_embeddings: [B, R, E] unit-norm.
          text_embeddings: [K, E] unit-norm (padded vocabulary).
          text_valid: [K] bool; padded entries get -1e9 so they never win nor take mass.

        Returns:
          [B, R, 1 + K] float32 logits; column 0 is background.
        """
        bg = self.background_embedding()
        classifier = jnp.concatenate([bg[None], text_embeddings.astype(jnp.float32)], axis=0)
        scale = jnp.exp(self.cls_log_scale) / self.base_temperature
        logits = jnp.einsum("bre,ke->brk", region_embeddings, classifier) * scale
        valid = jnp.concatenate([jnp.ones((1,), bool), text_valid])
        return jnp.where(valid, logits, -1e9)

    def __call__(self, images: jax.Array, train: bool = False):
        """Initialises every submodule: returns pyramid, RPN, head outputs on dummy RoIs."""
        feats = self.features(images, train)
        rpn = self.rpn_outputs(feats)
        b = images.shape[0]
        level = min(feats)
        dummy = jnp.zeros((b, 1, 7, 7, feats[level].shape[-1]), feats[level].dtype)
        for stage in range(self.box_stages):
            deltas, emb = self.box_outputs(dummy, stage)
        masks = self.mask_outputs(jnp.zeros((b, 1, 14, 14, feats[level].shape[-1])))
        logits = self.class_logits(emb, jnp.zeros((1, self.embed_dim)), jnp.ones((1,), bool))
        return feats, rpn, deltas, logits, masks
