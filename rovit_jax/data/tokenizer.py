"""Text tokenization: one `Tokenizer` interface, backed by SentencePiece.

Conventions shared by the whole project: text is lower-cased, every sequence starts with BOS,
there is no EOS, sequences are truncated to `max_len` and right-padded with `pad_id == 0`.
"""

from __future__ import annotations

import collections
import os
import re
import tempfile
import unicodedata
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import sentencepiece as spm

from rovit_jax import paths

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_MAX_PIECE_LENGTH = 16
_SEED_PIECES = 1_000_000


@runtime_checkable
class Tokenizer(Protocol):
    """Text to fixed-length id arrays and back."""

    vocab_size: int
    max_len: int
    pad_id: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [N, max_len]: lower-cased, BOS first, no EOS, truncated, padded with pad_id."""
        ...

    def decode(self, ids: Any) -> list[str]:
        """Texts of int ids [N, L] (or one sequence [L]); pad/BOS/EOS ids are dropped."""
        ...


def _normalise(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    return unicodedata.normalize("NFKC", text).lower()


class SentencePieceTokenizer:
    """`Tokenizer` over a SentencePiece model whose pad id is 0 and which has a BOS piece."""

    def __init__(self, model_path: str, max_len: int):
        """Loads the model.

        Args:
          model_path: path or URL (`gs://...`) of a `.model` file.
          max_len: output length L of `encode` (BOS included), >= 1.
        """
        if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
            raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
        if not paths.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self._sp = spm.SentencePieceProcessor(model_proto=paths.read_bytes(model_path))
        if self._sp.pad_id() != PAD_ID:
            raise ValueError(
                f"model {model_path} has pad_id={self._sp.pad_id()}; this project pads with id 0, "
                "so the model must be trained with pad_id=0 (see train_sentencepiece)"
            )
        if self._sp.bos_id() < 0:
            raise ValueError(f"model {model_path} has no BOS piece (bos_id=-1); one is required")
        self.model_path = str(model_path)
        self.max_len = int(max_len)
        self.pad_id = PAD_ID
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.vocab_size = int(self._sp.get_piece_size())

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes N texts to int32 [N, max_len] (BOS, pieces..., then 0s)."""
        if isinstance(texts, (str, bytes)):
            raise ValueError(
                "texts must be a sequence of strings, not a single string; wrap it in "
                f"a list: [{texts!r}]"
            )
        pieces = self._sp.encode([_normalise(t) for t in texts], out_type=int)
        out = np.full((len(pieces), self.max_len), self.pad_id, dtype=np.int32)
        for row, ids in enumerate(pieces):
            ids = [self.bos_id, *ids][: self.max_len]
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Any) -> list[str]:
        """Decodes int ids [N, L] (or a single sequence [L]) to N strings."""
        arr = np.asarray(ids)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"ids must be integers of shape [N, L] or [L], got {arr.dtype} {arr.shape}"
            )
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(
                f"ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]"
            )
        special = {self.pad_id, self.bos_id, self.eos_id}
        rows = [[int(i) for i in row if int(i) not in special] for row in arr]
        return list(self._sp.decode(rows))

    def piece(self, token_id: int) -> str:
        """The piece string of one id (e.g. "▁circle")."""
        return self._sp.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return (
            f"SentencePieceTokenizer({self.model_path!r}, max_len={self.max_len}, "
            f"vocab_size={self.vocab_size})"
        )


def _seed_pieces(texts: Sequence[str]) -> list[tuple[str, int]]:
    """Candidate pieces for unigram training, [(piece, frequency * length)], best first.

    Every substring (up to 16 characters) of each run of letters or digits inside a word, the
    word-initial ones with the "▁" prefix, weighted by how often it occurs. SentencePiece's own
    suffix-array seeding (0.2.x) only proposes substrings that are followed by different
    characters, so a word always followed by a space (e.g. a colour before its noun) never becomes
    a piece; giving the seeds explicitly avoids that.
    """
    words = collections.Counter(w for t in texts for w in t.split())
    counts: collections.Counter[str] = collections.Counter()
    for word, n in words.items():
        for run in re.finditer(r"[^\W\d_]+|\d+", word):
            s = ("\u2581" if run.start() == 0 else "") + run.group()
            for i in range(len(s)):
                for j in range(i + 2, min(len(s), i + _MAX_PIECE_LENGTH) + 1):
                    counts[s[i:j]] += n
    scored = [(p, f * len(p)) for p, f in counts.items()]
    scored.sort(key=lambda x: (-x[1], x[0]))
    return scored[:_SEED_PIECES]


