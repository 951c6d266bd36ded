"""The detector as a serialized `jax.export` artifact: StableHLO bytes that any JAX can call.

    export_jax("runs/shapes_detect", "detector.jax")
    detect = load_jax_export("detector.jax")
    out = detect(images, text_embeddings, text_valid)  # see export.serving for the signature

Parameters are baked into the artifact as constants (the simplest thing to serve: one file, three
inputs); the run is not needed to call it. The batch dimension is symbolic by default, so any
batch size runs without re-exporting (the platform's compiler still compiles once per size).
A JSON beside it (`<out_path>.json`) describes inputs, outputs, preprocessing and the tokenizer.
`out_path` may be local or a bucket URL (gs://...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rovit_jax import paths
from rovit_jax.export.serving import (
    check_export_args,
    export_params,
    serving_function,
    write_metadata,
)

__all__ = ["export_jax", "load_jax_export"]


def export_jax(
    workdir: str,
    out_path: str,
    *,
    image_size: int | None = None,
    max_queries: int = 16,
    batch_size: int | None = None,
    fusion: bool = True,
    step: int | None = None,
) -> str:
    """Exports the detector of run `workdir` to `out_path`; returns `out_path`.

    Args:
      image_size: canvas S (default the run's `det.image_size`).
      max_queries: Q, rows of the text-embedding input (pad with text_valid False).
      batch_size: fixed batch B; None = symbolic (any batch size).
      fusion: VLM score fusion (queries weighted as novel).
      step: checkpoint step (default latest).
    """
    from rovit_jax.inference import Predictor

    check_export_args(image_size, max_queries, batch_size)
    # The einsum attention kernel: an exported model holds no device-specific (cuDNN) call.
    predictor = Predictor.from_checkpoint(
        workdir, step=step, fusion=fusion, image_size=image_size, attention="einsum"
    )
    predictor.require_detector("export")
    params = jax.tree.map(jnp.asarray, export_params(predictor))
    serve = serving_function(predictor)

    def detector(images, text_embeddings, text_valid):
        return serve(params, images, text_embeddings, text_valid)  # params: constants

    s, e = predictor.image_size, predictor.embed_dim
    b = batch_size if batch_size else jax.export.symbolic_shape("b")[0]
    args = (
        jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32),
        jax.ShapeDtypeStruct((int(max_queries), e), jnp.float32),
        jax.ShapeDtypeStruct((int(max_queries),), jnp.bool_),
    )
    exported = jax.export.export(jax.jit(detector))(*args)
    paths.write_bytes(out_path, bytes(exported.serialize()))
    write_metadata(
        out_path + ".json",
        predictor,
        fmt="jax_export",
        max_queries=int(max_queries),
        batch_size=batch_size,
        parameters="baked in as constants",
        extra={"platforms": list(exported.platforms)},
    )
    return out_path


def load_jax_export(path: str) -> Callable[..., Any]:
    """`(images, text_embeddings, text_valid) -> outputs dict` from `export_jax`'s file."""
    if not paths.isfile(path):
        raise FileNotFoundError(f"jax.export artifact not found: {path}")
    data = paths.read_bytes(path)
    try:
        exported = jax.export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - flatbuffer errors have many types
        raise ValueError(f"{path} is not a jax.export artifact: {type(e).__name__}: {e}") from None
    return exported.call
