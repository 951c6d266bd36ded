"""Fusion of detector scores with frozen-backbone VLM scores (F-VLM / RO-ViT inference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["fuse_scores"]


def fuse_scores(
    det_probs: jax.Array,
    vlm_probs: jax.Array | None,
    objectness: jax.Array,
    *,
    is_novel: jax.Array,
    w_base: float = 0.35,
    w_novel: float = 0.65,
    objectness_exponent: float = 3.0,
) -> jax.Array:
    """s = p_det^(1 - w) * p_vlm^w * objectness^delta, with w per class (base or novel).

    Computed in log space so tiny probabilities neither underflow nor produce NaN gradients.

    Args:
      det_probs: [..., K] detector class probabilities (background column removed).
      vlm_probs: [..., K] VLM probabilities, or None to skip fusion (w = 0).
      objectness: [...] proposal objectness in [0, 1].
      is_novel: [K] bool, True for classes not seen in detection training.
      w_base, w_novel: VLM weights (paper: 0.35 and 0.65).
      objectness_exponent: delta (paper: 3.0).

    Returns:
      [..., K] fused scores in [0, 1].
    """
    tiny = 1e-12
    log_s = jnp.log(jnp.maximum(det_probs, tiny))
    if vlm_probs is not None:
        w = jnp.where(is_novel, w_novel, w_base).astype(jnp.float32)
        log_s = (1.0 - w) * log_s + w * jnp.log(jnp.maximum(vlm_probs, tiny))
    log_s = log_s + objectness_exponent * jnp.log(jnp.maximum(objectness, tiny))[..., None]
    return jnp.exp(log_s)
