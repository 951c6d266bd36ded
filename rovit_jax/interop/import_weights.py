"""Import of public weights into this project's models: timm ViTs, open_clip CLIP models and
big_vision (SigLIP) .npz checkpoints.

Every import maps names, checks shapes (a mismatch raises ValueError naming the tensor, the
parameter and both shapes), resizes position embeddings bilinearly to the model's grid
(`rovit_jax.ops.posemb.resize_pos_embed`), and returns an `ImportReport` listing what was loaded,
what in the file was not loaded (with the reason) and which parameters the file did not provide
(kept at their initial values). Files are read without unpickling (`rovit_jax.interop.files`).

What maps exactly and what does not:

- timm ``VisionTransformer``: everything of a plain pre-LN ViT, including a class token
  (pool_type "tok"), ``norm_pre`` (ViT ``pre_norm=True``), an attention-pool head (pool_type
  "map") and LayerScale (folded into the preceding Linear). Not representable: register tokens,
  ``fc_norm`` (norm after pooling), the classifier ``head``.
- open_clip ``CLIP`` (and ``CustomTextCLIP`` text towers): image tower as above (``conv1`` has no
  bias: ours is set to zero; ``ln_pre`` needs ``pre_norm=True``; the class token is kept only for
  pool_type "tok"); text tower with ``text_projection``; ``logit_scale`` -> ``t``,
  ``logit_bias`` -> ``b``. CLIP's text tower is causal, masks no padding (it pads with id 0,
  which is also the piece "!") and pools the EOT token (the largest id): use
  ``TextTransformer(causal=True, pool_type="eos", mask_padding=False)`` with the "clip_bpe"
  tokenizer (``rovit_jax.data.tokenizer.ClipBpeTokenizer``). A timm-based vision tower
  (``visual.trunk.*``) is imported with the timm mapping.
- big_vision two-towers (SigLIP): the parameter names are this project's; ``pos_embedding``
  [1, N, D] becomes the [gh, gw, D] grid, ``Embed_0`` / ``Encoder_0`` become ``embedding`` /
  ``Transformer``, the towers' ``head`` Dense layers become ``img_proj`` / ``txt_proj`` (biases
  with ``model.head_bias``; SigLIP has a text head with a bias and no image head:
  ``model.image_head=False``); scanned checkpoints (``encoderblock`` with a leading depth axis)
  are split.

Not stored in any weight file: the MLP activation and the LayerNorm epsilon. timm's ViTs use
exact GELU and eps 1e-6, open_clip models exact GELU (OpenAI CLIP: QuickGELU) and torch's eps
1e-5, big_vision tanh-approximate GELU and 1e-6 (this project's defaults). The target config's
``model.image`` / ``model.text`` fields ``activation`` ("gelu" | "gelu_tanh" | "quick_gelu") and
``norm_eps`` choose ours; the report notes every tower whose choice differs from the source's
(from open_clip's model config when given, else the library's default), since outputs then
differ slightly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from rovit_jax.interop.files import load_tensors
from rovit_jax.interop.report import ImportReport
from rovit_jax.interop.torch_layout import (
    OPEN_CLIP_BLOCK,
    TIMM_BLOCK,
    Converter,
    load_block,
    load_layer_norm,
    load_map_head,
)
from rovit_jax.interop.towers import (
    flatten,
    image_tower,
    init_params,
    param_shapes,
    resolve_model,
    scan_params,
    text_tower,
)
from rovit_jax.models.two_tower import TwoTower
from rovit_jax.models.vit import ViT
from rovit_jax.ops.posemb import resize_pos_embed

__all__ = ["import_timm", "import_open_clip", "import_big_vision", "FORMATS"]

FORMATS = ("timm", "open_clip", "big_vision")


def _note_architecture(
    cv: Converter, tower: str, model: Any, activation: str, eps: float, who: str
):
    """Notes where `model`'s activation / LayerNorm epsilon differ from the source's."""
    if model.activation != activation:
        cv.note(
            f"{tower}: {who} uses activation {activation!r}, this model {model.activation!r} "
            f"(set model.{tower}.activation={activation!r} to match): outputs differ slightly"
        )
    if not math.isclose(float(model.norm_eps), eps):
        cv.note(
            f"{tower}: {who} uses LayerNorm eps {eps:g}, this model {model.norm_eps:g} "
            f"(set model.{tower}.norm_eps={eps:g} to match): outputs differ slightly"
        )


# ---- helpers ------------------------------------------------------------------------------------
def _source_name(path_or_state_dict: Any) -> str:
    if isinstance(path_or_state_dict, Mapping):
        return "<state dict>"
    return os.fspath(path_or_state_dict)


def _seed(config: Any, seed: int | None) -> int:
    if seed is not None:
        return int(seed)
    return int(config.get("seed", 0)) if hasattr(config, "get") else 0


def _unscanned_model(model: TwoTower | ViT) -> TwoTower | ViT:
    """The same model without scan_layers (the import fills `encoderblock_{i}` subtrees)."""
    if isinstance(model, ViT):
        return model.clone(scan_layers=False)
    return model.clone(
        image={**dict(model.image), "scan_layers": False},
        text={**dict(model.text), "scan_layers": False},
    )


def _is_scanned(model: TwoTower | ViT) -> bool:
    if isinstance(model, ViT):
        return bool(model.scan_layers)
    return bool(model.image.get("scan_layers", False) or model.text.get("scan_layers", False))


def _rescan(tree: dict[str, Any], model: TwoTower | ViT) -> dict[str, Any]:
    if not _is_scanned(model):
        return tree
    if isinstance(model, ViT):
        return scan_params(tree)
    out = dict(tree)
    for tower, spec in (("img", model.image), ("txt", model.text)):
        if spec.get("scan_layers", False):
            out[tower] = scan_params(tree[tower])
    return out


def _converter(
    tensors: dict[str, np.ndarray], model: TwoTower | ViT, seed: int, source: str, fmt: str
) -> Converter:
    """A Converter targeting the unscanned layout of `model` (initialised only if needed)."""
    model = _unscanned_model(model)
    return Converter(
        tensors,
        param_shapes(model),
        lambda: flatten(init_params(model, seed)),
        source=source,
        fmt=fmt,
    )


def _grid(n: int, source_grid: tuple[int, int] | None, key: str) -> tuple[int, int]:
    """The (gh, gw) patch grid of `n` position embeddings (square unless `source_grid`)."""
    if source_grid is not None:
        gh, gw = (int(g) for g in source_grid)
        if gh * gw != n:
            raise ValueError(f"{key}: {n} patch positions do not fill source_grid={source_grid}")
        return gh, gw
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"{key}: {n} patch positions are not a square grid; pass source_grid=(gh, gw)"
        )
    return side, side


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _put_pos_grid(
    cv: Converter,
    flat: np.ndarray,
    key: str,
    tgt: str,
    source_grid: tuple[int, int] | None,
    note: str = "",
) -> None:
    """Patch position embeddings [N, D] -> parameter `tgt` [gh, gw, D], resized if needed."""
    gh_t, gw_t, d = cv.param_shape(tgt)
    if flat.ndim != 2 or flat.shape[1] != d:
        raise ValueError(
            f"{cv.report.format} tensor {key!r} in {cv.report.source} gives "
            f"{tuple(flat.shape)} patch position embeddings; parameter {tgt!r} needs width {d} "
            f"(shape {(gh_t, gw_t, d)})"
        )
    gh, gw = _grid(flat.shape[0], source_grid, key)
    grid = flat.reshape(gh, gw, d).astype(np.float32)
    notes = [note] if note else []
    if (gh, gw) != (gh_t, gw_t):
        grid = np.asarray(resize_pos_embed(jnp.asarray(grid), (gh_t, gw_t)))
        notes.append(f"resized {gh}x{gw} -> {gh_t}x{gw_t} (bilinear)")
    cv.put(tgt, grid, key, "; ".join(notes))


def _put_text_pos(cv: Converter, pe: np.ndarray, key: str, tgt: str) -> None:
    """Text position embeddings [ctx, D] -> `tgt` [max_len, D]: truncated, or the first ctx rows
    set and the others kept at init."""
    length, d = cv.param_shape(tgt)
    if pe.ndim != 2 or pe.shape[1] != d:
        raise ValueError(
            f"{cv.report.format} tensor {key!r} in {cv.report.source} has shape "
            f"{tuple(pe.shape)}; parameter {tgt!r} needs [context, {d}] (model shape "
            f"{(length, d)})"
        )
    ctx = pe.shape[0]
    if ctx >= length:
        note = f"first {length} of {ctx} positions" if ctx > length else ""
        cv.put(tgt, pe[:length], key, note)
    else:
        value = cv.initial(tgt)
        value[:ctx] = pe
        cv.put(tgt, value, key, f"{ctx} positions; positions {ctx}..{length - 1} kept at init")


def _skip_extra_blocks(cv: Converter, prefix: str, depth: int, sep: str = ".") -> None:
    pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(sep))
    for key in list(cv.tensors):
        m = pattern.match(key)
        if m and int(m.group(1)) >= depth:
            cv.skip(key, f"block {m.group(1)} is beyond the model's depth {depth}")


# ---- timm ---------------------------------------------------------------------------------------
def _load_timm_vit(
    cv: Converter, vit: ViT, *, src: str, tgt: str, source_grid: tuple[int, int] | None
) -> None:
    """A timm VisionTransformer whose tensors are named `src` + timm name -> `tgt` + our path."""
    d, p = int(vit.width), int(vit.patch_size)
    kernel = cv.get(f"{src}patch_embed.proj.weight", (d, 3, p, p), target=f"{tgt}embedding/kernel")
    if kernel is not None:
        cv.put(
            f"{tgt}embedding/kernel", kernel.transpose(2, 3, 1, 0), f"{src}patch_embed.proj.weight"
        )
        bias = cv.get(f"{src}patch_embed.proj.bias", (d,), target=f"{tgt}embedding/bias")
        if bias is None:
            bias, note = np.zeros((d,), np.float32), "absent (no patch bias): zeros"
        else:
            note = ""
        cv.put(f"{tgt}embedding/bias", bias, f"{src}patch_embed.proj.bias", note)

    has_cls = cv.has(f"{src}cls_token")
    num_reg = cv.shape(f"{src}reg_token")[1] if cv.has(f"{src}reg_token") else 0
    cv.skip(f"{src}reg_token", "register tokens are not supported: dropped (outputs differ)")
    num_prefix = int(has_cls) + num_reg
    pos_key = f"{src}pos_embed"
    pos_prefix = 0
    pos = cv.get(pos_key)
    if pos is not None:
        pos = pos.reshape(-1, pos.shape[-1])
        total = pos.shape[0]
        if source_grid is not None:
            pos_prefix = total - int(source_grid[0]) * int(source_grid[1])
            if pos_prefix not in (0, num_prefix):
                raise ValueError(
                    f"timm tensor {pos_key!r} has {total} positions; source_grid={source_grid} "
                    f"with {num_prefix} prefix tokens does not account for them"
                )
        elif num_prefix and _is_square(total - num_prefix):
            pos_prefix = num_prefix
        note = ""
        if pos_prefix and vit.pool_type != "tok":
            note = "class-token row dropped"
        _put_pos_grid(cv, pos[pos_prefix:], pos_key, f"{tgt}pos_embedding", source_grid, note)

    if vit.pool_type == "tok":
        cls = cv.get(f"{src}cls_token", (1, 1, d), target=f"{tgt}cls")
        if cls is None:
            for name in ("cls", "cls_pos_embedding"):
                cv.mark_missing(f"{tgt}{name}", "the checkpoint has no class token")
        else:
            cv.put(f"{tgt}cls", cls, f"{src}cls_token")
            if pos is not None and pos_prefix:
                cv.put(f"{tgt}cls_pos_embedding", pos[:1].reshape(1, 1, d), f"{pos_key}[0]")
            else:
                cv.put(
                    f"{tgt}cls_pos_embedding",
                    np.zeros((1, 1, d), np.float32),
                    f"{pos_key}[0]",
                    "the class token has no position embedding in the checkpoint: zeros",
                )
    else:
        cv.skip(
            f"{src}cls_token",
            f"pool_type={vit.pool_type!r} has no class token: dropped, so the encoder sees one "
            "token fewer than the source model (outputs differ)",
        )

    if vit.pre_norm:
        load_layer_norm(cv, f"{src}norm_pre", f"{tgt}pre_norm")
    else:
        cv.skip_prefix(
            f"{src}norm_pre.",
            "the model has no pre_norm (ViT pre_norm=False): dropped (outputs differ)",
        )
    for i in range(int(vit.depth)):
        load_block(cv, f"{src}blocks.{i}", f"{tgt}Transformer/encoderblock_{i}", TIMM_BLOCK)
    _skip_extra_blocks(cv, f"{src}blocks.", int(vit.depth))
    load_layer_norm(cv, f"{src}norm", f"{tgt}Transformer/encoder_norm")
    if cv.has(f"{src}fc_norm.weight"):
        reason = (
            "fc_norm normalises the pooled feature; this ViT normalises every token before "
            "pooling (encoder_norm), which is not equivalent"
        )
        cv.skip_prefix(f"{src}fc_norm.", reason)
        if not cv.has(f"{src}norm.weight"):
            for name in ("scale", "bias"):
                cv.mark_missing(f"{tgt}Transformer/encoder_norm/{name}", reason)
    if vit.pool_type == "map":
        load_map_head(cv, f"{src}attn_pool", f"{tgt}MAPHead_0")
    else:
        cv.skip_prefix(f"{src}attn_pool.", f"pool_type={vit.pool_type!r} has no attention pool")
    cv.skip_prefix(f"{src}head.", "classifier head: not part of the tower")


def import_timm(
    path_or_state_dict: Any,
    config: Any,
    *,
    source_grid: tuple[int, int] | None = None,
    prefix: str = "",
    seed: int | None = None,
) -> tuple[dict[str, Any], ImportReport]:
    """Imports a timm ``VisionTransformer`` into the image tower.

    Args:
      path_or_state_dict: .safetensors / torch file, or a state dict (torch tensors or arrays).
      config: a pretraining config, a TwoTower or a ViT (the target image tower).
      source_grid: (gh, gw) patch grid of the checkpoint's pos_embed when it is not square.
      prefix: only tensors under this prefix are read (e.g. "visual.trunk."), prefix removed.
      seed: initialisation seed of parameters the file does not provide (default: config.seed).

    Returns:
      (image tower parameters as numpy arrays, report).
    """
    tensors = load_tensors(path_or_state_dict)
    if prefix:
        tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    vit = image_tower(config)
    cv = _converter(tensors, vit, _seed(config, seed), _source_name(path_or_state_dict), "timm")
    _load_timm_vit(cv, vit, src="", tgt="", source_grid=source_grid)
    cv.skip_prefix(
        "rovit.", "the exported image projection: import_timm returns the image tower only"
    )
    _note_architecture(
        cv, "image", vit, "gelu", 1e-6, "a timm ViT (unless built with act_layer='gelu_tanh')"
    )
    return _rescan(cv.finish(), vit), cv.report


# ---- open_clip ----------------------------------------------------------------------------------
def _load_open_clip_visual(cv: Converter, vit: ViT, source_grid: tuple[int, int] | None) -> None:
    d, p = int(vit.width), int(vit.patch_size)
    src, tgt = "visual.", "img/"
    kernel = cv.get(f"{src}conv1.weight", (d, 3, p, p), target=f"{tgt}embedding/kernel")
    if kernel is not None:
        cv.put(f"{tgt}embedding/kernel", kernel.transpose(2, 3, 1, 0), f"{src}conv1.weight")
        cv.put(
            f"{tgt}embedding/bias",
            np.zeros((d,), np.float32),
            f"{src}conv1.bias",
            "open_clip's conv1 has no bias: zeros",
        )
    pos_key = f"{src}positional_embedding"
    pos = cv.get(pos_key)
    if pos is not None:
        pos = pos.reshape(-1, pos.shape[-1])
        note = "" if vit.pool_type == "tok" else "class-token row dropped"
        _put_pos_grid(cv, pos[1:], pos_key, f"{tgt}pos_embedding", source_grid, note)
    cls_key = f"{src}class_embedding"
    if vit.pool_type == "tok":
        cls = cv.get(cls_key, (d,), target=f"{tgt}cls")
        if cls is not None:
            cv.put(f"{tgt}cls", cls.reshape(1, 1, d), cls_key)
        if pos is not None:
            cv.put(f"{tgt}cls_pos_embedding", pos[:1].reshape(1, 1, d), f"{pos_key}[0]")
    else:
        cv.skip(
            cls_key,
            f"pool_type={vit.pool_type!r} has no class token: dropped, so the encoder sees one "
            "token fewer than the source model (outputs differ)",
        )
    if vit.pre_norm:
        load_layer_norm(cv, f"{src}ln_pre", f"{tgt}pre_norm")
    else:
        cv.skip_prefix(
            f"{src}ln_pre.",
            "the model has no pre_norm (ViT pre_norm=False): dropped (outputs differ)",
        )
    blocks = f"{src}transformer.resblocks."
    for i in range(int(vit.depth)):
        load_block(cv, f"{blocks}{i}", f"{tgt}Transformer/encoderblock_{i}", OPEN_CLIP_BLOCK)
    _skip_extra_blocks(cv, blocks, int(vit.depth))
    load_layer_norm(cv, f"{src}ln_post", f"{tgt}Transformer/encoder_norm")
    for path in cv.params():
        if path.startswith(f"{tgt}MAPHead_0/"):
            cv.mark_missing(path, "open_clip ViTs have no MAP head")
    cv.skip_prefix(f"{src}attn_pool", "open_clip attentional pooler (CoCa): not supported")
    proj = cv.get(f"{src}proj", cv.param_shape("img_proj/kernel"), target="img_proj/kernel")
    if proj is not None:
        cv.put("img_proj/kernel", proj, f"{src}proj")


def _load_text(cv: Converter, src: str, names: Any, *, encoder: str, depth: int) -> None:
    """An open_clip text tower at prefix `src` ("" or "text.") -> txt/ and txt_proj."""
    v, d = cv.param_shape("txt/embedding/embedding")
    emb = cv.get(f"{src}token_embedding.weight", (v, d), target="txt/embedding/embedding")
    if emb is not None:
        cv.put("txt/embedding/embedding", emb, f"{src}token_embedding.weight")
    pe = cv.get(f"{src}positional_embedding")
    if pe is not None:
        _put_text_pos(cv, pe, f"{src}positional_embedding", "txt/pos_embedding")
    for i in range(depth):
        load_block(cv, f"{src}{encoder}{i}", f"txt/Transformer/encoderblock_{i}", names)
    _skip_extra_blocks(cv, f"{src}{encoder}", depth)
    load_layer_norm(cv, f"{src}ln_final", "txt/Transformer/encoder_norm")
    d_in, e = cv.param_shape("txt_proj/kernel")
    key = f"{src}text_projection"
    if cv.has(key):  # nn.Parameter [D, E]: x @ P
        cv.put("txt_proj/kernel", cv.get(key, (d_in, e), target="txt_proj/kernel"), key)
    elif cv.has(f"{key}.weight"):  # nn.Linear [E, D]
        w = cv.get(f"{key}.weight", (e, d_in), target="txt_proj/kernel")
        cv.put("txt_proj/kernel", w.T, f"{key}.weight")
        cv.skip(f"{key}.bias", "this model's text projection has no bias")
    cv.skip(f"{src}cls_emb", "a learned text CLS embedding (embed_cls) is not supported")


def _open_clip_notes(cv: Converter, model_cfg: Mapping[str, Any] | None, vit: ViT, txt: Any):
    """Architecture differences the weights cannot show, from open_clip's model config."""
    if model_cfg is None:
        for tower, model in (("image", vit), ("text", txt)):
            _note_architecture(
                cv, tower, model, "gelu", 1e-5, "open_clip by default (OpenAI CLIP: quick_gelu)"
            )
        if not txt.causal:
            cv.note(
                "open_clip text towers are causal unless no_causal_mask=True; this model's text "
                "tower is bidirectional (TextTransformer causal=False): text embeddings differ"
            )
        if txt.pool_type != "eos":
            cv.note(
                "open_clip pools text at the EOT token (pool_type 'argmax'); the equivalent here "
                f"is pool_type='eos', not {txt.pool_type!r}"
            )
        return
    vc = dict(model_cfg.get("vision_cfg", {}))
    tc = dict(model_cfg.get("text_cfg", {}))
    for name, tower, model, cfg in (("vision", "image", vit, vc), ("text", "text", txt, tc)):
        act = dict(cfg.get("act_kwargs") or {})
        if model_cfg.get("quick_gelu", False):
            source_act = "quick_gelu"
        else:
            source_act = "gelu_tanh" if act.get("approximate") == "tanh" else "gelu"
        eps = float(dict(cfg.get("norm_kwargs") or {}).get("eps", 1e-5))
        _note_architecture(cv, tower, model, source_act, eps, f"the source's {name} tower")
        if cfg.get("ls_init_value") is not None:
            cv.note(f"{name}: LayerScale folded into the preceding Linear layers")
    if bool(vc.get("no_ln_pre", False)) == bool(vit.pre_norm):
        want = "False" if vc.get("no_ln_pre", False) else "True"
        cv.note(f"vision: ln_pre presence differs from this ViT's pre_norm (needs {want})")
    vpool = "tok" if vc.get("pool_type", "tok") == "tok" else vc.get("pool_type")
    if vc.get("attentional_pool") or vc.get("final_ln_after_pool") or vpool != vit.pool_type:
        cv.note(
            f"vision: the source pools with pool_type={vc.get('pool_type', 'tok')!r}"
            f"{', final_ln_after_pool' if vc.get('final_ln_after_pool') else ''}"
            f"{', attentional_pool' if vc.get('attentional_pool') else ''}; this ViT with "
            f"{vit.pool_type!r}: image embeddings differ"
        )
    if bool(tc.get("no_causal_mask", False)) == bool(txt.causal):
        cv.note(
            f"text: causal mask differs (source no_causal_mask={tc.get('no_causal_mask', False)},"
            f" this model causal={txt.causal})"
        )
    tpool = {"argmax": "eos", "last": "last", "first": "first"}.get(tc.get("pool_type", "argmax"))
    if tpool != txt.pool_type or tc.get("final_ln_after_pool") or tc.get("embed_cls"):
        cv.note(
            f"text: the source pools with pool_type={tc.get('pool_type', 'argmax')!r}; this "
            f"model with {txt.pool_type!r}: text embeddings differ"
        )
    if txt.mask_padding:
        cv.note(
            "text: open_clip masks no padding (it pads with id 0, the piece '!'); this tower "
            "masks from the first pad_id (mask_padding=True): texts holding '!' differ"
        )


