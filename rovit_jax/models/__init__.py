"""Flax linen models: ViT image tower, text transformer and the two-tower contrastive model."""

from rovit_jax.models.text import TextTransformer, text_variant
from rovit_jax.models.two_tower import TwoTower, l2_normalize
from rovit_jax.models.vit import ViT, vit_variant

__all__ = ["TextTransformer", "TwoTower", "ViT", "l2_normalize", "text_variant", "vit_variant"]
