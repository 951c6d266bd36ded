"""Text tokenization: one `Tokenizer` interface over SentencePiece models and CLIP's BPE.

Every tokenizer turns N texts into int32 [N, max_len]: truncated to `max_len` and right-padded
with `pad_id`. What goes around the pieces depends on the vocabulary's convention:

- "sentencepiece" (`SentencePieceTokenizer`): this project's own models (pad 0, BOS 1, EOS 2,
  unk 3; texts lower-cased; BOS first, no EOS), or public ones such as T5's / SigLIP's `c4_en`
  (no BOS: pad 0, EOS 1, unk 2), where big_vision appends EOS, keeps it when truncating ("sticky")
  and pads with the EOS id (`pad_value=1`) for SigLIP. BOS, EOS, lower-casing and the pad id are
  settings (`tokenizer.*`).
- "clip_bpe" (`ClipBpeTokenizer`): the byte-level BPE of OpenAI's CLIP and open_clip
  (49,408 ids; start-of-text 49406, end-of-text 49407, padding 0), cleaned and lower-cased as
  open_clip does; a truncated sequence still ends with end-of-text.

`make_tokenizer(settings)` builds the one a run's `tokenizer.*` section names.
"""

from __future__ import annotations

import collections
import functools
import gzip
import html
import math
import os
import re
import tempfile
import unicodedata
from typing import Any, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np
import sentencepiece as spm

from rovit_jax import paths

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3  # this project's own SentencePiece models
TOKENIZER_KINDS = ("sentencepiece", "clip_bpe")
_MAX_PIECE_LENGTH = 16
_SEED_PIECES = 1_000_000


@runtime_checkable
class Tokenizer(Protocol):
    """Text to fixed-length id arrays and back."""

    vocab_size: int
    max_len: int
    pad_id: int

    model_path: str  # the vocabulary file ("" where there is none)
    convention: str  # what `encode` does, in words (recorded in exports)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [N, max_len]: the texts' ids, truncated to max_len, padded with pad_id."""
        ...

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        """int [N]: each text's untruncated length in ids, special ids included."""
        ...

    def decode(self, ids: Any) -> list[str]:
        """Texts of int ids [N, L] (or one sequence [L]); pad/BOS/EOS ids are dropped."""
        ...


def make_tokenizer(settings: Any, *, model_path: str | None = None) -> Tokenizer:
    """The tokenizer a `tokenizer.*` section describes (`TokenizerSettings`).

    `model_path` overrides `settings.model_path` (e.g. a model found beside a dataset).
    """
    path = settings.model_path if model_path is None else model_path
    if settings.kind == "clip_bpe":
        return ClipBpeTokenizer(path or None, settings.max_len)
    if settings.kind != "sentencepiece":
        raise ValueError(f"tokenizer.kind must be one of {TOKENIZER_KINDS}, got {settings.kind!r}")
    if not path:
        raise ValueError("config key `tokenizer.model_path` is required (a SentencePiece .model)")
    return SentencePieceTokenizer(
        path,
        settings.max_len,
        add_bos=None if settings.add_bos == "auto" else bool(settings.add_bos),
        add_eos=settings.add_eos,
        lowercase=settings.lowercase,
        pad_id=settings.pad_id,
    )


def _as_str(text: str | bytes) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else text


def _normalise(text: str | bytes) -> str:
    return unicodedata.normalize("NFKC", _as_str(text)).lower()


def _check_texts(texts: Sequence[str]) -> None:
    if isinstance(texts, (str, bytes)):
        raise ValueError(
            "texts must be a sequence of strings, not a single string; wrap it in "
            f"a list: [{texts!r}]"
        )


def _check_max_len(max_len: Any) -> int:
    if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
        raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
    return int(max_len)


def _pad_rows(rows: Sequence[Sequence[int]], max_len: int, pad_id: int) -> np.ndarray:
    out = np.full((len(rows), max_len), pad_id, dtype=np.int32)
    for i, ids in enumerate(rows):
        out[i, : len(ids)] = ids
    return out


def _ids_array(ids: Any, vocab_size: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"ids must be integers of shape [N, L] or [L], got {arr.dtype} {arr.shape}"
        )
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"ids must lie in [0, {vocab_size}), got range [{arr.min()}, {arr.max()}]")
    return arr