def import_open_clip(
    path: Any,
    config: Any,
    *,
    model_cfg: Mapping[str, Any] | None = None,
    source_grid: tuple[int, int] | None = None,
    seed: int | None = None,
) -> tuple[dict[str, Any], ImportReport]:
    """Imports an open_clip CLIP checkpoint into a two-tower model.

    Args:
      path: .safetensors / torch file (a training checkpoint's {"state_dict": ...} is unwrapped),
        or a state dict.
      config: a pretraining config or a TwoTower.
      model_cfg: optional open_clip model config (``open_clip.get_model_config(name)`` or its
        JSON): architecture differences it reveals are listed in the report's notes.
      source_grid: (gh, gw) of the checkpoint's patch grid when it is not square.
      seed: initialisation seed of parameters the file does not provide (default: config.seed).

    Returns:
      (parameters {img, txt, img_proj, txt_proj, t, b?} as numpy arrays, report).
    """
    model = resolve_model(config)
    if not isinstance(model, TwoTower):
        raise ValueError("import_open_clip needs a two-tower model (a pretraining config)")
    vit, txt = image_tower(model), text_tower(model)
    tensors = load_tensors(path)
    cv = _converter(tensors, model, _seed(config, seed), _source_name(path), "open_clip")
    if cv.has("visual.conv1.weight"):
        _load_open_clip_visual(cv, vit, source_grid)
    elif cv.has("visual.trunk.patch_embed.proj.weight"):
        _load_timm_vit(cv, vit, src="visual.trunk.", tgt="img/", source_grid=source_grid)
        w = cv.get(
            "visual.head.proj.weight",
            cv.param_shape("img_proj/kernel")[::-1],
            target="img_proj/kernel",
        )
        if w is not None:
            cv.put("img_proj/kernel", w.T, "visual.head.proj.weight")
        cv.skip("visual.head.proj.bias", "this model's image projection has no bias")
    else:
        cv.skip_prefix("visual.", "unsupported vision tower (not a ViT)")
    if cv.has("token_embedding.weight"):
        _load_text(cv, "", OPEN_CLIP_BLOCK, encoder="transformer.resblocks.", depth=txt.depth)
    elif cv.has("text.token_embedding.weight"):
        _load_text(cv, "text.", OPEN_CLIP_BLOCK, encoder="transformer.resblocks.", depth=txt.depth)
    else:
        cv.skip_prefix("text.", "unsupported text tower (e.g. a Hugging Face model)")
    scale = cv.get("logit_scale")
    if scale is not None:
        cv.put("t", scale.reshape(()), "logit_scale", "t = logit_scale (both log-scales)")
    if cv.has_param("b"):
        bias = cv.get("logit_bias")
        if bias is not None:
            cv.put("b", bias.reshape(()), "logit_bias")
    else:
        cv.skip("logit_bias", "the model has no logit bias (model.bias_init=None)")
    cv.skip("attn_mask", "buffer (the causal mask is the text tower's causal flag)")
    _open_clip_notes(cv, model_cfg, vit, txt)
    return _rescan(cv.finish(), model), cv.report


