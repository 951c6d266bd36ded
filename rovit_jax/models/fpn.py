"""ViTDet simple feature pyramid: multi-scale maps from the single stride-P ViT map."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rovit_jax.models.detection_heads import Upsample2x

__all__ = ["SimpleFeaturePyramid"]


class SimpleFeaturePyramid(nn.Module):
    """Builds levels `min_level..max_level` (stride 2**l) from a stride-`patch_size` map.

    Finer levels come from stride-2 transposed convolutions (with LayerNorm + GELU between them),
    coarser ones from 2x2 max-pooling, as in ViTDet; every level then gets a 1x1 and a 3x3
    convolution to `channels`, each followed by LayerNorm.

    Attributes:
      patch_size: stride of the input map (a power of two).
      min_level, max_level: pyramid levels to produce.
      channels: output channels (256 in ViTDet).
    """

    patch_size: int
    min_level: int = 2
    max_level: int = 5
    channels: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[int, jax.Array]:
        """x: [B, h, w, D] -> {level: [B, h * P / 2**level, w * P / 2**level, channels]}."""
        base = int(round(math.log2(self.patch_size)))
        if 2**base != self.patch_size:
            raise ValueError(f"patch_size must be a power of two, got {self.patch_size}")
        if self.min_level > self.max_level:
            raise ValueError(f"min_level {self.min_level} > max_level {self.max_level}")
        conv = dict(dtype=self.dtype, param_dtype=jnp.float32)
        outputs = {}
        for level in range(self.min_level, self.max_level + 1):
            y = x
            steps = base - level
            if steps > 0:  # finer than the ViT map: upsample
                for i in range(steps):
                    # Channels halve per 2x step (ViTDet: D -> D/2 -> D/4 for P2 at stride 16).
                    y = Upsample2x(y.shape[-1] // 2, dtype=self.dtype, name=f"p{level}_up{i}")(y)
                    if i < steps - 1:
                        y = nn.gelu(nn.LayerNorm(name=f"p{level}_up{i}_norm", dtype=self.dtype)(y))
            elif steps < 0:  # coarser: max-pool
                for _ in range(-steps):
                    y = nn.max_pool(y, (2, 2), strides=(2, 2))
            y = nn.Conv(self.channels, (1, 1), use_bias=False, name=f"p{level}_lateral", **conv)(y)
            y = nn.LayerNorm(name=f"p{level}_lateral_norm", dtype=self.dtype)(y)
            y = nn.Conv(self.channels, (3, 3), use_bias=False, name=f"p{level}_output", **conv)(y)
            y = nn.LayerNorm(name=f"p{level}_output_norm", dtype=self.dtype)(y)
            outputs[level] = y
        return outputs
