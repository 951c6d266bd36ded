"""An open_clip (or OpenAI CLIP) checkpoint to a pretraining run folder, architecture read from
the checkpoint itself.

`import_open_clip_run(weights, out)` reads the towers' sizes from the tensors' shapes, writes a
pretraining config that describes them (and the source's pixel convention and tokenizer), and
stores the converted parameters as that run's step-0 checkpoint (`interop.workdir`). The folder
is then what a trained run is: `Predictor.from_checkpoint(out)` embeds texts and images as the
source model does, and a detection config takes it as `init.pretrain_workdir`.

What the shapes give:
- image tower: patch size and width (`visual.conv1.weight`), patch grid (`visual.
  positional_embedding`), depth (resblocks), MLP size (`c_fc`), a class token
  (`visual.class_embedding` -> pool_type "tok"), `ln_pre` (pre_norm), the projection size;
- text tower: vocabulary and width (`token_embedding.weight`), context length
  (`positional_embedding`), depth, MLP size, the projection; CLIP's tower is causal, pools the
  end-of-text token and masks no padding; its tokenizer is CLIP's BPE, whose merges file is
  copied into the run (`tokenizer/`);
- the logit scale, and a logit bias when there is one (SigLIP-style open_clip models).

What the shapes do not give comes from open_clip's model config (`model`: a name such as
"ViT-B-16", looked up with open_clip when it is installed, or the config's dict): attention
heads (else width / 64, open_clip's default head width), the MLP activation (quick_gelu for
OpenAI's weights, else exact GELU) and the LayerNorm eps (else 1e-5), and the preprocessing
(`preprocess_cfg`; else CLIP's mean / std, bicubic resampling, shorter side resized then centre
crop).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from rovit_jax import paths
from rovit_jax.data.pixels import CLIP_MEAN, CLIP_STD
from rovit_jax.data.tokenizer import CLIP_VOCAB_FILE, open_clip_vocab_file
from rovit_jax.interop.files import load_tensors
from rovit_jax.interop.report import ImportReport

__all__ = ["open_clip_architecture", "open_clip_config", "import_open_clip_run"]

_HEAD_WIDTH = 64  # open_clip's default width per attention head


def _depth(tensors: Mapping[str, np.ndarray], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in tensors if (m := pattern.match(k))}
    if not found:
        raise ValueError(f"no transformer blocks under {prefix!r}: not an open_clip CLIP")
    return max(found) + 1


def _need(tensors: Mapping[str, np.ndarray], key: str, what: str) -> np.ndarray:
    if key not in tensors:
        raise ValueError(f"{key!r} is not in the checkpoint: {what}")
    return tensors[key]


def open_clip_architecture(
    tensors: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The towers' sizes read from an open_clip CLIP state dict, completed by `model_cfg`.

    Returns {"image": {...}, "text": {...}, "embed_dim", "bias"} (see the module docstring).
    Raises ValueError naming the tensor when the layout is not a ViT CLIP's.
    """
    cfg = dict(model_cfg or {})
    vc, tc = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    if "visual.trunk.patch_embed.proj.weight" in tensors:
        raise ValueError(
            "a timm-trunk vision tower (visual.trunk.*): give a pretraining --config that "
            "describes it; only open_clip's own ViT layout is read from the shapes"
        )
    conv = _need(tensors, "visual.conv1.weight", "only ViT image towers are supported")
    width, _, patch, patch_w = conv.shape
    if patch != patch_w:
        raise ValueError(f"visual.conv1.weight {conv.shape}: non-square patches")
    pos = _need(tensors, "visual.positional_embedding", "a ViT's position embedding")
    has_cls = "visual.class_embedding" in tensors
    grid2 = pos.shape[0] - int(has_cls)
    grid = int(round(grid2**0.5))
    if grid * grid != grid2:
        raise ValueError(f"visual.positional_embedding {pos.shape}: not a square patch grid")
    if "visual.attn_pool.query" in tensors or "visual.attn_pool.attn.in_proj_weight" in tensors:
        raise ValueError("an attentional-pool vision tower (CoCa) is not supported")
    v_depth = _depth(tensors, "visual.transformer.resblocks.")
    v_mlp = tensors["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    v_heads = int(vc.get("width", width)) // int(vc.get("head_width", _HEAD_WIDTH))

    emb = _need(tensors, "token_embedding.weight", "the text tower's token embedding")
    vocab, t_width = emb.shape
    context = _need(tensors, "positional_embedding", "the text position embedding").shape[0]
    t_depth = _depth(tensors, "transformer.resblocks.")
    t_mlp = tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    t_heads = int(tc.get("heads", t_width // _HEAD_WIDTH))
    proj = _need(tensors, "text_projection", "the text projection")
    embed_dim = proj.shape[1]
    if "visual.proj" in tensors and tensors["visual.proj"].shape[1] != embed_dim:
        raise ValueError(
            f"visual.proj {tensors['visual.proj'].shape} and text_projection {proj.shape} "
            "project to different sizes"
        )

    def activation(tower_cfg):
        if cfg.get("quick_gelu", False):
            return "quick_gelu"
        act = dict(tower_cfg.get("act_kwargs") or {})
        return "gelu_tanh" if act.get("approximate") == "tanh" else "gelu"

    def eps(tower_cfg):
        return float(dict(tower_cfg.get("norm_kwargs") or {}).get("eps", 1e-5))

    bias = tensors.get("logit_bias")
    return {
        "image": dict(
            patch_size=int(patch),
            grid=grid,
            width=int(width),
            depth=v_depth,
            mlp_dim=int(v_mlp),
            num_heads=v_heads,
            pool_type="tok" if has_cls else "gap",
            pre_norm="visual.ln_pre.weight" in tensors,
            activation=activation(vc),
            norm_eps=eps(vc),
        ),
        "text": dict(
            vocab_size=int(vocab),
            max_len=int(context),
            width=int(t_width),
            depth=t_depth,
            mlp_dim=int(t_mlp),
            num_heads=t_heads,
            activation=activation(tc),
            norm_eps=eps(tc),
        ),
        "embed_dim": int(embed_dim),
        "bias": None if bias is None else float(np.asarray(bias).reshape(())),
        "preprocess": dict(cfg.get("preprocess_cfg") or {}),
    }


def open_clip_config(arch: Mapping[str, Any], vocab_path: str) -> ml_collections.ConfigDict:
    """A pretraining config whose model is `arch` (from `open_clip_architecture`) and whose
    tokenizer is CLIP's BPE read from `vocab_path`."""
    from rovit_jax.pretrain_config import pretrain_defaults

    c = pretrain_defaults()
    img, txt, pre = arch["image"], arch["text"], arch["preprocess"]
    c.model.image.variant = f"B/{img['patch_size']}"  # the sizes below override B's
    for key in ("width", "depth", "mlp_dim", "num_heads", "pool_type", "pre_norm"):
        c.model.image[key] = img[key]
    c.model.image.activation, c.model.image.norm_eps = img["activation"], img["norm_eps"]
    for key in ("width", "depth", "mlp_dim", "num_heads", "activation", "norm_eps"):
        c.model.text[key] = txt[key]
    c.model.text.update(causal=True, pool_type="eos", mask_padding=False)
    c.model.embed_dim = arch["embed_dim"]
    c.model.bias_init = arch["bias"]  # None: no bias, as CLIP
    c.tokenizer.update(
        kind="clip_bpe", model_path=vocab_path, max_len=txt["max_len"], vocab_size=txt["vocab_size"]
    )
    c.pp.image_size = img["patch_size"] * img["grid"]
    c.cpe.up_size = max(int(c.cpe.up_size), img["grid"])
    c.pp.mean = tuple(float(v) for v in pre.get("mean", CLIP_MEAN))
    c.pp.std = tuple(float(v) for v in pre.get("std", CLIP_STD))
    c.pp.interpolation = "bilinear" if pre.get("interpolation") == "bilinear" else "bicubic"
    c.pp.eval_resize = "squash" if pre.get("resize_mode") == "squash" else "crop"
    return c


def _model_config(model: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if model is None or isinstance(model, Mapping):
        return None if model is None else dict(model)
    try:
        import open_clip
    except ImportError as e:
        raise ValueError(
            f"--model {model!r} is looked up with open_clip, which is not installed; give its "
            "model config as JSON (--open_clip_config) instead"
        ) from e
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"open_clip has no model config named {model!r}")
    return dict(cfg)


def import_open_clip_run(
    weights: Any,
    out: str,
    *,
    model: str | Mapping[str, Any] | None = None,
    vocab_path: str | None = None,
) -> tuple[ml_collections.ConfigDict, ImportReport, str]:
    """Writes `out` as a pretraining run at step 0 holding the open_clip checkpoint `weights`.

    Args:
      weights: .safetensors / torch file (a training checkpoint's state_dict is unwrapped), or a
        state dict.
      out: the new run folder (local or a bucket URL); must not hold checkpoints.
      model: open_clip's model name (e.g. "ViT-B-16", "ViT-B-16-quickgelu") or its config dict,
        for what the shapes do not show (see the module docstring).
      vocab_path: CLIP's merges file; default: the copy open_clip packages.

    Returns:
      (the run's config, the import report, the step directory written).
    """
    from rovit_jax.interop.import_weights import import_open_clip
    from rovit_jax.interop.workdir import check_new_workdir, write_init_workdir

    check_new_workdir(out)
    model_cfg = _model_config(model)
    tensors = load_tensors(weights)
    arch = open_clip_architecture(tensors, model_cfg)
    source_vocab = vocab_path or open_clip_vocab_file()
    if source_vocab is None:
        raise FileNotFoundError(
            f"no CLIP vocabulary to copy into the run: give vocab_path (CLIP's {CLIP_VOCAB_FILE}) "
            "or install open_clip_torch, which packages it"
        )
    # The run carries its tokenizer, so that it loads anywhere.
    dest = os.path.join(paths.absolute(out), "tokenizer", CLIP_VOCAB_FILE)
    paths.write_bytes(dest, paths.read_bytes(source_vocab))
    config = open_clip_config(arch, dest)
    params, report = import_open_clip(tensors, config, model_cfg=model_cfg)
    if model_cfg is None:
        report.notes.append(
            "no open_clip model config (--model): attention heads = width / 64, exact GELU, "
            "LayerNorm eps 1e-5, CLIP's preprocessing assumed (OpenAI's weights need "
            "--model <name>-quickgelu)"
        )
    step_dir = write_init_workdir(config, params, out)
    return config, report, step_dir
