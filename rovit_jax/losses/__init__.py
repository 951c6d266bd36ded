"""Training losses."""

from rovit_jax.losses.contrastive import (
    CONTRASTIVE_LOSS_KINDS,
    chunked_contrastive_loss,
    contrastive_loss_fn,
    focal_contrastive_loss,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)

__all__ = [
    "CONTRASTIVE_LOSS_KINDS",
    "chunked_contrastive_loss",
    "contrastive_loss_fn",
    "focal_contrastive_loss",
    "sigmoid_contrastive_loss",
    "softmax_contrastive_loss",
]
