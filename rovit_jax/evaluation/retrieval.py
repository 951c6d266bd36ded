"""Zero-shot image-text retrieval: recall@K in both directions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(
    similarity: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K for image->text and text->image retrieval.

    Args:
      similarity: `[num_images, num_texts]` scores (higher = more similar).
      text_to_image: `[num_texts]` index of the image each text describes (several texts may share
        an image, as in COCO's five captions).
      ks: the K values.

    Returns:
      `{"i2t_recall@K": ..., "t2i_recall@K": ...}`: an image counts as retrieved at K if ANY of its
      texts is among its top K texts; a text if its image is among its top K images. Ties are
      broken pessimistically (a tied wrong candidate ranks ahead of the right one).
    """
    similarity = np.asarray(similarity, np.float64)
    text_to_image = np.asarray(text_to_image)
    num_images, num_texts = similarity.shape
    if text_to_image.shape != (num_texts,):
        raise ValueError(f"text_to_image has shape {text_to_image.shape}, expected ({num_texts},)")
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError("text_to_image holds image indices outside [0, num_images)")
    positive = text_to_image[None, :] == np.arange(num_images)[:, None]  # [images, texts]

    # Text->image: rank of the true image = number of images scoring >= it, minus one.
    true_t2i = similarity[text_to_image, np.arange(num_texts)]
    t2i_rank = (similarity >= true_t2i[None, :]).sum(axis=0) - 1
    # Image->text: best rank over the image's true texts; wrong texts scoring >= the best true one.
    best_true = np.where(positive, similarity, -np.inf).max(axis=1)
    i2t_rank = ((similarity >= best_true[:, None]) & ~positive).sum(axis=1)
    has_text = positive.any(axis=1)

    out = {}
    for k in ks:
        out[f"i2t_recall@{k}"] = float(np.mean(i2t_rank[has_text] < k)) if has_text.any() else 0.0
        out[f"t2i_recall@{k}"] = float(np.mean(t2i_rank < k)) if num_texts else 0.0
    return out
