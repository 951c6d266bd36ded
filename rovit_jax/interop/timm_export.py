"""Export of trained towers to safetensors: the image tower loadable by timm, the text tower in a
documented layout.

Image tower (`export_image_tower_safetensors`): timm ``VisionTransformer`` names, loadable with
``load_state_dict(strict=True)`` into ``timm.create_model("vit_base_patch16_224",
pretrained=False, **timm_model_kwargs(config))`` (every architecture argument is overridden, so
the name only picks the class) once the ``rovit.*`` tensors are removed::

  patch_embed.proj.weight   [D, 3, P, P]   (bias [D]; absent with pre_norm, folded into pos_embed)
  pos_embed                 [1, N, D] over the N = gh * gw patches (gap/map: class_token=False);
                            [1, 1 + N, D] with the class token's embedding first (tok)
  cls_token                 [1, 1, D]      pool_type="tok" only
  norm_pre.{weight,bias}    [D]            pre_norm models only
  blocks.{i}.norm1, .attn.qkv [3D, D] (q, k, v rows), .attn.proj, .norm2, .mlp.fc1, .mlp.fc2
  norm.{weight,bias}        [D]            final LayerNorm, applied to every token BEFORE pooling
  attn_pool.*               timm AttentionPoolLatent, pool_type="map" only
  rovit.img_proj.weight     [E, D]         projection to the shared image-text space
                                           (embedding = normalize(pooled @ W.T)); not a timm tensor

The model's forward maps NCHW images (the same pixel values the JAX model gets as NHWC) to the
pooled [B, D] features (`num_classes=0`). Matching our forward needs: ``fc_norm=False`` (timm
otherwise moves the final norm after average pooling), ``act_layer`` = the tower's activation
(``"gelu_tanh"`` by default: flax's ``nn.gelu`` is the tanh approximation, timm's default is exact
GELU), ``qkv_bias=True`` and timm's default LayerNorm (eps 1e-6, as flax's; a tower with another
``norm_eps`` is refused, since timm's kwargs cannot express it).

Text tower (`export_text_tower_safetensors`), this project's layout in PyTorch conventions
(Linear weights [out, in]); tokens are right-padded with ``pad_id``, everything from the first
pad on is ignored (masked as attention keys, excluded from pooling)::

  token_embedding.weight    [V, D]
  pos_embed                 [L, D]         added to the first `length` tokens
  blocks.{i}.*              as the image tower (qkv rows q, k, v; heads contiguous)
  norm.{weight,bias}        [D]            final LayerNorm on every token, before pooling
  attn_pool.*               pool_type="map" only (timm AttentionPoolLatent names)
  proj.weight               [E, D]         projection to the shared space
  logit_scale               []             t: the logit scale is exp(t)
  logit_bias                []             b (only when the model has a bias)

Both files carry their settings as JSON strings in the safetensors metadata (``format``,
``timm_kwargs`` / ``text_tower``, ``extra_tensors``); `read_export` parses them.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from rovit_jax import paths
from rovit_jax.interop.torch_layout import (
    TIMM_BLOCK,
    block_to_torch,
    dense_to_torch,
    layer_norm_to_torch,
    map_head_to_timm,
)
from rovit_jax.interop.towers import image_tower, text_tower, unscan_params

__all__ = [
    "IMAGE_FORMAT",
    "TEXT_FORMAT",
    "EXTRA_PREFIX",
    "timm_model_kwargs",
    "export_image_tower_safetensors",
    "export_text_tower_safetensors",
    "read_export",
]

IMAGE_FORMAT = "rovit_jax.timm_vit.v1"
TEXT_FORMAT = "rovit_jax.text_tower.v1"
EXTRA_PREFIX = "rovit."
TIMM_POOL = {"gap": "avg", "tok": "token", "map": "map"}
TIMM_LAYER_NORM_EPS = 1e-6  # timm VisionTransformer's LayerNorm (= flax's default)


def timm_model_kwargs(config: Any) -> dict[str, Any]:
    """Keyword arguments of timm's ``VisionTransformer`` that reproduce the image tower.

    Args:
      config: a pretraining config, a TwoTower or a ViT.

    Returns:
      JSON-serialisable kwargs for ``timm.create_model(name, pretrained=False, **kwargs)``; the
      pooled output (``num_classes=0``) equals the ViT's pooled features.
    """
    vit = image_tower(config)
    if vit.window_size:
        raise ValueError(
            f"window attention (window_size={vit.window_size}) has no timm VisionTransformer "
            "equivalent; export the pretrained (global-attention) tower"
        )
    if vit.pool_type not in TIMM_POOL:
        raise ValueError(f"pool_type {vit.pool_type!r} has no timm equivalent")
    if not math.isclose(float(vit.norm_eps), TIMM_LAYER_NORM_EPS):
        raise ValueError(
            f"model.image.norm_eps={vit.norm_eps:g}: timm's VisionTransformer uses LayerNorm eps "
            f"{TIMM_LAYER_NORM_EPS:g}, which its kwargs cannot change"
        )
    mlp_ratio = vit.mlp_dim / vit.width
    if int(vit.width * mlp_ratio) != vit.mlp_dim:
        raise ValueError(
            f"mlp_dim={vit.mlp_dim} is not reproducible by timm as int(width * mlp_ratio) with "
            f"width={vit.width}"
        )
    gh, gw = (int(g) for g in vit.posemb_grid)
    p = int(vit.patch_size)
    return dict(
        img_size=gh * p if gh == gw else [gh * p, gw * p],
        patch_size=p,
        embed_dim=int(vit.width),
        depth=int(vit.depth),
        num_heads=int(vit.num_heads),
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        class_token=vit.pool_type == "tok",
        no_embed_class=False,
        global_pool=TIMM_POOL[vit.pool_type],
        fc_norm=False,
        pre_norm=bool(vit.pre_norm),
        final_norm=True,
        act_layer=vit.activation,  # timm knows "gelu", "gelu_tanh" and "quick_gelu"
        num_classes=0,
    )


def _unscanned(params: Any) -> Any:
    return unscan_params(dict(params))


def _encoder_to_torch(encoder: dict[str, Any], depth: int) -> dict[str, np.ndarray]:
    out = {}
    for i in range(depth):
        block = block_to_torch(encoder[f"encoderblock_{i}"], TIMM_BLOCK)
        out.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    out.update({f"norm.{k}": v for k, v in layer_norm_to_torch(encoder["encoder_norm"]).items()})
    return out


def _save(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    # np.array copies into a C-contiguous array and, unlike ascontiguousarray, keeps 0-d shapes.
    tensors = {k: np.array(v, dtype=np.float32, order="C") for k, v in tensors.items()}
    with paths.local_output(path) as local:  # safetensors writes local files only
        save_file(tensors, local, metadata=metadata)


def export_image_tower_safetensors(params_img: Any, config: Any, path: str) -> dict[str, Any]:
    """Writes the image tower as a timm ViT state dict (see the module docstring).

    Args:
      params_img: the image tower's parameters, or a two-tower parameter tree ({img, img_proj,
        ...}; its projection is then written too, as ``rovit.img_proj.weight``). Scanned trees
        (``Transformer/encoderblock`` with a leading depth axis) are accepted.
      config: a pretraining config, a TwoTower or a ViT describing the tower.
      path: output .safetensors file (local or a bucket URL).

    Returns:
      The timm kwargs (also stored in the file's metadata under ``timm_kwargs``).
    """
    vit = image_tower(config)
    kwargs = timm_model_kwargs(vit)
    params_img = _unscanned(params_img)
    proj = None
    if "img" in params_img:
        proj = params_img.get("img_proj")
        params_img = params_img["img"]
    d = int(vit.width)
    kernel = np.asarray(params_img["embedding"]["kernel"])  # [P, P, 3, D]
    bias = np.asarray(params_img["embedding"]["bias"])
    grid = np.asarray(params_img["pos_embedding"]).reshape(1, -1, d)
    tensors: dict[str, np.ndarray] = {"patch_embed.proj.weight": kernel.transpose(3, 2, 0, 1)}
    if vit.pre_norm:
        # timm's pre-norm ViTs have no patch bias. The bias is added to every patch token, as the
        # PE is, so it folds exactly into the patch rows of pos_embed.
        grid = grid + bias[None, None, :]
    else:
        tensors["patch_embed.proj.bias"] = bias
    if vit.pool_type == "tok":
        tensors["cls_token"] = np.asarray(params_img["cls"]).reshape(1, 1, d)
        cls_pe = np.asarray(params_img["cls_pos_embedding"]).reshape(1, 1, d)
        grid = np.concatenate([cls_pe, grid], axis=1)
    tensors["pos_embed"] = grid
    if vit.pre_norm:
        tensors.update(
            {f"norm_pre.{k}": v for k, v in layer_norm_to_torch(params_img["pre_norm"]).items()}
        )
    tensors.update(_encoder_to_torch(params_img["Transformer"], int(vit.depth)))
    if vit.pool_type == "map":
        head = map_head_to_timm(params_img["MAPHead_0"])
        tensors.update({f"attn_pool.{k}": v for k, v in head.items()})
    extras = {}
    if proj is not None:
        tensors[f"{EXTRA_PREFIX}img_proj.weight"] = dense_to_torch(proj)["weight"]
        extras[f"{EXTRA_PREFIX}img_proj.weight"] = (
            "[E, D] projection of the pooled features to the shared image-text space: "
            "embedding = l2_normalize(pooled @ W.T); not a timm tensor, remove before "
            "load_state_dict(strict=True)"
        )
    metadata = {
        "format": IMAGE_FORMAT,
        "timm_kwargs": json.dumps(kwargs),
        "timm_create_model": (
            'timm.create_model("vit_base_patch16_224", pretrained=False, **timm_kwargs)'
        ),
        "extra_tensors": json.dumps(extras),
        "input": "float32 images [B, 3, H, W]: the pixel values the rovit_jax model takes as "
        "[B, H, W, 3] (same normalisation)",
        "output": "pooled features [B, D] (forward with num_classes=0)",
        "rovit_image_tower": json.dumps(
            dict(
                width=d,
                depth=int(vit.depth),
                mlp_dim=int(vit.mlp_dim),
                num_heads=int(vit.num_heads),
                patch_size=int(vit.patch_size),
                posemb_grid=[int(g) for g in vit.posemb_grid],
                pool_type=vit.pool_type,
                pre_norm=bool(vit.pre_norm),
                layer_norm_eps=float(vit.norm_eps),
                activation=vit.activation,
            )
        ),
    }
    _save(tensors, path, metadata)
    return kwargs


def export_text_tower_safetensors(params: Any, config: Any, path: str) -> dict[str, Any]:
    """Writes the text tower in the layout of the module docstring.

    Args:
      params: a two-tower parameter tree ({txt, txt_proj, t, b?, ...}) or the text tower's own
        parameters (then no projection and logit scale are written).
      config: a pretraining config or a TwoTower.
      path: output .safetensors file (local or a bucket URL).

    Returns:
      The text tower settings (also stored in the file's metadata under ``text_tower``).
    """
    txt = text_tower(config)
    params = _unscanned(params)
    full = "txt" in params
    p = params["txt"] if full else params
    tensors = {
        "token_embedding.weight": np.asarray(p["embedding"]["embedding"]),
        "pos_embed": np.asarray(p["pos_embedding"]),
    }
    tensors.update(_encoder_to_torch(p["Transformer"], int(txt.depth)))
    if txt.pool_type == "map":
        head = map_head_to_timm(p["MAPHead_0"])
        tensors.update({f"attn_pool.{k}": v for k, v in head.items()})
    if full:
        tensors["proj.weight"] = dense_to_torch(params["txt_proj"])["weight"]
        tensors["logit_scale"] = np.asarray(params["t"], np.float32).reshape(())
        if "b" in params:
            tensors["logit_bias"] = np.asarray(params["b"], np.float32).reshape(())
    settings = dict(
        vocab_size=int(txt.vocab_size),
        max_len=int(txt.max_len),
        width=int(txt.width),
        depth=int(txt.depth),
        mlp_dim=int(txt.mlp_dim),
        num_heads=int(txt.num_heads),
        pool_type=txt.pool_type,
        pad_id=int(txt.pad_id),
        mask_padding=bool(txt.mask_padding),
        causal=bool(txt.causal),
        layer_norm_eps=float(txt.norm_eps),
        activation=txt.activation,
        padding="right-padded with pad_id; tokens from the first pad_id on are masked as "
        "attention keys and excluded from pooling"
        if txt.mask_padding
        else "right-padded with pad_id; every position is a valid token (nothing is masked)",
        pooling={
            "mean": "mean over the valid tokens",
            "last": "the last valid token",
            "first": "token 0",
            "eos": "the first token holding the largest id (CLIP's end-of-text)",
            "map": "attention pooling over the valid tokens",
        }[txt.pool_type],
        embedding="l2_normalize(pooled @ proj.weight.T)",
    )
    metadata = {"format": TEXT_FORMAT, "text_tower": json.dumps(settings), "extra_tensors": "{}"}
    _save(tensors, path, metadata)
    return settings


def read_export(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Reads a file written by this module: (tensors, metadata with JSON fields parsed)."""
    from safetensors import safe_open

    if not paths.isfile(path):
        raise FileNotFoundError(f"no exported file {path}")
    with paths.local_file(path) as local, safe_open(local, framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = dict(f.metadata() or {})
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return tensors, meta