# ---- big_vision ---------------------------------------------------------------------------------
_BV_RENAMES = (  # (our path prefix, big_vision prefix)
    ("img_proj/", "img/head/"),
    ("txt_proj/", "txt/head/"),
    ("txt/embedding/", "txt/Embed_0/"),
    ("txt/Transformer/", "txt/Encoder_0/"),
)


def _bv_key(path: str) -> str:
    for ours, theirs in _BV_RENAMES:
        if path.startswith(ours):
            return theirs + path[len(ours) :]
    return path


def _bv_unscan(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Splits scanned `.../encoderblock/...` leaves [depth, ...] into `encoderblock_{i}`."""
    out = {}
    for key, value in tensors.items():
        if "/encoderblock/" in key:
            head, tail = key.split("/encoderblock/", 1)
            for i in range(value.shape[0]):
                out[f"{head}/encoderblock_{i}/{tail}"] = value[i]
        else:
            out[key] = value
    return out


def import_big_vision(
    npz_path: Any,
    config: Any,
    *,
    source_grid: tuple[int, int] | None = None,
    seed: int | None = None,
) -> tuple[dict[str, Any], ImportReport]:
    """Imports a big_vision two-tower (SigLIP-style) .npz checkpoint.

    Args:
      npz_path: the .npz file (read with allow_pickle=False), or a {name: array} dict; names may
        start with "params/".
      config: a pretraining config or a TwoTower.
      source_grid: (gh, gw) of the image pos_embedding when it is not square.
      seed: initialisation seed of parameters the file does not provide (default: config.seed).

    Returns:
      (parameters {img, txt, img_proj, txt_proj, t, b?} as numpy arrays, report).
    """
    model = resolve_model(config)
    if not isinstance(model, TwoTower):
        raise ValueError("import_big_vision needs a two-tower model (a pretraining config)")
    vit, txt = image_tower(model), text_tower(model)
    tensors = load_tensors(npz_path)
    if any(k.startswith("params/") for k in tensors):
        tensors = {k[len("params/") :]: v for k, v in tensors.items() if k.startswith("params/")}
    tensors = _bv_unscan(tensors)
    for scalar in ("t", "b"):  # big_vision stores them as [1]
        if scalar in tensors and np.size(tensors[scalar]) == 1:
            tensors[scalar] = np.asarray(tensors[scalar]).reshape(())
    cv = _converter(tensors, model, _seed(config, seed), _source_name(npz_path), "big_vision")
    d = int(vit.width)
    special = {"img/pos_embedding", "img/cls_pos_embedding", "txt/pos_embedding"}
    if cv.has("img/pos_embedding"):
        pos = cv.get("img/pos_embedding")
        _put_pos_grid(
            cv,
            pos.reshape(-1, pos.shape[-1]),
            "img/pos_embedding",
            "img/pos_embedding",
            source_grid,
        )
    if cv.has_param("img/cls_pos_embedding") and cv.has("img/cls"):
        cv.put(
            "img/cls_pos_embedding",
            np.zeros((1, 1, d), np.float32),
            "img/cls",
            "big_vision adds no position embedding to the class token: zeros",
        )
    if cv.has("txt/pos_embedding"):
        pe = cv.get("txt/pos_embedding")
        _put_text_pos(cv, pe.reshape(-1, pe.shape[-1]), "txt/pos_embedding", "txt/pos_embedding")
    for path in cv.params():
        if path in special:
            continue
        key = _bv_key(path)
        value = cv.get(key, cv.param_shape(path), target=path)
        if value is not None:
            cv.put(path, value, key)
    for tower in ("img", "txt"):
        if not cv.has_param(f"{tower}_proj/bias"):
            cv.skip(f"{tower}/head/bias", "this model's projections have no bias")
    if not cv.has_param("img_proj/kernel"):
        cv.skip_prefix("img/head/", "this model has no image head (model.image_head=False)")
    if not cv.has_param("b"):
        cv.skip("b", "the model has no logit bias (model.bias_init=None)")
    _skip_extra_blocks(cv, "img/Transformer/encoderblock_", int(vit.depth), sep="/")
    _skip_extra_blocks(cv, "txt/Encoder_0/encoderblock_", int(txt.depth), sep="/")
    if txt.mask_padding:
        cv.note(
            "big_vision text towers do not mask padding (sticky EOS padding); this model masks "
            f"tokens from the first pad_id={txt.pad_id} on (model.text.mask_padding=True), so "
            "text embeddings agree only for token sequences without that id"
        )
    return _rescan(cv.finish(), model), cv.report
