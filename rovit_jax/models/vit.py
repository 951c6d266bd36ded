"""Plain ViT image tower with a learned 2-D position embedding and Cropped Positional Embedding.

Parameters (big_vision layout)::

  embedding/{kernel,bias}        patch embedding Conv, kernel [P, P, 3, D]
  pos_embedding                  [gh, gw, D] learned PE over the patch grid only
  cls, cls_pos_embedding         [1, 1, D] each, only for pool_type="tok"
  pre_norm/{scale,bias}          [D] each, only with pre_norm=True (CLIP's ln_pre)
  Transformer/...                see rovit_jax.models.layers
  MAPHead_0/...                  only for pool_type="map"
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rovit_jax.models.layers import (
    DEFAULT_NORM_EPS,
    Encoder,
    MAPHead,
    check_remat_policy,
    transformer_size,
)
from rovit_jax.models.logical_axes import EMBED, named
from rovit_jax.ops.posemb import crop_pos_embed, resize_pos_embed

__all__ = ["ViT", "vit_variant", "POOL_TYPES"]

POOL_TYPES = ("gap", "tok", "map")


def vit_variant(name: str) -> dict[str, int]:
    """Parses "B/16", "L/16", "mu/8", ... into ViT kwargs.

    Returns:
      {width, depth, mlp_dim, num_heads, patch_size}.
    """
    match = re.fullmatch(r"([A-Za-z]+)/([0-9]+)", name) if isinstance(name, str) else None
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"ViT variant must look like 'B/16', got {name!r}")
    try:
        size = transformer_size(match.group(1))
    except ValueError:
        raise ValueError(f"unknown ViT variant {name!r}") from None
    return dict(size, patch_size=int(match.group(2)))


class ViT(nn.Module):
    """Pre-LN ViT; ``__call__`` returns (pooled [B, width], aux).

    Attributes:
      width, depth, mlp_dim, num_heads: transformer size.
      patch_size: side of the square patches.
      posemb_grid: (gh, gw) grid of the learned PE (e.g. (14, 14) for 224 / 16).
      pool_type: "gap" (mean of the last layer's patch tokens), "tok" (CLS token, which gets its
        own learned embedding; the PE covers the patch grid only) or "map" (attention pooling).
      dropout: dropout rate after the PE and inside blocks.
      dtype: compute dtype; parameters are always float32.
      remat_policy: "none", "full" (recompute whole blocks) or "dots" (save matmuls without
        batch dims).
      cpe_up_size: side of the upsampled PE grid that CPE crops from.
      window_size: attention window (in patches) of the blocks not listed in ``global_blocks``;
        0 = global attention everywhere (ViTDet-style backbones set both).
      global_blocks: indices of blocks that keep global attention when ``window_size > 0``.
      pre_norm: LayerNorm on the embedded tokens (PE and CLS added) before the first block, as
        CLIP's ``ln_pre`` (timm ``pre_norm=True``); off by default. Lets CLIP-family image towers
        be imported exactly.
      activation: MLP activation, "gelu_tanh" (default), "gelu" (exact; timm / open_clip) or
        "quick_gelu" (OpenAI CLIP).
      norm_eps: LayerNorm epsilon (1e-6; torch-built models such as open_clip use 1e-5).
    """

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    posemb_grid: tuple[int, int] = (14, 14)
    pool_type: str = "gap"
    dropout: float = 0.0
    dtype: Any = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    cpe_up_size: int = 64
    window_size: int = 0
    global_blocks: tuple[int, ...] = ()
    pre_norm: bool = False
    activation: str = "gelu_tanh"
    norm_eps: float = DEFAULT_NORM_EPS
    attention: str = "auto"  # the attention kernel: see rovit_jax.models.attention

    def _validate(self) -> None:
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {self.pool_type!r}")
        check_remat_policy(self.remat_policy)
        if len(self.posemb_grid) != 2 or min(self.posemb_grid) < 1:
            raise ValueError(f"posemb_grid must be (gh, gw) positive, got {self.posemb_grid!r}")
        if self.window_size < 0:
            raise ValueError(f"window_size must be >= 0, got {self.window_size!r}")
        if self.window_size > 0 and self.pool_type == "tok":
            raise ValueError(
                "window_size > 0 needs a pure patch grid; pool_type='tok' adds a CLS token"
            )
        if any(not 0 <= i < self.depth for i in self.global_blocks):
            raise ValueError(
                f"global_blocks must index blocks in [0, {self.depth}), got {self.global_blocks!r}"
            )

    @nn.compact
    def __call__(
        self, images: jax.Array, *, crop_boxes: jax.Array | None = None, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Encodes images.

        Args:
          images: [B, H, W, 3]; H and W multiples of patch_size.
          crop_boxes: optional [B, 4] normalised (y0, x0, y1, x1): use the Cropped Positional
            Embedding of each box instead of the whole PE (pretraining only; the patch grid must
            equal posemb_grid).
          train: enables dropout.

        Returns:
          (pooled [B, width], aux) with aux["patch_grid"] [B, h, w, width] (last layer after
          encoder_norm), aux["pre_logits"] = pooled, aux["block_{i}"] [B, N, width].
        """
        self._validate()
        if images.ndim != 4:
            raise ValueError(f"images must be [B, H, W, C], got shape {tuple(images.shape)}")
        b, img_h, img_w, _ = images.shape
        p = self.patch_size
        if img_h % p or img_w % p:
            raise ValueError(f"image size {(img_h, img_w)} is not a multiple of patch_size={p}")
        aux = {}
        x = nn.Conv(
            self.width,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=named(nn.initializers.lecun_normal(), None, None, None, EMBED),
            name="embedding",
        )(images.astype(self.dtype))
        gh, gw = x.shape[1:3]
        aux["stem"] = x

        pe = self.param(
            "pos_embedding",
            named(nn.initializers.normal(stddev=self.width**-0.5), None, None, EMBED),
            (*self.posemb_grid, self.width),
            jnp.float32,
        )
        if crop_boxes is not None:
            if (gh, gw) != tuple(self.posemb_grid):
                raise ValueError(
                    f"crop_boxes need the patch grid {(gh, gw)} to equal "
                    f"posemb_grid={tuple(self.posemb_grid)}"
                )
            if crop_boxes.shape != (b, 4):
                raise ValueError(f"crop_boxes must be [{b}, 4], got {tuple(crop_boxes.shape)}")
            x = x + crop_pos_embed(pe, crop_boxes, up_size=self.cpe_up_size).astype(self.dtype)
        else:
            x = x + resize_pos_embed(pe, (gh, gw)).astype(self.dtype)[None]
        x = x.reshape(b, gh * gw, self.width)

        if self.pool_type == "tok":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), jnp.float32)
            cls_pe = self.param(
                "cls_pos_embedding",
                nn.initializers.normal(stddev=self.width**-0.5),
                (1, 1, self.width),
                jnp.float32,
            )
            x = jnp.concatenate([jnp.tile((cls + cls_pe).astype(self.dtype), (b, 1, 1)), x], axis=1)
        x = nn.Dropout(rate=self.dropout)(x, not train)
        if self.pre_norm:
            x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="pre_norm")(x)

        window_sizes = ()
        if self.window_size > 0:
            window_sizes = tuple(
                0 if i in self.global_blocks else self.window_size for i in range(self.depth)
            )
        x, enc_aux = Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            dtype=self.dtype,
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            window_sizes=window_sizes,
            grid_hw=(gh, gw),
            activation=self.activation,
            norm_eps=self.norm_eps,
            attention=self.attention,
            name="Transformer",
        )(x, not train)
        aux.update(enc_aux)

        patches = x[:, 1:] if self.pool_type == "tok" else x
        aux["patch_grid"] = patches.reshape(b, gh, gw, self.width)
        if self.pool_type == "gap":
            pooled = jnp.mean(patches, axis=1)
        elif self.pool_type == "tok":
            pooled = x[:, 0]
        else:
            pooled = MAPHead(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dtype=self.dtype,
                activation=self.activation,
                norm_eps=self.norm_eps,
                attention=self.attention,
                name="MAPHead_0",
            )(x)
        aux["pre_logits"] = pooled
        return pooled, aux
