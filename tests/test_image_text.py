"""Pretraining input: determinism, host slicing, epochs, corrupt-image handling, eval padding."""

import io

import numpy as np
import pytest
from PIL import Image

from rovit_jax.data import image_text
from rovit_jax.train.prefetch import prefetch


class WordTokenizer:
    """Minimal stand-in honouring the Tokenizer interface: one id per word, 0 = padding."""

    vocab_size, max_len, pad_id = 1000, 6, 0

    def encode(self, texts):
        out = np.zeros((len(texts), self.max_len), np.int32)
        for i, t in enumerate(texts):
            ids = [1] + [int(w) + 4 for w in t.split()][: self.max_len - 1]
            out[i, : len(ids)] = ids
        return out


def _png(value, size=20):
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class ListSource:
    def __init__(self, n, corrupt=()):
        self.items = [
            {"image": b"not an image" if i in corrupt else _png(i), "caption": str(i)}
            for i in range(n)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _ids(batch):
    return batch["text"][:, 1] - 4  # caption i is the word "i"


def test_deterministic_and_host_slices_form_the_global_batch():
    src = ListSource(37)
    kw = dict(global_batch=8, image_size=16, seed=3)
    one = image_text.PretrainBatches(src, WordTokenizer(), **kw)
    again = image_text.PretrainBatches(src, WordTokenizer(), **kw)
    hosts = [
        image_text.PretrainBatches(src, WordTokenizer(), process_index=h, process_count=2, **kw)
        for h in range(2)
    ]
    for step in (0, 4, 11):
        b = one.batch(step)
        np.testing.assert_array_equal(b["image"], again.batch(step)["image"])
        joined = np.concatenate([_ids(h.batch(step)) for h in hosts])
        np.testing.assert_array_equal(joined, _ids(b))
        assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
        # Image content still matches its caption (pixel value i <-> caption i).
        np.testing.assert_allclose(b["image"][:, 0, 0, 0], _ids(b) / 127.5 - 1.0, atol=1e-6)


def test_worker_threads_give_the_same_batches_and_skip_counts():
    src = ListSource(29, corrupt=(3, 17))
    kw = dict(global_batch=8, image_size=16, seed=1, crop_scale=(0.5, 1.0), flip=True)
    serial = image_text.PretrainBatches(src, WordTokenizer(), **kw)
    threaded = image_text.PretrainBatches(src, WordTokenizer(), num_workers=4, **kw)
    for step in range(8):  # over two epochs: corrupt images are met and replaced
        a, b = serial.batch(step), threaded.batch(step)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["text"], b["text"])
    met = sum(serial.index_at(p)[1] in (3, 17) for p in range(8 * 8))
    assert met >= 4 and serial.skipped == threaded.skipped == met


def test_each_epoch_is_a_permutation_and_epochs_differ():
    src = ListSource(24)
    p = image_text.PretrainBatches(src, WordTokenizer(), global_batch=8, image_size=8, seed=0)
    epoch0 = np.concatenate([_ids(p.batch(s)) for s in range(3)])
    epoch1 = np.concatenate([_ids(p.batch(s)) for s in range(3, 6)])
    assert sorted(epoch0) == list(range(24)) and sorted(epoch1) == list(range(24))
    assert not np.array_equal(epoch0, epoch1)


def test_corrupt_images_are_skipped_and_counted():
    corrupt = {1, 5, 6}
    src = ListSource(12, corrupt=corrupt)
    p = image_text.PretrainBatches(src, WordTokenizer(), global_batch=12, image_size=8, seed=0)
    b = p.batch(0)
    ids = _ids(b)
    assert b["image"].shape[0] == 12
    assert not set(ids.tolist()) & corrupt
    assert p.skipped == len(corrupt)
    np.testing.assert_allclose(b["image"][:, 0, 0, 0], ids / 127.5 - 1.0, atol=1e-6)


def test_decompression_bomb_refused():
    with pytest.raises(image_text.CorruptImageError, match="max_pixels"):
        image_text.decode_image(_png(7, size=64), max_pixels=64 * 63)
    assert image_text.decode_image(_png(7, size=64), max_pixels=64 * 64).shape == (64, 64, 3)


def test_all_corrupt_source_raises_clearly():
    src = ListSource(4, corrupt={0, 1, 2, 3})
    p = image_text.PretrainBatches(
        src, WordTokenizer(), global_batch=2, image_size=8, seed=0, max_substitutes=3
    )
    with pytest.raises(RuntimeError, match="undecodable"):
        p.batch(0)


def test_eval_batches_pad_and_mask_consistently_across_hosts():
    src = ListSource(10, corrupt={3})
    per_host = [
        list(
            image_text.eval_batches(
                src, WordTokenizer(), batch_size=4, image_size=8, process_index=h, process_count=2
            )
        )
        for h in range(2)
    ]
    assert len(per_host[0]) == len(per_host[1]) == 3
    index = np.concatenate(
        [np.concatenate([per_host[h][b]["index"] for h in range(2)]) for b in range(3)]
    )
    mask = np.concatenate(
        [np.concatenate([per_host[h][b]["mask"] for h in range(2)]) for b in range(3)]
    )
    np.testing.assert_array_equal(index, list(range(10)) + [-1, -1])
    np.testing.assert_array_equal(mask, [i < 10 and i != 3 for i in range(12)])


def test_prefetch_preserves_order_and_propagates_errors():
    got = list(prefetch(lambda s: s * s, 2, 7))
    assert got == [(s, s * s) for s in range(2, 7)]

    def boom(step):
        if step == 3:
            raise KeyError("bad step")
        return step

    with pytest.raises(KeyError, match="bad step"):
        list(prefetch(boom, 0, 10))
