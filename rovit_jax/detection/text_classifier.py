"""Text classifiers for open vocabularies: prompt ensembles through the pretrained text tower."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "BACKGROUND_NAME",
    "PROMPT_ENSEMBLES",
    "background_text_embedding",
    "bucket_size",
    "build_text_classifier",
    "clean_name",
]

# The background class's name, as in the authors' code (fvlm/utils/dataset_utils.py,
# `load_dataset_class_names`: "a list of class names with background represented as '.'").
BACKGROUND_NAME = "."

# Prompt templates; "{}" is the category name. "vild" follows ViLD's short photo-style prompts;
# "single" is the plain baseline; "clip" is the 80-template ensemble CLIP published for zero-shot
# ImageNet (Radford et al. 2021, the prompt-engineering notebook), in its published order.
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
    "clip": (
        "a bad photo of a {}.",
        "a photo of many {}.",
        "a sculpture of a {}.",
        "a photo of the hard to see {}.",
        "a low resolution photo of the {}.",
        "a rendering of a {}.",
        "graffiti of a {}.",
        "a bad photo of the {}.",
        "a cropped photo of the {}.",
        "a tattoo of a {}.",
        "the embroidered {}.",
        "a photo of a hard to see {}.",
        "a bright photo of a {}.",
        "a photo of a clean {}.",
        "a photo of a dirty {}.",
        "a dark photo of the {}.",
        "a drawing of a {}.",
        "a photo of my {}.",
        "the plastic {}.",
        "a photo of the cool {}.",
        "a close-up photo of a {}.",
        "a black and white photo of the {}.",
        "a painting of the {}.",
        "a painting of a {}.",
        "a pixelated photo of the {}.",
        "a sculpture of the {}.",
        "a bright photo of the {}.",
        "a cropped photo of a {}.",
        "a plastic {}.",
        "a photo of the dirty {}.",
        "a jpeg corrupted photo of a {}.",
        "a blurry photo of the {}.",
        "a photo of the {}.",
        "a good photo of the {}.",
        "a rendering of the {}.",
        "a {} in a video game.",
        "a photo of one {}.",
        "a doodle of a {}.",
        "a close-up photo of the {}.",
        "a photo of a {}.",
        "the origami {}.",
        "the {} in a video game.",
        "a sketch of a {}.",
        "a doodle of the {}.",
        "a origami {}.",
        "a low resolution photo of a {}.",
        "the toy {}.",
        "a rendition of the {}.",
        "a photo of the clean {}.",
        "a photo of a large {}.",
        "a rendition of a {}.",
        "a photo of a nice {}.",
        "a photo of a weird {}.",
        "a blurry photo of a {}.",
        "a cartoon {}.",
        "art of a {}.",
        "a sketch of the {}.",
        "a embroidered {}.",
        "a pixelated photo of a {}.",
        "itap of the {}.",
        "a jpeg corrupted photo of the {}.",
        "a good photo of a {}.",
        "a plushie {}.",
        "a photo of the nice {}.",
        "a photo of the small {}.",
        "a photo of the weird {}.",
        "the cartoon {}.",
        "art of the {}.",
        "a drawing of the {}.",
        "a photo of the large {}.",
        "a black and white photo of a {}.",
        "the plushie {}.",
        "a dark photo of a {}.",
        "itap of a {}.",
        "graffiti of the {}.",
        "a toy {}.",
        "itap of my {}.",
        "a photo of a cool {}.",
        "a photo of a small {}.",
        "a tattoo of the {}.",
    ),
}

# Vocabulary sizes are padded up to one of these so a new vocabulary reuses a compiled model.
BUCKETS = (16, 64, 256, 1024, 2048, 4096)


def clean_name(name: str) -> str:
    """Dataset category name -> the words put into the prompt templates.

    Rule: "_", "/", "(" and ")" become spaces, letters are lower-cased and whitespace runs
    collapse to one space (none at the ends). So LVIS "traffic_light" -> "traffic light"; an
    LVIS disambiguator stays as plain words, "bow_(weapon)" -> "bow weapon" (it tells the text
    tower which sense is meant); Objects365 alternatives keep both words, "Cabinet/shelf" ->
    "cabinet shelf"; "Table Tennis " -> "table tennis". Hyphens, apostrophes and digits are kept
    ("bow-tie", "formula 1"). A name with none of "_/()", upper case or extra spaces is unchanged.
    """
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


def background_text_embedding(
    embed_texts: Callable[[list[str]], np.ndarray],
    *,
    templates: Sequence[str] = PROMPT_ENSEMBLES["vild"],
) -> np.ndarray:
    """[E] unit-norm text embedding of the background name "." through the prompt templates.

    Built exactly like a category's row of `build_text_classifier` (each template filled with
    ".", embedded, averaged, normalised): the authors embed the name list whose row 0 is "."
    with the same text pipeline as the categories.
    """
    emb, _ = build_text_classifier(
        [BACKGROUND_NAME], embed_texts, templates=templates, pad_to_bucket=False
    )
    return emb[0]
