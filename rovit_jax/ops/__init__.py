"""Jittable fixed-shape array ops."""

from rovit_jax.ops.posemb import crop_pos_embed, resize_pos_embed, sample_crop_boxes

__all__ = ["crop_pos_embed", "resize_pos_embed", "sample_crop_boxes"]
