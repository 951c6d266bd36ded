"""Detection heads: RPN, box head with a text-space class branch, class-agnostic mask head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["RPNHead", "BoxHead", "MaskHead", "Upsample2x"]

_CONV = dict(param_dtype=jnp.float32)


class Upsample2x(nn.Module):
    """A 2x2, stride-2 transposed convolution written as a Dense + depth-to-space.

    The two are the same function (stride-2 2x2 kernels never overlap), but XLA's CPU backward
    of `ConvTranspose` is ~50x slower than its forward; this form differentiates as a matmul.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, 2H, 2W, features]."""
        b, h, w, _ = x.shape
        y = nn.Dense(4 * self.features, name="kernel2x2", dtype=self.dtype, **_CONV)(x)
        y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(b, 2 * h, 2 * w, self.features)


class RPNHead(nn.Module):
    """Shared over pyramid levels: conv3x3 -> (objectness [A], box [A * 4]) per location.

    In `binary` mode the objectness is a logit of "object vs background" and the box output are
    anchor deltas; in `centerness` mode the objectness is regressed to the localization quality
    (centerness) and the box output are (l, t, r, b) distances in units of the anchor's size.
    """

    num_anchors: int
    channels: int = 256
    # Initial value of the box outputs: 0.5 with the linear LTRB coding makes an untrained RPN
    # propose its anchors (a zero output would be a point box, which proposes nothing).
    box_bias_init: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: dict[int, jax.Array]) -> dict[int, tuple[jax.Array, jax.Array]]:
        """{level: [B, H, W, C]} -> {level: (objectness [B, H, W, A], box [B, H, W, A, 4])}."""
        conv = nn.Conv(self.channels, (3, 3), name="conv", dtype=self.dtype, **_CONV)
        obj = nn.Conv(
            self.num_anchors,
            (1, 1),
            name="objectness",
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.01),
            **_CONV,
        )
        box = nn.Conv(
            self.num_anchors * 4,
            (1, 1),
            name="box",
            dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.01),
            bias_init=nn.initializers.constant(self.box_bias_init),
            **_CONV,
        )
        out = {}
        for level, x in features.items():
            h = nn.relu(conv(x))
            b, hh, ww, _ = h.shape
            out[level] = (
                obj(h).astype(jnp.float32),
                box(h).astype(jnp.float32).reshape(b, hh, ww, self.num_anchors, 4),
            )
        return out


class BoxHead(nn.Module):
    """RoI features -> (class-agnostic box deltas [.., 4], region embedding [.., E] unit-norm).

    4 convs + 1 FC with LayerNorm (the paper's head); the class branch projects into the text
    embedding space so that any vocabulary can be scored by cosine similarity.
    """

    embed_dim: int
    conv_dim: int = 256
    num_convs: int = 4
    fc_dim: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features: jax.Array) -> tuple[jax.Array, jax.Array]:
        """roi_features: [B, R, S, S, C] -> (deltas [B, R, 4], embeddings [B, R, E] float32)."""
        b, r = roi_features.shape[:2]
        x = roi_features.reshape((b * r,) + roi_features.shape[2:]).astype(self.dtype)
        for i in range(self.num_convs):
            x = nn.Conv(
                self.conv_dim, (3, 3), use_bias=False, name=f"conv{i}", dtype=self.dtype, **_CONV
            )(x)
            x = nn.relu(nn.LayerNorm(name=f"conv{i}_norm", dtype=self.dtype)(x))
        x = x.reshape(b * r, -1)
        x = nn.Dense(self.fc_dim, name="fc", dtype=self.dtype, **_CONV)(x)
        x = nn.relu(nn.LayerNorm(name="fc_norm", dtype=self.dtype)(x))
        deltas = nn.Dense(
            4, name="box", dtype=self.dtype, kernel_init=nn.initializers.normal(0.001), **_CONV
        )(x)
        emb = nn.Dense(self.embed_dim, name="embed", dtype=self.dtype, **_CONV)(x)
        emb = emb.astype(jnp.float32)
        emb = emb * jax.lax.rsqrt(jnp.maximum(jnp.sum(emb * emb, -1, keepdims=True), 1e-12))
        return deltas.astype(jnp.float32).reshape(b, r, 4), emb.reshape(b, r, -1)


class MaskHead(nn.Module):
    """Class-agnostic mask head: 4 convs, a 2x transposed conv, a 1x1 conv to one logit map."""

    conv_dim: int = 256
    num_convs: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, roi_features: jax.Array) -> jax.Array:
        """roi_features: [B, R, S, S, C] -> mask logits [B, R, 2S, 2S] float32."""
        b, r = roi_features.shape[:2]
        x = roi_features.reshape((b * r,) + roi_features.shape[2:]).astype(self.dtype)
        for i in range(self.num_convs):
            x = nn.Conv(self.conv_dim, (3, 3), name=f"conv{i}", dtype=self.dtype, **_CONV)(x)
            x = nn.relu(x)
        x = nn.relu(Upsample2x(self.conv_dim, dtype=self.dtype, name="deconv")(x))
        x = nn.Conv(1, (1, 1), name="logits", dtype=self.dtype, **_CONV)(x)
        return x[..., 0].astype(jnp.float32).reshape((b, r) + x.shape[1:3])
