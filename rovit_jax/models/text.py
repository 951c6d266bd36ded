"""Text transformer tower: token + learned position embeddings, pre-LN encoder (optionally causal).

Padding convention (``mask_padding=True``, the default): a sequence's length is the number of
tokens before its first ``pad_id``; everything from the first pad on is ignored (masked as
attention keys and excluded from pooling), whatever ids it holds. Towers imported from SigLIP
or CLIP set ``mask_padding=False`` (see the attribute).

Parameters::

  embedding/embedding     [vocab_size, width]
  pos_embedding           [max_len, width]
  Transformer/...         see rovit_jax.models.layers
  MAPHead_0/...           only for pool_type="map"
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
from rovit_jax.models.logical_axes import EMBED, VOCAB, named

__all__ = ["TextTransformer", "text_variant", "TEXT_POOL_TYPES"]

TEXT_POOL_TYPES = ("mean", "last", "first", "eos", "map")


def text_variant(name: str) -> dict[str, int]:
    """Parses a size name ("B", "L", "mu", ...; a ViT-style "/P" suffix is ignored).

    Returns:
      {width, depth, mlp_dim, num_heads}.
    """
    match = re.fullmatch(r"([A-Za-z]+)(/[0-9]+)?", name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"text variant must look like 'B', got {name!r}")
    try:
        return transformer_size(match.group(1))
    except ValueError:
        raise ValueError(f"unknown text variant {name!r}") from None


class TextTransformer(nn.Module):
    """Text encoder; ``__call__`` returns (pooled [B, width], aux).

    Attributes:
      vocab_size, max_len: token vocabulary and longest sequence.
      width, depth, mlp_dim, num_heads: transformer size.
      pool_type: "mean" (over valid tokens), "last" (last valid token), "first", "eos" (the
        token with the largest id: CLIP's end-of-text, the vocabulary's last id) or "map".
      pad_id: padding token id.
      mask_padding: ignore every position from the first `pad_id` on (as attention keys and
        in pooling). False: every position is valid, as in SigLIP's tower (which attends to
        its padding and pools the last position) and CLIP's (causal, so padding after the
        end-of-text token changes nothing it pools).
      dropout: dropout rate inside blocks.
      dtype: compute dtype; parameters are always float32.
      remat_policy: "none", "full" or "dots".
      causal: autoregressive attention (token i attends to tokens <= i), as CLIP's text tower;
        off by default (bidirectional). With ``pool_type="last"`` this is CLIP's EOT pooling
        when the EOT token is the last one before the padding.
    """

    vocab_size: int
    max_len: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    pool_type: str = "mean"
    pad_id: int = 0
    mask_padding: bool = True
    dropout: float = 0.0
    dtype: Any = jnp.float32
    remat_policy: str = "none"
    scan_layers: bool = False
    causal: bool = False
    activation: str = "gelu_tanh"  # see rovit_jax.models.layers.ACTIVATIONS
    norm_eps: float = DEFAULT_NORM_EPS
    attention: str = "auto"  # the attention kernel: see rovit_jax.models.attention

    @nn.compact
    def __call__(
        self, tokens: jax.Array, *, train: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Encodes token ids.

        Args:
          tokens: [B, L] int ids, L <= max_len, padded with pad_id on the right.
          train: enables dropout.

        Returns:
          (pooled [B, width], aux) with aux["tokens"] [B, L, width] (after the final LayerNorm),
          aux["valid"] [B, L] bool, aux["pre_logits"] = pooled, aux["block_{i}"].
        """
        if self.pool_type not in TEXT_POOL_TYPES:
            raise ValueError(f"pool_type must be one of {TEXT_POOL_TYPES}, got {self.pool_type!r}")
        check_remat_policy(self.remat_policy)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"tokens length {length} exceeds max_len={self.max_len}")

        if self.mask_padding:
            # Cumulative product: every position from the first pad on is invalid.
            valid = jnp.cumprod((tokens != self.pad_id).astype(jnp.int32), axis=1).astype(bool)
        else:
            valid = jnp.ones(tokens.shape, bool)
        x = nn.Embed(
            self.vocab_size,
            self.width,
            param_dtype=jnp.float32,
            embedding_init=named(nn.initializers.normal(stddev=self.width**-0.5), VOCAB, EMBED),
            name="embedding",
        )(tokens)
        pe = self.param(
            "pos_embedding",
            named(nn.initializers.normal(stddev=self.width**-0.5), None, EMBED),
            (self.max_len, self.width),
            jnp.float32,
        )
        x = (x + pe[None, :length]).astype(self.dtype)
        x = nn.Dropout(rate=self.dropout)(x, not train)

        mask = valid[:, None, None, :]  # [B, 1, 1, L]: keys from the first pad on are ignored
        if self.causal:
            mask = mask & jnp.tril(jnp.ones((length, length), bool))[None, None]
        x, aux = Encoder(
            depth=self.depth,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            dropout=self.dropout,
            dtype=self.dtype,
            remat_policy=self.remat_policy,
            scan_layers=self.scan_layers,
            activation=self.activation,
            norm_eps=self.norm_eps,
            attention=self.attention,
            name="Transformer",
        )(x, not train, mask)
        aux["tokens"] = x
        aux["valid"] = valid

        num_valid = jnp.sum(valid, axis=1)
        if self.pool_type == "mean":
            weights = valid.astype(jnp.float32) / jnp.maximum(num_valid, 1)[:, None]
            pooled = jnp.einsum("bl,bld->bd", weights, x.astype(jnp.float32)).astype(x.dtype)
        elif self.pool_type == "last":
            last = jnp.maximum(num_valid - 1, 0)
            pooled = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        elif self.pool_type == "first":
            pooled = x[:, 0]
        elif self.pool_type == "eos":
            eos = jnp.argmax(tokens, axis=1)  # the first position holding the largest id
            pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        else:
            pooled = MAPHead(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim,
                dtype=self.dtype,
                activation=self.activation,
                norm_eps=self.norm_eps,
                attention=self.attention,
                name="MAPHead_0",
            )(x, valid)
        aux["pre_logits"] = pooled
        return pooled, aux
