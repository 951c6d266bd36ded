"""Inference on trained runs: the `Predictor` (detection from free-text queries, embeddings,
retrieval)."""

from rovit_jax.inference.images import ImageError, load_image
from rovit_jax.inference.predictor import Detections, Predictor
from rovit_jax.runs import CheckpointKindError

__all__ = ["CheckpointKindError", "Detections", "ImageError", "Predictor", "load_image"]
