"""Image-text two-tower model: ViT + text transformer + linear projections + temperature/bias.

Parameters::

  img/...        ViT
  txt/...        TextTransformer
  img_proj       Dense(embed_dim) on the pooled image features (absent without image_head)
  txt_proj       Dense(embed_dim) on the pooled text features (biases only with head_bias)
  t              scalar log-temperature; logit scale = exp(t)
  b              scalar logit bias (absent when bias_init is None)
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rovit_jax.models.logical_axes import EMBED, named
from rovit_jax.models.text import TextTransformer
from rovit_jax.models.vit import ViT

__all__ = ["TwoTower", "l2_normalize"]


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Unit-norms the last axis in float32: [..., E] -> [..., E]."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class TwoTower(nn.Module):
    """Contrastive image-text model.

    Attributes:
      image: ViT keyword arguments (``dtype`` defaults to this module's dtype).
      text: TextTransformer keyword arguments (same default for ``dtype``).
      embed_dim: shared embedding size E.
      temperature_init: initial logit scale; parameter t = log(temperature_init).
      bias_init: initial logit bias; None = no bias parameter (bias 0).
      image_head: project the pooled image features (`img_proj`); False: they are the image
        embedding (SigLIP, whose MAP head already outputs the shared space; width == embed_dim).
      head_bias: the projections have biases (SigLIP's text head has one).
      dtype: compute dtype of towers and projections; embeddings are returned in float32.
    """

    image: dict
    text: dict
    embed_dim: int
    temperature_init: float = 10.0
    bias_init: float | None = -10.0
    image_head: bool = True
    head_bias: bool = False
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.temperature_init <= 0:
            raise ValueError(f"temperature_init must be > 0, got {self.temperature_init!r}")
        self.img = ViT(**{"dtype": self.dtype, **dict(self.image)})
        self.txt = TextTransformer(**{"dtype": self.dtype, **dict(self.text)})
        proj = dict(
            use_bias=self.head_bias,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=named(nn.initializers.lecun_normal(), EMBED, None),
        )
        if self.image_head:
            self.img_proj = nn.Dense(self.embed_dim, **proj)
        elif int(self.image["width"]) != self.embed_dim:
            raise ValueError(
                f"without an image head the image width {self.image['width']} is the "
                f"embedding size, but embed_dim = {self.embed_dim}"
            )
        self.txt_proj = nn.Dense(self.embed_dim, **proj)
        self.t = self.param(
            "t", nn.initializers.constant(math.log(self.temperature_init)), (), jnp.float32
        )
        if self.bias_init is not None:
            self.b = self.param("b", nn.initializers.constant(self.bias_init), (), jnp.float32)

    def _embed_images(self, images, crop_boxes, train):
        feats, aux = self.img(images, crop_boxes=crop_boxes, train=train)
        return l2_normalize(self.img_proj(feats) if self.image_head else feats), aux

    def _embed_texts(self, tokens, train):
        feats, aux = self.txt(tokens, train=train)
        return l2_normalize(self.txt_proj(feats)), aux

    def embed_images(
        self, images: jax.Array, *, crop_boxes: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """[B, H, W, 3] images (optional [B, 4] CPE boxes) -> [B, E] unit-norm float32."""
        return self._embed_images(images, crop_boxes, train)[0]

    def embed_texts(self, tokens: jax.Array, *, train: bool = False) -> jax.Array:
        """[B, L] token ids -> [B, E] unit-norm float32."""
        return self._embed_texts(tokens, train)[0]

    def __call__(
        self,
        images: jax.Array | None,
        tokens: jax.Array | None,
        *,
        crop_boxes: jax.Array | None = None,
        train: bool = False,
    ) -> tuple[tuple[jax.Array | None, jax.Array | None], dict[str, jax.Array]]:
        """Embeds images and/or texts (either may be None).

        Initialise with both present so that both towers get parameters.

        Returns:
          ((zimg [B, E] | None, ztxt [B, E] | None), aux) with aux["scale"] = exp(t),
          aux["bias"] (0 without a bias parameter) and each tower's aux as "img/<key>",
          "txt/<key>".
        """
        aux = {}
        zimg = ztxt = None
        if images is not None:
            zimg, img_aux = self._embed_images(images, crop_boxes, train)
            aux.update({f"img/{k}": v for k, v in img_aux.items()})
        if tokens is not None:
            ztxt, txt_aux = self._embed_texts(tokens, train)
            aux.update({f"txt/{k}": v for k, v in txt_aux.items()})
        aux["scale"] = jnp.exp(self.t)
        aux["bias"] = self.b if self.bias_init is not None else jnp.zeros((), jnp.float32)
        return (zimg, ztxt), aux
