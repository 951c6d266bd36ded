"""Text classifiers for open vocabularies: prompt ensembles through the pretrained text tower."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["PROMPT_ENSEMBLES", "clean_name", "bucket_size", "build_text_classifier"]

# Prompt templates; "{}" is the category name. "vild" follows ViLD's short photo-style prompts;
# "single" is the plain baseline.
PROMPT_ENSEMBLES: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "vild": (
        "a photo of a {}.",
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
        "a photo of the {}.",
        "a photo of one {}.",
        "a picture of a {}.",
        "an image of a {}.",
        "a close-up photo of a {}.",
        "a cropped photo of a {}.",
        "a photo of a small {}.",
        "a photo of a large {}.",
    ),
}

# Vocabulary sizes are padded up to one of these so a new vocabulary reuses a compiled model.
BUCKETS = (16, 64, 256, 1024, 2048, 4096)


def clean_name(name: str) -> str:
    """Dataset category names to words: "traffic_light" -> "traffic light", "a/b" -> "a b"."""
    name = name.replace("_", " ").replace("/", " ").replace("(", " ").replace(")", " ")
    return " ".join(name.lower().split())


def bucket_size(num_classes: int) -> int:
    """Smallest bucket holding `num_classes`; raises for an empty vocabulary."""
    if num_classes <= 0:
        raise ValueError("the vocabulary is empty: give at least one category name")
    for b in BUCKETS:
        if num_classes <= b:
            return b
    return int(-(-num_classes // BUCKETS[-1]) * BUCKETS[-1])


def build_text_classifier(
    names: Sequence[str],
    embed_texts: Callable[[list[str]], np.ndarray],
    *,
    templates: Sequence[str] = PROMPT_ENSEMBLES["vild"],
    pad_to_bucket: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeds each name with every template, averages, normalises; pads to a bucket size.

    Args:
      names: K category names.
      embed_texts: texts -> [N, E] unit-norm embeddings (the pretrained text tower).
      templates: prompt templates with one "{}".

    Returns:
      (embeddings [K_pad, E] float32 unit-norm, valid [K_pad] bool).
    """
    names = [clean_name(n) for n in names]
    k = bucket_size(len(names)) if pad_to_bucket else len(names)
    if not names:
        raise ValueError("the vocabulary is empty: give at least one category name")
    if any(not n for n in names):
        raise ValueError(f"empty category name in vocabulary {list(names)!r}")
    texts = [t.format(n) for n in names for t in templates]
    emb = np.asarray(embed_texts(texts), np.float32).reshape(len(names), len(templates), -1)
    emb = emb.mean(1)
    emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    out = np.zeros((k, emb.shape[-1]), np.float32)
    out[: len(names)] = emb
    valid = np.zeros((k,), bool)
    valid[: len(names)] = True
    return out, valid