class SentencePieceTokenizer:
    """`Tokenizer` over a SentencePiece model.

    A sequence is [BOS] + pieces + [EOS], truncated to `max_len` (an EOS stays last: big_vision's
    "sticky" EOS), then padded with `pad_id`.
    """

    def __init__(
        self,
        model_path: str,
        max_len: int,
        *,
        add_bos: bool | None = None,
        add_eos: bool = False,
        lowercase: bool = True,
        pad_id: int | None = None,
    ):
        """Loads the model.

        Args:
          model_path: path or URL (`gs://...`) of a `.model` file.
          max_len: output length L of `encode` (BOS and EOS included), >= 1.
          add_bos: start with the model's BOS piece; None: when the model has one.
          add_eos: end with the model's EOS piece (T5 / SigLIP convention).
          lowercase: NFKC-normalise and lower-case texts first (this project's models); False
            hands texts to the model as they are (its own normaliser still applies).
          pad_id: padding id; None: the model's pad piece. Only the pad piece or the EOS piece
            (big_vision's `pad_value=1` for T5 vocabularies) may pad: any other id is one that
            a text can produce, so padding could not be told from text.
        """
        self.max_len = _check_max_len(max_len)
        if not paths.isfile(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self._sp = spm.SentencePieceProcessor(model_proto=paths.read_bytes(model_path))
        self.model_path = str(model_path)
        self.vocab_size = int(self._sp.get_piece_size())
        self.bos_id, self.eos_id = int(self._sp.bos_id()), int(self._sp.eos_id())
        self.add_bos = self.bos_id >= 0 if add_bos is None else bool(add_bos)
        self.add_eos = bool(add_eos)
        for wanted, piece, key in (
            (self.add_bos, self.bos_id, "BOS"),
            (add_eos, self.eos_id, "EOS"),
        ):
            if wanted and piece < 0:
                raise ValueError(
                    f"model {model_path} has no {key} piece ({key.lower()}_id=-1); set "
                    f"tokenizer.add_{key.lower()}=False"
                )
        model_pad = int(self._sp.pad_id())
        self.pad_id = model_pad if pad_id is None else int(pad_id)
        allowed = {i for i in (model_pad, self.eos_id) if i >= 0}
        if self.pad_id not in allowed:
            raise ValueError(
                f"pad id {self.pad_id} is not the pad or EOS piece of model {model_path} "
                f"(pad_id={model_pad}, eos_id={self.eos_id}): texts could produce it"
            )
        self.lowercase = bool(lowercase)

    @property
    def convention(self) -> str:
        return (
            ("NFKC, lower-cased; " if self.lowercase else "")
            + ("BOS first" if self.add_bos else "no BOS")
            + ("; EOS last (kept when truncating)" if self.add_eos else ", no EOS")
            + f"; truncated to max_len; padded with pad_id ({self.pad_id})"
        )

    def _sequences(self, texts: Sequence[str]) -> list[list[int]]:
        """[BOS] + pieces + [EOS] of each text, untruncated."""
        _check_texts(texts)
        clean = [_normalise(t) if self.lowercase else _as_str(t) for t in texts]
        bos, eos = [self.bos_id] * self.add_bos, [self.eos_id] * self.add_eos
        return [bos + list(pieces) + eos for pieces in self._sp.encode(clean, out_type=int)]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes N texts to int32 [N, max_len]."""
        rows = []
        for ids in self._sequences(texts):
            if len(ids) > self.max_len:
                ids = ids[: self.max_len]
                if self.add_eos:
                    ids[-1] = self.eos_id
            rows.append(ids)
        return _pad_rows(rows, self.max_len, self.pad_id)

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray([len(ids) for ids in self._sequences(texts)], np.int64)

    def decode(self, ids: Any) -> list[str]:
        """Decodes int ids [N, L] (or a single sequence [L]) to N strings."""
        arr = _ids_array(ids, self.vocab_size)
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


# ---- CLIP's byte-level BPE ----------------------------------------------------------------------
CLIP_VOCAB_SIZE = 49408
CLIP_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # the merges file OpenAI's CLIP released
_CLIP_MERGES = CLIP_VOCAB_SIZE - 256 * 2 - 2  # after the byte pieces, before the two specials
_CLIP_SPECIALS = ("<start_of_text>", "<end_of_text>")


@functools.lru_cache(maxsize=1)
def _byte_pieces() -> dict[int, str]:
    """Byte -> printable character: printable Latin-1 bytes map to themselves, the others to
    code points from 256 on (the GPT-2 / CLIP convention, so no piece holds a space or control
    character). The order is the vocabulary's: the printable bytes first, then the others."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def open_clip_vocab_file() -> str | None:
    """The CLIP merges file packaged with open_clip (`open_clip_torch`), when installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], CLIP_VOCAB_FILE)
    return path if os.path.isfile(path) else None


class ClipBpeTokenizer:
    """`Tokenizer` for OpenAI CLIP / open_clip text towers: [SOT] + BPE pieces + [EOT], truncated
    to `max_len` with EOT kept last, padded with 0.

    Texts are cleaned as open_clip does: `ftfy.fix_text`, HTML entities unescaped (twice), runs
    of white space collapsed, lower-cased. Id 0 (the piece "!") doubles as padding, so a text
    tower reading these ids must not mask from the first 0 (`model.text.mask_padding=False`);
    CLIP's causal tower pools the end-of-text token (`pool_type="eos"`).
    """

    def __init__(self, vocab_path: str | None = None, max_len: int = 77):
        """Args:
        vocab_path: CLIP's merges file (`bpe_simple_vocab_16e6.txt.gz`), local or a URL; None:
          the copy packaged with open_clip.
        max_len: output length (CLIP: 77).
        """
        import ftfy  # noqa: F401 - fail early, naming the missing package
        import regex

        self.max_len = _check_max_len(max_len)
        if not vocab_path:
            vocab_path = open_clip_vocab_file()
            if vocab_path is None:
                raise FileNotFoundError(
                    f"no CLIP vocabulary: set tokenizer.model_path to CLIP's {CLIP_VOCAB_FILE} "
                    "or install open_clip_torch, which packages it"
                )
        if not paths.isfile(vocab_path):
            raise FileNotFoundError(f"CLIP vocabulary file not found: {vocab_path}")
        self.model_path = str(vocab_path)
        lines = gzip.decompress(paths.read_bytes(vocab_path)).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + _CLIP_MERGES]]
        if len(merges) != _CLIP_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(
                f"{vocab_path} is not CLIP's merges file: expected {_CLIP_MERGES} merge lines "
                "after a header"
            )
        singles = list(_byte_pieces().values())
        pieces = singles + [p + "</w>" for p in singles] + ["".join(m) for m in merges]
        pieces += list(_CLIP_SPECIALS)
        self._ids = {p: i for i, p in enumerate(pieces)}
        self._pieces = pieces
        self._ranks = {m: i for i, m in enumerate(merges)}
        # The special tokens written in a text are the special ids (as in open_clip).
        self._cache = {t: [self._ids[t]] for t in _CLIP_SPECIALS}
        self._split = regex.compile(
            "|".join(_CLIP_SPECIALS)
            + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.vocab_size = len(pieces)
        self.sot_id, self.eot_id = self._ids[_CLIP_SPECIALS[0]], self._ids[_CLIP_SPECIALS[1]]
        self.bos_id, self.eos_id = self.sot_id, self.eot_id
        self.pad_id = 0

    @staticmethod
    def clean(text: str | bytes) -> str:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(_as_str(text)))).strip()
        return re.sub(r"\s+", " ", text).strip().lower()

    def _word_ids(self, word: str) -> list[int]:
        """BPE of one pre-token (already byte-mapped): merges the best-ranked adjacent pair, left
        to right wherever it occurs, until no pair has a rank."""
        if word in self._cache:
            return self._cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self._ranks.get(pair, math.inf))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self._ids[p] for p in parts]
        self._cache[word] = ids
        return ids

    def pieces_of(self, text: str | bytes) -> list[int]:
        """The BPE ids of one text, without SOT / EOT."""
        table = _byte_pieces()
        ids: list[int] = []
        for token in self._split.findall(self.clean(text)):
            ids += self._word_ids("".join(table[b] for b in token.encode("utf-8")))
        return ids

    convention = (
        "CLIP: ftfy-fixed, HTML entities unescaped, white space collapsed, lower-cased; "
        "start-of-text first, end-of-text last (kept when truncating); padded with 0"
    )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encodes N texts to int32 [N, max_len]."""
        _check_texts(texts)
        rows = []
        for text in texts:
            ids = [self.sot_id, *self.pieces_of(text), self.eot_id]
            if len(ids) > self.max_len:
                ids = ids[: self.max_len]
                ids[-1] = self.eot_id
            rows.append(ids)
        return _pad_rows(rows, self.max_len, self.pad_id)

    def lengths(self, texts: Sequence[str]) -> np.ndarray:
        _check_texts(texts)
        return np.asarray([len(self.pieces_of(t)) + 2 for t in texts], np.int64)

    def piece(self, token_id: int) -> str:
        """The piece string of one id (e.g. "cat</w>")."""
        return self._pieces[int(token_id)]

    def decode(self, ids: Any) -> list[str]:
        """Texts of ids [N, L] (or [L]): the pieces up to the first EOT, SOT dropped."""
        arr = _ids_array(ids, self.vocab_size)
        bytes_of = {c: b for b, c in _byte_pieces().items()}
        out = []
        for row in arr.tolist():
            row = row[: row.index(self.eot_id)] if self.eot_id in row else row
            chars = "".join(self._pieces[i] for i in row if i != self.sot_id)
            text = bytes(bytes_of[c] for c in chars if c in bytes_of).decode("utf-8", "replace")
            out.append(text.replace("</w>", " ").strip())
        return out

    def __repr__(self) -> str:
        return f"ClipBpeTokenizer({self.model_path!r}, max_len={self.max_len})"


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
