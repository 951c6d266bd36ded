"""The detector's serving function shared by the exports, and the metadata written beside them.

Serving inputs (like the authors' released SavedModel: image + text-embedding inputs):
  images          float32 [B, S, S, 3], prepared like evaluation (see `preprocessing`);
  text_embeddings float32 [Q, E] unit-norm query embeddings (`Predictor.query_classifier`, or the
                  exported `embed_text` function averaged over the prompt templates);
  text_valid      bool [Q], False on padding rows.
Outputs (`rcnn.detect`): boxes float32 [B, D, 4] (y0, x0, y1, x1) in canvas pixels (divide by the
resize scale for original pixels), scores float32 [B, D], classes int32 [B, D] (query index),
valid bool [B, D], masks float32 [B, D, 28, 28] box-relative mask probabilities.

With VLM score fusion every query is weighted as a novel category (`infer.w_novel`): an exported
model cannot tell which free-text queries were training categories.
"""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from rovit_jax import paths
from rovit_jax.data.tokenizer import ClipBpeTokenizer
from rovit_jax.runs import vlm_tower_params

__all__ = [
    "preprocessing",
    "check_export_args",
    "export_params",
    "serving_function",
    "text_embedding_function",
    "write_metadata",
]


def preprocessing(pixels) -> str:
    """How the exported detector's `images` are prepared, for the backbone's `pixels`
    (`rovit_jax.data.pixels.Pixels`)."""
    return (
        "RGB uint8 image; long side resized to S (bilinear), short side by the same factor "
        "rounded to whole pixels; placed at the top left of an S x S canvas; (x / 255 - mean) / "
        f"std with mean {list(pixels.mean)}, std {list(pixels.std)}; padding exactly 0. "
        "scale = S / max(H, W); original pixels = canvas pixels / scale."
    )


def export_params(predictor) -> dict[str, Any]:
    """{"detector": detector parameters, "towers": pretrained two-tower parameters}."""
    return {"detector": predictor.detector_params, "towers": predictor.tower_params}


def serving_function(predictor):
    """`(params, images, text_embeddings, text_valid) -> outputs` (see the module docstring)."""
    detect = predictor.detection_function()

    def serve(params, images, text_embeddings, text_valid):
        vlm = vlm_tower_params(params["towers"])
        text_valid = text_valid.astype(jnp.bool_)
        out = detect(params["detector"], vlm, images, text_embeddings, text_valid, text_valid)
        return {
            "boxes": out["boxes"].astype(jnp.float32),
            "scores": out["scores"].astype(jnp.float32),
            "classes": out["classes"].astype(jnp.int32),
            "valid": out["valid"].astype(jnp.bool_),
            "masks": out["masks"].astype(jnp.float32),
        }

    return serve


def text_embedding_function(predictor):
    """`(towers params, tokens int32 [N, L]) -> float32 [N, E]` unit-norm text embeddings."""
    model = predictor.two_tower

    def embed(towers, tokens):
        return model.apply({"params": towers}, tokens, method=model.embed_texts)

    return embed


def write_metadata(
    path: str,
    predictor,
    *,
    fmt: str,
    max_queries: int,
    batch_size: int | None,
    parameters: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the export's JSON (`path`, local or a bucket URL): shapes, preprocessing, and the
    text tower's tokenizer.

    The tokenizer's vocabulary file is copied beside it: a SentencePiece model as `<path minus
    .json>.tokenizer.model`, CLIP's merges as `<path minus .json>.tokenizer.bpe.txt.gz`;
    "text.vocabulary" lists the pieces in id order.
    """
    tok = predictor.tokenizer
    s, e = predictor.image_size, predictor.embed_dim
    cfg = predictor.run.config
    kind = "clip_bpe" if isinstance(tok, ClipBpeTokenizer) else "sentencepiece"
    text: dict[str, Any] = {
        "embed_dim": e,
        "tokenizer": kind,
        "max_len": int(tok.max_len),
        "pad_id": int(tok.pad_id),
        "bos_id": int(getattr(tok, "bos_id", -1)),
        "eos_id": int(getattr(tok, "eos_id", -1)),
        "normalisation": tok.convention,
        "prompt_templates": list(predictor.templates),
        "classifier": "embed each query in every template, average, L2-normalise",
    }
    model_path = getattr(tok, "model_path", None)
    if model_path and paths.isfile(model_path):
        suffix = ".tokenizer.bpe.txt.gz" if kind == "clip_bpe" else ".tokenizer.model"
        dest = os.path.splitext(path)[0] + suffix
        paths.write_bytes(dest, paths.read_bytes(model_path))
        text["clip_bpe_merges" if kind == "clip_bpe" else "sentencepiece_model"] = os.path.basename(
            dest
        )
    if hasattr(tok, "piece"):
        text["vocabulary"] = [tok.piece(i) for i in range(int(tok.vocab_size))]
    meta = {
        "format": fmt,
        "checkpoint": predictor.run.workdir,
        "step": int(predictor.run.step),
        "pretrain_checkpoint": predictor.run.pretrain_workdir,
        "pretrain_step": int(predictor.run.pretrain_step),
        "parameters": parameters,
        "fusion": bool(predictor.fusion),
        "novel_weighting": "every query counts as novel (infer.w_novel)"
        if predictor.fusion
        else "",
        "inputs": {
            "images": {
                "shape": [batch_size if batch_size else "batch", s, s, 3],
                "dtype": "float32",
                "preprocessing": preprocessing(predictor.pixels),
            },
            "text_embeddings": {"shape": [max_queries, e], "dtype": "float32"},
            "text_valid": {"shape": [max_queries], "dtype": "bool"},
        },
        "outputs": {
            "boxes": "float32 [B, D, 4] (y0, x0, y1, x1) canvas pixels",
            "scores": "float32 [B, D]",
            "classes": "int32 [B, D] index into the text embeddings",
            "valid": "bool [B, D]",
            "masks": "float32 [B, D, 28, 28] mask probabilities inside each box",
        },
        "max_detections": int(cfg.infer.max_detections),
        "text": text,
    }
    meta.update(extra or {})
    paths.write_json(path, meta, indent=1, ensure_ascii=False)
    return meta


def check_export_args(image_size: Any, max_queries: Any, batch_size: Any) -> None:
    """Clear errors for bad export arguments, before the model is loaded."""
    for name, value, allow_none in (
        ("image_size", image_size, True),
        ("max_queries", max_queries, False),
        ("batch_size", batch_size, True),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
