"""recall_at_k against a sort-based re-derivation, including ties and many texts per image."""

import numpy as np
import pytest

from rovit_jax.evaluation.retrieval import recall_at_k


def _oracle(sim, text_to_image, k):
    num_images, num_texts = sim.shape
    i2t_hits = []
    for i in range(num_images):
        pos = [t for t in range(num_texts) if text_to_image[t] == i]
        if not pos:
            continue
        # Pessimistic ties: at equal score, wrong texts are ranked first.
        order = sorted(range(num_texts), key=lambda t: (-sim[i, t], t in pos))
        first = min(order.index(t) for t in pos)
        i2t_hits.append(first < k)
    t2i_hits = []
    for t in range(num_texts):
        true = text_to_image[t]
        order = sorted(range(num_images), key=lambda i: (-sim[i, t], i == true))
        t2i_hits.append(order.index(true) < k)
    return np.mean(i2t_hits), np.mean(t2i_hits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sort_oracle_with_ties_and_multiple_captions(seed):
    rng = np.random.default_rng(seed)
    num_images, num_texts = 7, 19
    sim = rng.integers(-3, 4, size=(num_images, num_texts)).astype(np.float32)  # many ties
    text_to_image = rng.integers(0, num_images, size=num_texts)
    got = recall_at_k(sim, text_to_image, ks=(1, 3, 5))
    for k in (1, 3, 5):
        i2t, t2i = _oracle(sim, text_to_image, k)
        assert got[f"i2t_recall@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_recall@{k}"] == pytest.approx(t2i)


def test_perfect_and_reversed_rankings():
    n = 12
    sim = np.eye(n) + 0.01 * np.arange(n)[None, :]
    perfect = recall_at_k(sim, np.arange(n), ks=(1,))
    assert perfect == {"i2t_recall@1": 1.0, "t2i_recall@1": 1.0}
    worst = recall_at_k(-np.eye(n), np.arange(n), ks=(1, n - 1, n))
    assert worst["t2i_recall@1"] == 0.0 and worst["t2i_recall@%d" % (n - 1)] == 0.0
    assert worst["t2i_recall@%d" % n] == 1.0


def test_bad_mapping_is_rejected():
    with pytest.raises(ValueError, match="text_to_image"):
        recall_at_k(np.zeros((3, 4)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(np.zeros((3, 2)), np.array([0, 3]))
