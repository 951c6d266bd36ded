"""Hugging Face `transformers` CLIP and SigLIP state dicts, as runs.

`import_hf_run(weights, out, hf_config=...)` renames a `CLIPModel` state dict to open_clip's
layout and a `SiglipModel` state dict to big_vision's, then writes the run as
`interop.open_clip_run` / `interop.big_vision_run` do (architecture read from the tensors).
`hf_config` is the model's `config.json` (a dict): it supplies what the tensors do not show.

Layout facts used (transformers' CLIP and SigLIP modelling code, and its big_vision conversion):
- attention: separate `q_proj` / `k_proj` / `v_proj` / `out_proj` Linear layers; open_clip packs
  q, k, v into `in_proj_weight` [3D, D], big_vision stores kernels [D, heads, head_dim] and the
  output kernel [heads, head_dim, D];
- CLIP: `pre_layrnorm` (sic) is open_clip's `ln_pre`, the projections are bias-free Linear
  layers (`visual_projection`, `text_projection`: transposed into open_clip's matrices), the
  activation is `hidden_act` ("quick_gelu" for OpenAI's weights), LayerNorm eps
  `layer_norm_eps`;
- SigLIP: the vision `head` is big_vision's `MAPHead_0` (its attention an
  `nn.MultiheadAttention` with packed `in_proj_weight`), the text `head` is `txt/head`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from rovit_jax.interop.files import load_tensors
from rovit_jax.interop.report import ImportReport

__all__ = ["hf_clip_to_open_clip", "hf_siglip_to_big_vision", "import_hf_run"]

_BLOCK = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)")
_CLIP_BLOCK_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _activation_cfg(tower: Mapping[str, Any]) -> dict[str, Any]:
    act = tower.get("hidden_act", "quick_gelu")
    cfg: dict[str, Any] = {"norm_kwargs": {"eps": float(tower.get("layer_norm_eps", 1e-5))}}
    if act in ("gelu_pytorch_tanh", "gelu_new"):
        cfg["act_kwargs"] = {"approximate": "tanh"}
    elif act not in ("gelu", "quick_gelu"):
        raise ValueError(f"hidden_act {act!r} of the Hugging Face config is not supported")
    return cfg


def hf_clip_to_open_clip(
    sd: Mapping[str, np.ndarray], hf_config: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(open_clip state dict, open_clip model config) of a `CLIPModel` state dict."""
    vc, tc = dict(hf_config.get("vision_config") or {}), dict(hf_config.get("text_config") or {})
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    simple = {
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
        "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
        "vision_model.post_layernorm.weight": "visual.ln_post.weight",
        "vision_model.post_layernorm.bias": "visual.ln_post.bias",
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
        "logit_scale": "logit_scale",
    }
    for key, value in sd.items():
        value = np.asarray(value)
        if key in simple:
            out[simple[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.T
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif m := _BLOCK.fullmatch(key):
            tower, i, rest = m.groups()
            prefix = f"{'visual.' if tower == 'vision' else ''}transformer.resblocks.{i}."
            if am := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault((prefix, am.group(2)), {})[am.group(1)] = value
                continue
            name, _, leaf = rest.rpartition(".")
            if name not in _CLIP_BLOCK_NAMES:
                raise ValueError(f"unexpected CLIP tensor {key!r}")
            out[f"{prefix}{_CLIP_BLOCK_NAMES[name]}.{leaf}"] = value
        elif not key.endswith("position_ids"):  # position_ids: buffers
            raise ValueError(f"unexpected CLIP tensor {key!r}")
    for (prefix, leaf), parts in qkv.items():
        out[f"{prefix}attn.in_proj_{leaf}"] = np.concatenate([parts[c] for c in "qkv"])
    vision_width = int(vc.get("hidden_size", out["visual.conv1.weight"].shape[0]))
    model_cfg = {
        "embed_dim": int(hf_config.get("projection_dim", out["text_projection"].shape[1])),
        "quick_gelu": vc.get("hidden_act", "quick_gelu") == "quick_gelu",
        "vision_cfg": dict(
            width=vision_width,
            head_width=vision_width // int(vc.get("num_attention_heads", vision_width // 64)),
            **_activation_cfg(vc),
        ),
        "text_cfg": dict(
            heads=int(tc.get("num_attention_heads", 8)),
            **_activation_cfg(tc),
        ),
    }
    return out, model_cfg


def _split_heads(w: np.ndarray, b: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear (weight [D_out, D_in], bias) -> big_vision kernel [D_in, heads, hd], bias [heads, hd]."""
    d_out, d_in = w.shape
    return w.T.reshape(d_in, heads, d_out // heads), b.reshape(heads, d_out // heads)


def hf_siglip_to_big_vision(
    sd: Mapping[str, np.ndarray], hf_config: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The big_vision parameter tree ("params/..." names) of a `SiglipModel` state dict."""
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    heads = {
        "vision": int(dict(hf_config.get("vision_config") or {}).get("num_attention_heads", 12)),
        "text": int(dict(hf_config.get("text_config") or {}).get("num_attention_heads", 12)),
    }
    out: dict[str, np.ndarray] = {}

    def dense(dst: str, src: str) -> None:
        out[f"{dst}/kernel"], out[f"{dst}/bias"] = sd[f"{src}.weight"].T, sd[f"{src}.bias"]

    def norm(dst: str, src: str) -> None:
        out[f"{dst}/scale"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def attention(dst: str, qkv: list[tuple[np.ndarray, np.ndarray]], o: str, n: int) -> None:
        for name, (w, b) in zip(("query", "key", "value"), qkv):
            out[f"{dst}/{name}/kernel"], out[f"{dst}/{name}/bias"] = _split_heads(w, b, n)
        w = sd[f"{o}.weight"]
        out[f"{dst}/out/kernel"] = w.T.reshape(n, w.shape[1] // n, w.shape[0])
        out[f"{dst}/out/bias"] = sd[f"{o}.bias"]

    for tower, dst in (("vision", "img/Transformer"), ("text", "txt/Encoder_0")):
        layers = {int(m.group(2)) for k in sd if (m := _BLOCK.fullmatch(k)) and m.group(1) == tower}
        for i in sorted(layers):
            s, d = f"{tower}_model.encoder.layers.{i}", f"{dst}/encoderblock_{i}"
            norm(f"{d}/LayerNorm_0", f"{s}.layer_norm1")
            norm(f"{d}/LayerNorm_1", f"{s}.layer_norm2")
            dense(f"{d}/MlpBlock_0/Dense_0", f"{s}.mlp.fc1")
            dense(f"{d}/MlpBlock_0/Dense_1", f"{s}.mlp.fc2")
            a = f"{s}.self_attn"
            qkv = [(sd[f"{a}.{c}_proj.weight"], sd[f"{a}.{c}_proj.bias"]) for c in "qkv"]
            attention(f"{d}/MultiHeadDotProductAttention_0", qkv, f"{a}.out_proj", heads[tower])
    patch = sd["vision_model.embeddings.patch_embedding.weight"]
    out["img/embedding/kernel"] = patch.transpose(2, 3, 1, 0)
    out["img/embedding/bias"] = sd["vision_model.embeddings.patch_embedding.bias"]
    out["img/pos_embedding"] = sd["vision_model.embeddings.position_embedding.weight"][None]
    norm("img/Transformer/encoder_norm", "vision_model.post_layernorm")
    head = "vision_model.head"
    out["img/MAPHead_0/probe"] = sd[f"{head}.probe"]
    w, b = sd[f"{head}.attention.in_proj_weight"], sd[f"{head}.attention.in_proj_bias"]
    attention(
        "img/MAPHead_0/MultiHeadDotProductAttention_0",
        list(zip(np.split(w, 3), np.split(b, 3))),
        f"{head}.attention.out_proj",
        heads["vision"],
    )
    norm("img/MAPHead_0/LayerNorm_0", f"{head}.layernorm")
    dense("img/MAPHead_0/MlpBlock_0/Dense_0", f"{head}.mlp.fc1")
    dense("img/MAPHead_0/MlpBlock_0/Dense_1", f"{head}.mlp.fc2")
    out["txt/Embed_0/embedding"] = sd["text_model.embeddings.token_embedding.weight"]
    out["txt/pos_embedding"] = sd["text_model.embeddings.position_embedding.weight"][None]
    norm("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm")
    dense("txt/head", "text_model.head")
    out["t"], out["b"] = sd["logit_scale"].reshape(1), sd["logit_bias"].reshape(1)
    return {f"params/{k}": v for k, v in out.items()}


def import_hf_run(
    weights: Any, out: str, *, hf_config: Mapping[str, Any], tokenizer: str | None = None
) -> tuple[ml_collections.ConfigDict, ImportReport, str]:
    """Writes `out` as a pretraining run at step 0 from a Hugging Face CLIP or SigLIP state dict.

    Args:
      weights: a `CLIPModel` / `SiglipModel` state dict file (.safetensors, .bin) or dict.
      out: the new run folder.
      hf_config: the model's `config.json` as a dict (`model_type` "clip" or "siglip").
      tokenizer: SigLIP only: its SentencePiece model (copied into the run).
    """
    from rovit_jax.interop.big_vision_run import import_big_vision_run
    from rovit_jax.interop.open_clip_run import import_open_clip_run

    kind = hf_config.get("model_type")
    sd = load_tensors(weights)
    if kind == "clip":
        state, model_cfg = hf_clip_to_open_clip(sd, hf_config)
        return import_open_clip_run(state, out, model=model_cfg)
    if kind == "siglip":
        if not tokenizer:
            raise ValueError("a SigLIP model needs its SentencePiece model (--tokenizer)")
        return import_big_vision_run(
            hf_siglip_to_big_vision(sd, hf_config), out, tokenizer=tokenizer
        )
    raise ValueError(f"Hugging Face model_type {kind!r}: only 'clip' and 'siglip' are supported")
