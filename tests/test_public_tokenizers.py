"""The tokenizers of public checkpoints, each equal to its source library on fixed captions.

- CLIP's BPE (`ClipBpeTokenizer`) against open_clip's `tokenize` and Hugging Face's
  `CLIPTokenizer` (a `tokenizers` backend built from the same vocabulary and merges).
- A SentencePiece model without BOS, in the T5 layout SigLIP's `c4_en` vocabulary uses (pad 0,
  EOS 1, unk 2), against Hugging Face's `T5Tokenizer` and against big_vision's conventions
  re-derived here with the sentencepiece processor itself (EOS appended and kept last when
  truncating; SigLIP pads with the EOS id).
"""

import gzip

import numpy as np
import pytest
import sentencepiece as spm
from conftest import train_t5_layout_spm

from rovit_jax.config_check import ConfigError
from rovit_jax.data import tokenizer as tk
from rovit_jax.pretrain_settings import TokenizerSettings

CAPTIONS = [
    "a photo of a cat.",
    "Hello, World!! It's what they'd've done; don't",
    "CAFÉ naïve résumé — über 10% off",
    "emoji 🐱🚀 and 中文字符 and ünïcödé",
    "   spaces\tand\nnewlines  ",
    "1234567890 3.14159 !( ?!",
    "",
    "a very long caption " * 30,
]
# open_clip also fixes mojibake (ftfy) and unescapes HTML entities; Hugging Face's fast CLIP
# tokenizer does neither, so these are compared with open_clip only.
CLEANED_ONLY_BY_OPEN_CLIP = ["&amp; html &lt;b&gt;", "mojibake: cafÃ©", "<start_of_text> x"]


@pytest.fixture(scope="module")
def clip():
    return tk.ClipBpeTokenizer(max_len=77)


@pytest.mark.parametrize("context", [77, 8])
def test_clip_bpe_equals_open_clip(context):
    import open_clip

    texts = CAPTIONS + CLEANED_ONLY_BY_OPEN_CLIP
    ours = tk.ClipBpeTokenizer(max_len=context).encode(texts)
    ref = open_clip.tokenize(texts, context_length=context).numpy()
    assert ours.dtype == np.int32 and ours.shape == ref.shape == (len(texts), context)
    np.testing.assert_array_equal(ours, ref)
    long = len(CAPTIONS) - 1  # truncated, it still ends with end-of-text
    assert ours[long, -1] == 49407 and ours[long, 0] == 49406


def test_clip_bpe_equals_hugging_face_tokenizers(clip):
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    # Hugging Face's vocabulary is open_clip's with its names for the two special tokens.
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in SimpleTokenizer().encoder.items()}
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    hf = CLIPTokenizer(vocab=vocab, merges=[tuple(line.split()) for line in lines])
    assert type(hf.backend_tokenizer).__module__.startswith("tokenizers")
    ref = hf(CAPTIONS, max_length=77, truncation=True)["input_ids"]  # unpadded
    ours = clip.encode(CAPTIONS)
    for text, want, got in zip(CAPTIONS, ref, ours):
        assert got[: len(want)].tolist() == want, text
        assert not got[len(want) :].any()  # open_clip's padding: 0 (Hugging Face pads with EOT)
    np.testing.assert_array_equal(clip.lengths(CAPTIONS[:-1]), [len(r) for r in ref[:-1]])
    assert clip.lengths(CAPTIONS[-1:])[0] > 77  # untruncated


def test_clip_bpe_decode_and_vocabulary(clip):
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    ids = clip.encode(CAPTIONS[:6])
    for row in ids.tolist():
        body = row[1 : row.index(49407)]
        assert clip.decode(row) == [ref.decode(body).strip()]
    assert clip.vocab_size == 49408 == len(ref.encoder)
    assert [clip.piece(i) for i in (0, 256, 320, 49406)] == [
        ref.decoder[i] for i in (0, 256, 320, 49406)
    ]


def test_clip_bpe_refuses_a_file_that_is_not_clips_merges(tmp_path):
    bad = tmp_path / "merges.txt.gz"
    bad.write_bytes(gzip.compress(b"#version\na b\n"))
    with pytest.raises(ValueError, match="not CLIP's merges file"):
        tk.ClipBpeTokenizer(str(bad))
    with pytest.raises(FileNotFoundError, match="no_such.gz"):
        tk.ClipBpeTokenizer(str(tmp_path / "no_such.gz"))


