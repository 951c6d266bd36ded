"""Tests for the SentencePiece tokenizer wrapper, its trainer and the shapes-world tokenizer."""

import os
import re

import numpy as np
import pytest
import sentencepiece as spm

from rovit_jax.data import shapes_world as sw
from rovit_jax.data import tokenizer as tk


def _captions(n: int, start: int = 0) -> list[str]:
    return [
        sw.render_scene(np.random.default_rng(i), 32)["caption"] for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    corpus = _captions(300) + ["The Quick brown fox jumps over the lazy dog 12 times!"]
    prefix = str(tmp_path_factory.mktemp("spm") / "nested" / "caps")
    path = tk.train_sentencepiece(corpus, prefix, vocab_size=256)
    assert path == prefix + ".model" and os.path.exists(path)
    return path


@pytest.fixture(scope="module")
def raw(model_path):
    """The plain SentencePiece processor, as an independent reference."""
    return spm.SentencePieceProcessor(model_file=model_path)


def test_special_ids(raw):
    assert (raw.pad_id(), raw.bos_id(), raw.eos_id(), raw.unk_id()) == (0, 1, 2, 3)
    assert raw.get_piece_size() <= 256


def test_encode_shape_bos_and_padding(model_path, raw):
    tok = tk.SentencePieceTokenizer(model_path, max_len=24)
    assert isinstance(tok, tk.Tokenizer)
    assert tok.pad_id == 0 and tok.max_len == 24 and tok.vocab_size == raw.get_piece_size()
    texts = ["a red circle.", "two blue stars and a white cross.", ""]
    ids = tok.encode(texts)
    assert ids.dtype == np.int32 and ids.shape == (3, 24)
    assert np.all(ids[:, 0] == 1)
    assert not np.any(ids == 2)  # no EOS
    for row, text in zip(ids, texts):
        expected = [1] + raw.encode(text)
        np.testing.assert_array_equal(row[: len(expected)], expected)
        assert np.all(row[len(expected) :] == 0)
    np.testing.assert_array_equal(ids[2], [1] + [0] * 23)


def test_truncation(model_path, raw):
    tok = tk.SentencePieceTokenizer(model_path, max_len=8)
    text = "a photo of a red circle, two blue stars and a yellow heart on a striped background."
    ids = tok.encode([text])
    assert ids.shape == (1, 8)
    full = [1] + raw.encode(text)
    assert len(full) > 8
    np.testing.assert_array_equal(ids[0], full[:8])
    assert np.all(ids != 0)


def test_lower_casing(model_path):
    tok = tk.SentencePieceTokenizer(model_path, max_len=16)
    np.testing.assert_array_equal(
        tok.encode(["A RED Circle On A Striped BACKGROUND."]),
        tok.encode(["a red circle on a striped background."]),
    )
    assert tok.encode([b"Two BLUE stars"]).tolist() == tok.encode(["two blue stars"]).tolist()


def test_decode_round_trips_captions(model_path):
    tok = tk.SentencePieceTokenizer(model_path, max_len=64)
    captions = _captions(50, start=1000)  # not seen in training
    mixed = [c.upper() if i % 3 == 0 else c for i, c in enumerate(captions)]
    assert tok.decode(tok.encode(mixed)) == [c.lower() for c in mixed]
    assert tok.decode(tok.encode(mixed)[0]) == [captions[0]]  # a single [L] sequence


def test_bad_inputs(model_path, tmp_path):
    missing = str(tmp_path / "does_not_exist.model")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        tk.SentencePieceTokenizer(missing, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        tk.SentencePieceTokenizer(model_path, max_len=0)
    tok = tk.SentencePieceTokenizer(model_path, max_len=8)
    with pytest.raises(ValueError, match="single string"):
        tok.encode("a red circle")
    with pytest.raises(ValueError, match="ids"):
        tok.decode(np.array([[1, tok.vocab_size]]))
    with pytest.raises(ValueError, match="empty"):
        tk.train_sentencepiece([], str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="vocab_size"):
        tk.train_sentencepiece(["a b c"], str(tmp_path / "tiny"), vocab_size=2)


def test_model_without_zero_pad_is_rejected(tmp_path):
    prefix = str(tmp_path / "default_ids")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_captions(50)),
        model_prefix=prefix,
        vocab_size=40,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="pad_id"):
        tk.SentencePieceTokenizer(prefix + ".model", max_len=8)


def test_training_is_deterministic(tmp_path):
    corpus = _captions(120)
    pieces = []
    for name in ("one", "two"):
        sp = spm.SentencePieceProcessor(
            model_file=tk.train_sentencepiece(corpus, str(tmp_path / name), vocab_size=128)
        )
        pieces.append([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())])
    assert pieces[0] == pieces[1]


def test_frequent_words_are_whole_pieces(raw):
    # Words always followed by another ("photo of", "a plain red on") must still come out as single
    # "▁word" pieces.
    for word in ("photo", "plain", "red", "background", "and"):
        assert raw.encode(word, out_type=str) == ["\u2581" + word]


def test_shapes_tokenizer_trains_once_and_covers_category_words(tmp_path):
    from rovit_jax.data import shapes_tfds

    builder = shapes_tfds.shapes_builder(
        str(tmp_path), image_size=32, num_train=40, num_validation=2, num_test=2
    )
    with pytest.raises(ValueError, match="build_shapes_world"):
        tk.shapes_tokenizer(builder)
    builder = shapes_tfds.build_shapes_world(
        str(tmp_path), image_size=32, num_train=40, num_validation=2, num_test=2
    )
    tok = tk.shapes_tokenizer(builder, max_len=16, vocab_size=300)
    assert os.path.dirname(tok.model_path) == os.path.join(str(builder.data_dir), "tokenizer")
    mtime = os.stat(tok.model_path).st_mtime_ns
    again = tk.shapes_tokenizer(builder, max_len=20, vocab_size=300)
    assert again.model_path == tok.model_path and again.max_len == 20
    assert os.stat(tok.model_path).st_mtime_ns == mtime  # loaded from the cache, not retrained
    raw = spm.SentencePieceProcessor(model_file=tok.model_path)
    words = sorted({w for c in sw.CATEGORIES for w in c.name.split()})
    for word in words:
        ids = tok.encode([word])[0]
        assert ids[0] == 1 and np.all(ids[2:] == 0), (word, ids)
        assert raw.id_to_piece(int(ids[1])) == "\u2581" + word
    # The dataset itself still reads fine with the tokenizer folder beside its files.
    source = builder.as_data_source("train")
    captions = [source[i]["caption"].decode() for i in range(len(source))]
    long = tk.SentencePieceTokenizer(tok.model_path, max_len=64)
    assert long.decode(long.encode(captions).tolist()) == captions