def train_sentencepiece(texts: Iterable[str], model_prefix: str, *, vocab_size: int = 512) -> str:
    """Trains a lower-casing unigram SentencePiece model; returns the `.model` path.

    Ids: pad 0, BOS 1, EOS 2, unk 3. `hard_vocab_limit=False`, so a small corpus yields fewer than
    `vocab_size` pieces instead of failing. Deterministic (single thread, no sampling). The corpus
    is held in memory.

    Args:
      texts: training sentences (str or UTF-8 bytes).
      model_prefix: output prefix, local or a URL (`gs://...`); writes `<prefix>.vocab`, then
        `<prefix>.model` (each all-or-nothing; parent folders are created).
      vocab_size: maximum number of pieces (>= 8).
    """
    if (
        isinstance(vocab_size, bool)
        or not isinstance(vocab_size, (int, np.integer))
        or vocab_size < 8
    ):
        raise ValueError(f"vocab_size must be an integer >= 8, got {vocab_size!r}")
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be an iterable of sentences, not a single string")
    corpus = [t for t in (_normalise(x) for x in texts) if t.strip()]
    if not corpus:
        raise ValueError("texts is empty: nothing to train a tokenizer on")
    # SentencePiece only writes local files: it trains in a private folder, and the results are
    # then copied to `model_prefix`, the model last (its presence means the pair is complete).
    with tempfile.TemporaryDirectory() as tmp:
        seed_file = os.path.join(tmp, "seed_pieces.tsv")
        with open(seed_file, "w", encoding="utf-8") as f:
            f.writelines(f"{piece}\t{score}\n" for piece, score in _seed_pieces(corpus))
        local_prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus),
            model_prefix=local_prefix,
            model_type="unigram",
            vocab_size=int(vocab_size),
            hard_vocab_limit=False,
            normalization_rule_name="nmt_nfkc_cf",  # NFKC + case folding
            character_coverage=1.0,
            pad_id=PAD_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            max_sentencepiece_length=_MAX_PIECE_LENGTH,
            seed_sentencepieces_file=seed_file,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
        for suffix in (".vocab", ".model"):
            with open(local_prefix + suffix, "rb") as f:
                paths.write_bytes(model_prefix + suffix, f.read())
    return model_prefix + ".model"


def _train_captions(builder: Any) -> list[str]:
    import tensorflow_datasets as tfds  # heavy; only needed to read the built dataset

    source = builder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()})
    return [_normalise(source[i]["caption"]) for i in range(len(source))]


def shapes_tokenizer(
    builder: Any, *, max_len: int = 32, vocab_size: int = 512
) -> SentencePieceTokenizer:
    """Tokenizer for a built shapes-world dataset, trained once on its train captions.

    The model is cached beside the dataset files, in `<builder.data_dir>/tokenizer/`; later calls
    (and other processes) load it from there. Processes that train it at the same time write
    the same (deterministic) bytes, each all-or-nothing, so a reader never sees a partial file.

    Args:
      builder: a prepared shapes-world tfds builder (see shapes_tfds.build_shapes_world).
      max_len: tokenizer output length.
      vocab_size: maximum number of pieces (the captions' vocabulary is far smaller).
    """
    if not builder.is_prepared():
        raise ValueError(
            f"dataset {builder.info.full_name} is not built under "
            f"{builder.data_dir}; call build_shapes_world first"
        )
    prefix = os.path.join(os.fspath(builder.data_dir), "tokenizer", f"unigram_{vocab_size}")
    model = prefix + ".model"
    if not paths.isfile(model):
        # Category names are added so every category word is a piece even for tiny builds.
        names = [c["name"] for c in builder.info.metadata.get("categories", [])]
        train_sentencepiece(_train_captions(builder) + names, prefix, vocab_size=vocab_size)
    return SentencePieceTokenizer(model, max_len)