# ---- SentencePiece without BOS (T5 / SigLIP c4_en layout) ----------------------------------------
@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5")
    train_t5_layout_spm(folder)
    return folder


T5_TEXTS = [
    "A photo of a CAT.",
    "Hello, World!!",
    "CAFÉ naïve résumé",
    "the quick brown fox jumps over the lazy dog and the cat " * 3,
    "",
]


def test_sentencepiece_without_bos_equals_hugging_face_t5(t5_dir):
    from transformers import T5Tokenizer

    path = str(t5_dir / "spiece.model")
    ours = tk.SentencePieceTokenizer(path, 16, add_eos=True, lowercase=False)
    assert not ours.add_bos and ours.pad_id == 0  # no BOS piece: none added; the model's pad
    hf = T5Tokenizer.from_pretrained(str(t5_dir), extra_ids=0)
    ref = hf(T5_TEXTS, max_length=16, truncation=True, padding="max_length")["input_ids"]
    np.testing.assert_array_equal(ours.encode(T5_TEXTS), ref)


def test_sentencepiece_siglip_convention_rederived(t5_dir):
    """big_vision's tokenize(eos="sticky", pad_value=1): pieces + EOS, the last id forced to EOS
    when truncated, padded with the EOS id; texts as they are (case kept)."""
    path = str(t5_dir / "spiece.model")
    raw = spm.SentencePieceProcessor(model_file=path)
    ours = tk.SentencePieceTokenizer(path, 12, add_eos=True, lowercase=False, pad_id=1)
    got = ours.encode(T5_TEXTS)
    for text, row in zip(T5_TEXTS, got):
        ids = raw.encode(text) + [1]
        ids = ids[:12]
        ids[-1] = 1
        np.testing.assert_array_equal(row, ids + [1] * (12 - len(ids)), err_msg=text)
    np.testing.assert_array_equal(
        ours.lengths(T5_TEXTS), [len(raw.encode(t)) + 1 for t in T5_TEXTS]
    )
    assert ours.decode(got) == [raw.decode([i for i in row if i != 1]) for row in got.tolist()]
    assert "Photo" in ours.decode(ours.encode(["A Photo"]))[0]  # case kept


def test_sentencepiece_refusals_name_the_model(t5_dir):
    path = str(t5_dir / "spiece.model")
    with pytest.raises(ValueError, match=r"spiece.model has no BOS piece.*add_bos=False"):
        tk.SentencePieceTokenizer(path, 8, add_bos=True)
    with pytest.raises(ValueError, match=r"pad id 5 is not the pad or EOS piece of model .*spiece"):
        tk.SentencePieceTokenizer(path, 8, pad_id=5)


def test_make_tokenizer_builds_each_kind(t5_dir):
    t5 = TokenizerSettings(
        max_len=16,
        kind="sentencepiece",
        model_path=str(t5_dir / "spiece.model"),
        add_eos=True,
        lowercase=False,
        pad_id=1,
    )
    tok = tk.make_tokenizer(t5)
    assert isinstance(tok, tk.SentencePieceTokenizer) and (tok.add_bos, tok.pad_id) == (False, 1)
    clip = tk.make_tokenizer(TokenizerSettings(max_len=77, kind="clip_bpe"))
    assert isinstance(clip, tk.ClipBpeTokenizer) and clip.model_path == tk.open_clip_vocab_file()
    assert isinstance(tok, tk.Tokenizer) and isinstance(clip, tk.Tokenizer)


def _clip_pretrain_config(**text):
    from rovit_jax.pretrain_config import pretrain_defaults

    c = pretrain_defaults()
    c.tokenizer.kind, c.tokenizer.max_len, c.tokenizer.vocab_size = "clip_bpe", 77, 49408
    c.model.text.update({"causal": True, "pool_type": "eos", "mask_padding": False, **text})
    return c


def test_config_refuses_a_clip_tokenizer_with_a_masking_tower():
    from rovit_jax.tasks.pretrain import validate_config

    validate_config(_clip_pretrain_config(), check_files=False)
    with pytest.raises(ConfigError, match=r"model.text.mask_padding.*'!'"):
        validate_config(_clip_pretrain_config(mask_padding=True), check_files=False)
    c = _clip_pretrain_config()
    c.tokenizer.kind = "sentencepiece"
    with pytest.raises(ConfigError, match=r"model.text.pool_type.*clip_bpe"):
        validate_config(c, check_files=False)
