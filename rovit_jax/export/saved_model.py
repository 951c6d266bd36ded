"""The detector as a TensorFlow SavedModel (jax2tf, native serialization).

    export_saved_model("runs/shapes_detect", "detector_savedmodel", image_size=256, max_queries=16)
    model = tf.saved_model.load("detector_savedmodel")
    out = model.signatures["serving_default"](
        images=images, text_embeddings=text_embeddings, text_valid=text_valid)

Signatures (see export.serving for shapes and preprocessing):
  serving_default(images [B, S, S, 3] float32, text_embeddings [Q, E] float32, text_valid [Q]
    bool) -> {boxes, scores, classes, valid, masks}; B is any size (images run one at a time)
    unless a batch size is fixed at export;
  embed_text(tokens [N, L] int32) -> {embeddings [N, E]}: the pretrained text tower, so queries
    can be embedded without JAX (tokenize with the SentencePiece model copied beside the JSON;
    `rovit_export.json` lists the prompt templates and tokenizer conventions).
Parameters are tf.Variables of the SavedModel (no 2 GB graph-constant limit); the functions are
natively serialized StableHLO (jax2tf's only mode in current JAX, so `native_serialization` is
not passed: the argument is deprecated), run by TF's XLA through XlaCallModule.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from rovit_jax import paths
from rovit_jax.export.serving import (
    check_export_args,
    export_params,
    serving_function,
    text_embedding_function,
    write_metadata,
)

__all__ = ["METADATA_NAME", "export_saved_model"]

METADATA_NAME = "rovit_export.json"


@contextlib.contextmanager
def _tf_readable_stablehlo() -> Iterator[None]:
    """Serializes StableHLO for the 12-week compatibility window while active.

    jax.export writes the 4-week window's StableHLO version (1.15 for jax 0.10), whose
    `vhlo.composite_v2` (how `lax.top_k` is serialized) TensorFlow 2.21's XlaCallModule cannot
    read: it reads up to 1.13.7, the 12-week window's version. jax has no setting for this, so its
    serializer is wrapped while converting.
    """
    try:
        from jax._src.export import _export
        from jax._src.lib import _jax
        from jax._src.lib.mlir.dialects import hlo
    except ImportError:  # another jax layout: keep its default
        yield
        return
    original = getattr(_export, "_module_to_bytecode", None)
    if original is None:
        yield
        return

    def to_bytecode(module):
        target = hlo.get_version_from_compatibility_requirement(
            hlo.StablehloCompatibilityRequirement.WEEK_12
        )
        return _jax.mlir.serialize_portable_artifact(
            module, target, _export.xb.get_backend().serialize_with_sdy
        )

    _export._module_to_bytecode = to_bytecode
    try:
        yield
    finally:
        _export._module_to_bytecode = original


def export_saved_model(
    workdir: str,
    out_dir: str,
    *,
    image_size: int | None = None,
    max_queries: int = 16,
    batch_size: int | None = None,
    fusion: bool = True,
    step: int | None = None,
) -> dict[str, Any]:
    """Writes the SavedModel of run `workdir`'s detector to `out_dir` (local or a bucket URL);
    returns its metadata.

    Args:
      image_size: canvas S (default the run's `det.image_size`).
      max_queries: Q, rows of the text-embedding input (pad with text_valid False).
      batch_size: fixed batch B; None = polymorphic batch.
      fusion: VLM score fusion (queries weighted as novel).
      step: checkpoint step (default latest).

    `out_dir/rovit_export.json` describes inputs, outputs and the tokenizer (with its
    SentencePiece model copied as `rovit_export.tokenizer.model`).
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    from rovit_jax.inference import Predictor

    check_export_args(image_size, max_queries, batch_size)
    # The einsum attention kernel: an exported model holds no device-specific (cuDNN) call.
    predictor = Predictor.from_checkpoint(
        workdir, step=step, fusion=fusion, image_size=image_size, attention="einsum"
    )
    predictor.require_detector("export")
    s, e, q = predictor.image_size, predictor.embed_dim, int(max_queries)
    length = int(predictor.text_len)

    module = tf.Module()
    module.params = tf.nest.map_structure(
        lambda x: tf.Variable(x, trainable=False), export_params(predictor)
    )
    # A symbolic batch does not survive TF 2.21's shape refinement (top_k's serialized body has
    # dynamic shapes it rejects), so the StableHLO has a fixed batch: `batch_size`, or one image
    # mapped over a batch of any size with tf.map_fn.
    detect_tf = jax2tf.convert(
        serving_function(predictor),
        polymorphic_shapes=None,
        with_gradient=False,
    )
    embed_tf = jax2tf.convert(
        text_embedding_function(predictor),
        polymorphic_shapes=[None, "(n, ...)"],
        with_gradient=False,
    )
    outputs = {
        "boxes": tf.TensorSpec(None, tf.float32),
        "scores": tf.TensorSpec(None, tf.float32),
        "classes": tf.TensorSpec(None, tf.int32),
        "valid": tf.TensorSpec(None, tf.bool),
        "masks": tf.TensorSpec(None, tf.float32),
    }

    @tf.function(
        autograph=False,
        input_signature=[
            tf.TensorSpec([batch_size, s, s, 3], tf.float32, name="images"),
            tf.TensorSpec([q, e], tf.float32, name="text_embeddings"),
            tf.TensorSpec([q], tf.bool, name="text_valid"),
        ],
    )
    def serving_default(images, text_embeddings, text_valid):
        if batch_size:
            return detect_tf(module.params, images, text_embeddings, text_valid)

        def one(image):
            out = detect_tf(module.params, image[None], text_embeddings, text_valid)
            return {k: v[0] for k, v in out.items()}

        return tf.map_fn(one, images, fn_output_signature=outputs)

    @tf.function(
        autograph=False, input_signature=[tf.TensorSpec([None, length], tf.int32, name="tokens")]
    )
    def embed_text(tokens):
        return {"embeddings": embed_tf(module.params["towers"], tokens)}

    module.serving_default = serving_default
    module.embed_text = embed_text
    # TensorFlow writes local folders only (its own gs:// client bypasses the project's path
    # layer): a bucket destination is written locally, then uploaded whole.
    with paths.local_output(out_dir) as local_dir:
        os.makedirs(local_dir, exist_ok=True)
        with _tf_readable_stablehlo():  # tracing (inside save) serializes the StableHLO
            tf.saved_model.save(
                module,
                local_dir,
                signatures={"serving_default": serving_default, "embed_text": embed_text},
            )
        meta = write_metadata(
            os.path.join(local_dir, METADATA_NAME),
            predictor,
            fmt="saved_model",
            max_queries=q,
            batch_size=batch_size,
            parameters="tf.Variables in the SavedModel",
            extra={"signatures": ["serving_default", "embed_text"]},
        )
    return meta
