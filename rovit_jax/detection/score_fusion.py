"""Fusion of detector scores with frozen-backbone VLM scores (F-VLM / RO-ViT inference).

Two formulas (config `infer.fusion`):

* "authors" (`fuse_scores_with_background`, the default), as the authors' released code does it
  (google-research fvlm/modeling/task_heads.py, `ClipFasterRCNNHead.ensemble_class_outputs` and
  the objectness product after it): both scorers' softmaxes run over [background, classes]; the
  geometric ensemble p_det^(1 - w) * p_vlm^w is taken on every column; the background column is
  then replaced by the detector's background probability and each RoI's row renormalised to sum
  to 1; finally the class columns are multiplied by objectness^delta.
* "classes_only" (`fuse_scores`): the VLM softmax over the classes only, the ensemble on the
  class columns, no renormalisation, then objectness^delta.

Without VLM scores both reduce to the detector's class probabilities times objectness^delta.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["FUSION_MODES", "fuse_scores", "fuse_scores_with_background"]

FUSION_MODES = ("authors", "classes_only")


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


def fuse_scores_with_background(
    det_probs: jax.Array,
    vlm_probs: jax.Array | None,
    objectness: jax.Array,
    *,
    is_novel: jax.Array,
    valid: jax.Array | None = None,
    w_base: float = 0.35,
    w_novel: float = 0.65,
    objectness_exponent: float = 3.0,
) -> jax.Array:
    """The authors' fusion: ensemble over [background, classes], detector background, renormalise.

    e_k = p_det_k^(1 - w_k) * p_vlm_k^(w_k) for every column k (background included), then
    e_0 := p_det_0, e /= sum_k e_k (per RoI), and the classes' scores are e_{1:} * objectness^delta.

    Args:
      det_probs: [..., 1 + K] detector softmax; column 0 is background.
      vlm_probs: [..., 1 + K] VLM softmax over the same [background, classes] rows, or None
        (detector only: p_det_{1:} * objectness^delta).
      objectness: [...] proposal objectness in [0, 1].
      is_novel: [K] bool, True for classes not seen in detection training.
      valid: optional [K] bool; False columns (vocabulary padding) get exactly 0 and no share of
        the renormalisation.
      w_base, w_novel: VLM weights (0.35 and 0.65 in the authors' configs).
      objectness_exponent: delta (3.0 in the authors' DITO config).

    Returns:
      [..., K] fused class scores (background dropped).
    """
    tiny = 1e-12
    if vlm_probs is None:
        scores = det_probs[..., 1:]
    else:
        w_cls = jnp.where(is_novel, w_novel, w_base).astype(jnp.float32)
        w = jnp.concatenate([jnp.zeros((1,), jnp.float32), w_cls])  # column 0 is replaced below
        log_e = (1.0 - w) * jnp.log(jnp.maximum(det_probs, tiny)) + w * jnp.log(
            jnp.maximum(vlm_probs, tiny)
        )
        e = jnp.exp(log_e)
        if valid is not None:
            e = jnp.where(jnp.concatenate([jnp.ones((1,), bool), valid]), e, 0.0)
        e = jnp.concatenate([det_probs[..., :1], e[..., 1:]], axis=-1)
        e = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), tiny)
        scores = e[..., 1:]
    if valid is not None:
        scores = jnp.where(valid, scores, 0.0)
    return scores * jnp.power(jnp.clip(objectness, 0.0, 1.0), objectness_exponent)[..., None]
