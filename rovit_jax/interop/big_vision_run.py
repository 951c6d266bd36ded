"""A big_vision two-tower (SigLIP) `.npz` to a pretraining run folder, architecture read from
the parameter tree itself.

`import_big_vision_run(npz, out, tokenizer=...)` reads the towers from the arrays' shapes and
names, writes a pretraining config that describes them with SigLIP's conventions, copies the
SentencePiece model into the run, and stores the converted parameters as the run's step-0
checkpoint (`interop.workdir`), as `interop.open_clip_run` does for open_clip.

What the tree gives (big_vision stores attention kernels as [width, heads, head_dim], so even
the heads are read):
- image tower: patch size and width (`img/embedding/kernel` [p, p, 3, D]), patch grid
  (`img/pos_embedding`), depth, MLP size, heads, pooling (`MAPHead_0`: "map"; `cls`: "tok";
  else "gap"), and whether an image head exists (`img/head`; SigLIP has none: its MAP head's
  output is the embedding);
- text tower: vocabulary, context length, width, depth, MLP size, heads; the head's output size
  (the shared embedding) and bias;
- the logit scale `t` and bias `b`.

SigLIP's conventions that the tree does not hold are written into the config: tanh-approximate
GELU and LayerNorm eps 1e-6 (big_vision's), a text tower that attends to its padding and pools
the last position, texts tokenized as they are with EOS appended (kept when truncating) and
padded with the EOS id, pixels (x / 127.5 - 1) resized to the square input (bilinear).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from rovit_jax import paths
from rovit_jax.interop.files import load_tensors
from rovit_jax.interop.report import ImportReport

__all__ = ["big_vision_architecture", "big_vision_config", "import_big_vision_run"]


def _tree(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    from rovit_jax.interop.import_weights import _bv_unscan

    if any(k.startswith("params/") for k in tensors):
        tensors = {k[len("params/") :]: v for k, v in tensors.items() if k.startswith("params/")}
    return _bv_unscan(dict(tensors))


def _need(tree: Mapping[str, np.ndarray], key: str, what: str) -> np.ndarray:
    if key not in tree:
        raise ValueError(f"{key!r} is not in the checkpoint: {what}")
    return tree[key]


def _blocks(tree: Mapping[str, np.ndarray], prefix: str) -> dict[str, int]:
    """{depth, mlp_dim, num_heads} of the encoder blocks under `prefix`."""
    pattern = re.compile(re.escape(prefix) + r"encoderblock_(\d+)/")
    found = {int(m.group(1)) for k in tree if (m := pattern.match(k))}
    if not found:
        raise ValueError(f"no encoder blocks under {prefix!r}: not a big_vision two-tower")
    block = f"{prefix}encoderblock_0/"
    query = _need(tree, block + "MultiHeadDotProductAttention_0/query/kernel", "attention")
    mlp = _need(tree, block + "MlpBlock_0/Dense_0/kernel", "the MLP")
    return dict(depth=max(found) + 1, mlp_dim=int(mlp.shape[1]), num_heads=int(query.shape[1]))


def big_vision_architecture(tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The towers read from a big_vision two-tower parameter tree (see the module docstring)."""
    tree = _tree(tensors)
    kernel = _need(tree, "img/embedding/kernel", "a ViT patch embedding")
    patch, patch_w, _, width = kernel.shape
    if patch != patch_w:
        raise ValueError(f"img/embedding/kernel {kernel.shape}: non-square patches")
    pos = _need(tree, "img/pos_embedding", "the image position embedding")
    n = int(np.prod(pos.shape[:-1]))
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise ValueError(f"img/pos_embedding {pos.shape}: not a square patch grid")
    pool = "map" if "img/MAPHead_0/probe" in tree else "tok" if "img/cls" in tree else "gap"
    emb = _need(tree, "txt/Embed_0/embedding", "the text token embedding")
    context = int(np.prod(_need(tree, "txt/pos_embedding", "text positions").shape[:-1]))
    head = _need(tree, "txt/head/kernel", "the text head (the shared embedding)")
    image_head = "img/head/kernel" in tree
    embed_dim = int(head.shape[1])
    if not image_head and int(width) != embed_dim:
        raise ValueError(
            f"no img/head, so the image width {width} must be the embedding size, but "
            f"txt/head/kernel is {head.shape}"
        )
    bias = tree.get("b")
    return {
        "image": dict(
            patch_size=int(patch),
            grid=grid,
            width=int(width),
            pool_type=pool,
            **_blocks(tree, "img/Transformer/"),
        ),
        "text": dict(
            vocab_size=int(emb.shape[0]),
            max_len=context,
            width=int(emb.shape[1]),
            **_blocks(tree, "txt/Encoder_0/"),
        ),
        "embed_dim": embed_dim,
        "image_head": image_head,
        "head_bias": "txt/head/bias" in tree,
        "bias": None if bias is None else float(np.asarray(bias).reshape(())),
    }


