"""Both towers of a run back to open_clip's layout: a state dict `open_clip.model.CLIP(**cfg)`
loads with `strict=True`, and that `cfg`.

Only what open_clip's CLIP can express is exported, and anything else is refused naming the
setting: a class-token image tower (`model.image.pool_type="tok"`), a text tower that masks no
padding and pools the end-of-text token, the last or the first position, projections without
biases, one MLP activation for both towers. The patch embedding's bias (open_clip's `conv1` has
none) is added to every patch token, as the position embedding is, so it is folded exactly into
the patch rows of `visual.positional_embedding`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rovit_jax.interop.torch_layout import OPEN_CLIP_BLOCK, block_to_torch, layer_norm_to_torch
from rovit_jax.interop.towers import image_tower, resolve_model, text_tower
from rovit_jax.models.layers import unscan_params

__all__ = ["open_clip_model_config", "open_clip_state_dict"]

_TEXT_POOLS = {"eos": "argmax", "last": "last", "first": "first"}


def _tower_kwargs(activation: str, eps: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"norm_kwargs": {"eps": float(eps)}}
    if activation == "gelu_tanh":
        kwargs["act_kwargs"] = {"approximate": "tanh"}
    return kwargs


def open_clip_model_config(config: Any) -> dict[str, Any]:
    """The `open_clip.model.CLIP` keyword arguments of a run's model (a pretraining config or a
    TwoTower); ValueError naming the setting open_clip cannot express."""
    model = resolve_model(config)
    vit, txt = image_tower(model), text_tower(model)
    problems = []
    if vit.pool_type != "tok":
        problems.append(f"model.image.pool_type={vit.pool_type!r} (open_clip ViTs pool 'tok')")
    if txt.mask_padding:
        problems.append("model.text.mask_padding=True (open_clip masks no padding)")
    if txt.pool_type not in _TEXT_POOLS:
        problems.append(f"model.text.pool_type={txt.pool_type!r} (open_clip: eos, last, first)")
    if not model.image_head or model.head_bias:
        problems.append(
            "model.image_head=False or model.head_bias=True (open_clip projects "
            "both towers without biases)"
        )
    activations = {vit.activation, txt.activation}
    if "quick_gelu" in activations and len(activations) > 1:
        problems.append(
            f"the towers' activations differ ({sorted(activations)}) while one is "
            "quick_gelu (a single flag in open_clip)"
        )
    if problems:
        raise ValueError("open_clip cannot express this model: " + "; ".join(problems))
    grid = vit.posemb_grid
    if grid[0] != grid[1]:
        raise ValueError(f"open_clip needs a square patch grid, got {tuple(grid)}")
    return {
        "embed_dim": int(model.embed_dim),
        "quick_gelu": vit.activation == "quick_gelu",
        "vision_cfg": dict(
            layers=int(vit.depth),
            width=int(vit.width),
            head_width=int(vit.width) // int(vit.num_heads),
            mlp_ratio=int(vit.mlp_dim) / int(vit.width),
            patch_size=int(vit.patch_size),
            image_size=int(grid[0]) * int(vit.patch_size),
            no_ln_pre=not vit.pre_norm,
            **_tower_kwargs(vit.activation, vit.norm_eps),
        ),
        "text_cfg": dict(
            context_length=int(txt.max_len),
            vocab_size=int(txt.vocab_size),
            width=int(txt.width),
            heads=int(txt.num_heads),
            layers=int(txt.depth),
            mlp_ratio=int(txt.mlp_dim) / int(txt.width),
            no_causal_mask=not txt.causal,
            pool_type=_TEXT_POOLS[txt.pool_type],
            **_tower_kwargs(txt.activation, txt.norm_eps),
        ),
    }


def _blocks(tree: dict[str, Any], depth: int, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for i in range(depth):
        for name, value in block_to_torch(tree[f"encoderblock_{i}"], OPEN_CLIP_BLOCK).items():
            out[f"{prefix}{i}.{name}"] = value
    return out


def open_clip_state_dict(params: dict[str, Any], config: Any) -> dict[str, np.ndarray]:
    """open_clip CLIP tensors of a two-tower parameter tree (scanned blocks are unstacked)."""
    open_clip_model_config(config)  # refuses what open_clip cannot express
    vit, txt = image_tower(config), text_tower(config)
    img, text = unscan_params(params["img"]), unscan_params(params["txt"])
    d = int(vit.width)
    kernel = np.asarray(img["embedding"]["kernel"])  # [P, P, 3, D]
    patch_bias = np.asarray(img["embedding"]["bias"]).reshape(1, d)
    grid = np.asarray(img["pos_embedding"]).reshape(-1, d) + patch_bias
    cls_pe = np.asarray(img["cls_pos_embedding"]).reshape(1, d)
    sd: dict[str, np.ndarray] = {
        "visual.conv1.weight": kernel.transpose(3, 2, 0, 1),
        "visual.class_embedding": np.asarray(img["cls"]).reshape(d),
        "visual.positional_embedding": np.concatenate([cls_pe, grid]),
        "visual.proj": np.asarray(params["img_proj"]["kernel"]),
        "token_embedding.weight": np.asarray(text["embedding"]["embedding"]),
        "positional_embedding": np.asarray(text["pos_embedding"]),
        "text_projection": np.asarray(params["txt_proj"]["kernel"]),
        "logit_scale": np.asarray(params["t"]).reshape(()),
    }
    if vit.pre_norm:
        sd.update(
            {f"visual.ln_pre.{k}": v for k, v in layer_norm_to_torch(img["pre_norm"]).items()}
        )
    sd.update(_blocks(img["Transformer"], int(vit.depth), "visual.transformer.resblocks."))
    norm = layer_norm_to_torch(img["Transformer"]["encoder_norm"])
    sd.update({f"visual.ln_post.{k}": v for k, v in norm.items()})
    sd.update(_blocks(text["Transformer"], int(txt.depth), "transformer.resblocks."))
    norm = layer_norm_to_torch(text["Transformer"]["encoder_norm"])
    sd.update({f"ln_final.{k}": v for k, v in norm.items()})
    if "b" in params:
        sd["logit_bias"] = np.asarray(params["b"]).reshape(())
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}
