"""The pretrained towers as open-vocabulary detection uses them: the detector backbone's initial
values, and the frozen image tower's region embeddings for VLM score fusion."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from rovit_jax.models.layers import unscan_params
from rovit_jax.models.two_tower import TwoTower
from rovit_jax.models.vit import ViT
from rovit_jax.ops.roi_align import batched_roi_align

# Pooling parameters of other pooling types: the region features come from the last patch grid.
_POOLING_PARAMS = ("cls", "cls_pos_embedding", "MAPHead_0")


def load_pretrained_backbone(backbone: dict[str, Any], image_tower: dict[str, Any]) -> dict:
    """The detector backbone's parameters `backbone` with every leaf taken from the pretrained
    image tower `image_tower` (`params["img"]` of a pretraining run; scanned blocks unstacked).

    Window attention adds no parameters, so every backbone leaf has a pretrained value; pooling
    parameters the backbone does not have are ignored. Raises ValueError on a missing parameter
    or a shape mismatch.
    """
    pretrained = unscan_params(image_tower)
    missing = set(backbone) - set(pretrained)
    if missing:
        raise ValueError(f"pretrained image tower lacks parameters {sorted(missing)}")
    loaded = {k: jax.tree.map(jnp.asarray, pretrained[k]) for k in backbone}
    if jax.tree.map(jnp.shape, loaded) != jax.tree.map(jnp.shape, backbone):
        raise ValueError("pretrained image tower shapes differ from the detector backbone's")
    return loaded


def vlm_global_blocks(blocks: Sequence[int], depth: int) -> tuple[int, ...]:
    """`infer.vlm_global_blocks` (negative indices count from the end) as sorted block indices of
    a tower of `depth` blocks; an index outside the tower is an error naming the key."""
    out = set()
    for b in blocks:
        if not -depth <= int(b) < depth:
            raise ValueError(
                f"config key `infer.vlm_global_blocks` = {tuple(blocks)!r}: block {b} is outside "
                f"the pretrained image tower's {depth} blocks"
            )
        out.add(int(b) % depth)
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class FrozenRegionEmbedder:
    """Region embeddings of the frozen pretrained image tower (RoIAlign on its last map, mean,
    projection), the VLM side of score fusion.

    Attributes:
      two_tower: the pretrained model.
      backbone: the image tower re-run with window attention (see `build`), or None to run the
        tower as pretrained (global attention in every block).
      pool_size: RoIAlign output size.
    """

    two_tower: TwoTower
    backbone: ViT | None
    pool_size: int

    @classmethod
    def build(
        cls,
        two_tower: TwoTower,
        *,
        window_attention: bool,
        window_size: int,
        global_blocks: Sequence[int],
        pool_size: int,
    ) -> FrozenRegionEmbedder:
        """By default as the authors' frozen ViT (their "frozen" window-attention layouts, with
        the note that the frozen vision backbone performs better with window attention): window
        attention of `window_size` in every block but `global_blocks` (negative indices count
        from the end). A pool_type="tok" tower runs without its CLS token, as the detector's
        backbone does. `window_attention=False` keeps the tower as pretrained."""
        if not window_attention:
            return cls(two_tower, None, int(pool_size))
        image = dict(two_tower.image)
        image.update(
            pool_type="gap",
            scan_layers=False,
            window_size=int(window_size),
            global_blocks=vlm_global_blocks(global_blocks, int(image["depth"])),
        )
        return cls(two_tower, ViT(**{"dtype": two_tower.dtype, **image}), int(pool_size))

    def patch_grid(self, tower_params: dict[str, Any], images: jax.Array) -> jax.Array:
        """[B, S, S, 3] -> [B, h, w, D]: the image tower's last map (after encoder_norm, as
        pooled in pretraining)."""
        if self.backbone is None:
            (_, _), aux = self.two_tower.apply({"params": tower_params}, images, None)
            return aux["img/patch_grid"]
        img = unscan_params(tower_params["img"])
        img = {k: v for k, v in img.items() if k not in _POOLING_PARAMS}
        _, aux = self.backbone.apply({"params": img}, images)
        return aux["patch_grid"]

    def region_embeddings(
        self, tower_params: dict[str, Any], images: jax.Array, boxes: jax.Array
    ) -> jax.Array:
        """images [B, S, S, 3], boxes [B, P, 4] pixels -> [B, P, E] unit-norm embeddings."""
        grid = self.patch_grid(tower_params, images)
        stride = images.shape[1] / grid.shape[1]
        pooled = batched_roi_align(
            grid.astype(jnp.float32),
            boxes,
            output_size=self.pool_size,
            spatial_scale=1.0 / stride,
            sampling_ratio=2,
        ).mean(axis=(2, 3))
        head = tower_params.get("img_proj")  # none: SigLIP's features are the embedding
        emb = pooled if head is None else pooled @ head["kernel"] + head.get("bias", 0.0)
        return emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