def big_vision_config(arch: Mapping[str, Any], tokenizer: str) -> ml_collections.ConfigDict:
    """A pretraining config whose model is `arch` (from `big_vision_architecture`), with
    SigLIP's text and pixel conventions and the SentencePiece model `tokenizer`."""
    from rovit_jax.pretrain_config import pretrain_defaults

    c = pretrain_defaults()
    img, txt = arch["image"], arch["text"]
    c.model.image.variant = f"B/{img['patch_size']}"  # the sizes below override B's
    for key in ("width", "depth", "mlp_dim", "num_heads", "pool_type"):
        c.model.image[key] = img[key]
    for key in ("width", "depth", "mlp_dim", "num_heads"):
        c.model.text[key] = txt[key]
    c.model.text.update(pool_type="last", mask_padding=False, causal=False)
    c.model.update(
        embed_dim=arch["embed_dim"],
        image_head=arch["image_head"],
        head_bias=arch["head_bias"],
        bias_init=arch["bias"],
    )
    c.tokenizer.update(
        kind="sentencepiece",
        model_path=tokenizer,
        max_len=txt["max_len"],
        vocab_size=txt["vocab_size"],
        add_eos=True,
        lowercase=False,
        pad_id=1,  # big_vision's pad_value=1: the EOS id of T5-style vocabularies
    )
    c.pp.image_size = img["patch_size"] * img["grid"]
    c.cpe.up_size = max(int(c.cpe.up_size), img["grid"])
    return c


def import_big_vision_run(
    weights: Any, out: str, *, tokenizer: str
) -> tuple[ml_collections.ConfigDict, ImportReport, str]:
    """Writes `out` as a pretraining run at step 0 holding the big_vision checkpoint `weights`.

    Args:
      weights: the .npz (names may start with "params/"; scanned blocks are split), or a dict.
      out: the new run folder (local or a bucket URL); must not hold checkpoints.
      tokenizer: the checkpoint's SentencePiece model (SigLIP English: `c4_en`); it is copied
        into the run. Its EOS id must be 1 (T5's layout), the id SigLIP pads with.

    Returns:
      (the run's config, the import report, the step directory written).
    """
    from rovit_jax.data.tokenizer import SentencePieceTokenizer
    from rovit_jax.interop.import_weights import import_big_vision
    from rovit_jax.interop.workdir import check_new_workdir, write_init_workdir

    check_new_workdir(out)
    tensors = load_tensors(weights)
    arch = big_vision_architecture(tensors)
    dest = os.path.join(paths.absolute(out), "tokenizer", os.path.basename(tokenizer))
    paths.write_bytes(dest, paths.read_bytes(tokenizer))
    config = big_vision_config(arch, dest)
    tok = SentencePieceTokenizer(dest, arch["text"]["max_len"], add_eos=True, lowercase=False)
    if tok.eos_id != 1 or tok.vocab_size > arch["text"]["vocab_size"]:
        raise ValueError(
            f"tokenizer {tokenizer}: EOS id {tok.eos_id} and {tok.vocab_size} pieces; the "
            f"checkpoint pads with id 1 (EOS) and embeds {arch['text']['vocab_size']} ids"
        )
    params, report = import_big_vision(tensors, config)
    step_dir = write_init_workdir(config, params, out)
    return config, report, step_dir
