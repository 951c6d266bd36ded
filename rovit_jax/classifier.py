r"""Text classifiers of category vocabularies: compute with a pretrained text tower, save, load.

  python -m rovit_jax.classifier --pretrain_workdir=DIR --vocabulary=lvis --templates=clip \
      --out=lvis_clip

writes `lvis_clip.npy` (float32 [K, E], unit-norm rows in vocabulary order, not padded) and
`lvis_clip.json` (the vocabulary: ids, names, frequencies; the templates; the checkpoint step).
`--vocabulary` is a built-in name (coco, lvis, ov_coco, objects365; see data.vocabularies), a
COCO-format annotation JSON (its "categories"), or a text file with one name per line.

A detection config uses a saved classifier with `--config.text.classifier=lvis_clip` (the prefix):
its names must be the evaluation vocabulary's, in order.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rovit_jax import paths
from rovit_jax.data.categories import Category, CategoryTable
from rovit_jax.detection.text_classifier import PROMPT_ENSEMBLES, build_text_classifier
from rovit_jax.runs import read_pretraining_config


def make_text_embedder(
    pretrain_config, params: Any, tokenizer, *, batch_size: int = 256
) -> Callable[[Sequence[str]], np.ndarray]:
    """texts -> [N, E] unit-norm embeddings with a pretrained text tower (jitted once)."""
    import jax

    from rovit_jax.tasks.pretrain import build_model

    model = build_model(pretrain_config)
    fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.embed_texts))

    def embed(texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            # Pad to a full batch so every call reuses one compiled shape.
            tokens = tokenizer.encode(chunk + [""] * (batch_size - len(chunk)))
            out.append(np.asarray(fn(params, tokens))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    return embed


def read_vocabulary(spec: str) -> CategoryTable:
    """A built-in vocabulary name, a COCO-format JSON path or a one-name-per-line text file."""
    from rovit_jax.data import vocabularies

    if spec in vocabularies.VOCABULARY_NAMES:
        return vocabularies.vocabulary(spec)
    if not paths.isfile(spec):
        raise FileNotFoundError(
            f"vocabulary {spec!r} is neither a built-in name {vocabularies.VOCABULARY_NAMES} "
            "nor an existing file"
        )
    if spec.endswith(".json"):
        from rovit_jax.data.coco import load_json

        return CategoryTable.from_coco_json(load_json(spec, "vocabulary JSON"))
    names = [line.strip() for line in paths.read_text(spec).splitlines() if line.strip()]
    if not names:
        raise ValueError(f"vocabulary file {spec} holds no names")
    return CategoryTable(tuple(Category(i + 1, n) for i, n in enumerate(names)))


def save_classifier(prefix: str, embeddings: np.ndarray, meta: dict[str, Any]) -> None:
    """Writes `<prefix>.npy` (float32 [K, E]) and `<prefix>.json` (meta with "names").

    `prefix` may be local or a bucket URL; each file is written all-or-nothing.
    """
    if len(meta["names"]) != len(embeddings):
        raise ValueError(f"{len(meta['names'])} names for {len(embeddings)} embeddings")
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(embeddings, np.float32))
    paths.write_bytes(prefix + ".npy", buffer.getvalue())
    paths.write_json(prefix + ".json", meta, indent=1, ensure_ascii=False)


def load_classifier(prefix: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(embeddings float32 [K, E], meta) from `save_classifier`'s files; clear errors."""
    for ext in (".npy", ".json"):
        if prefix.endswith(ext):
            prefix = prefix[: -len(ext)]
    for ext in (".npy", ".json"):
        if not paths.isfile(prefix + ext):
            raise FileNotFoundError(f"text classifier file not found: {prefix + ext}")
    embeddings = np.load(io.BytesIO(paths.read_bytes(prefix + ".npy")), allow_pickle=False)
    meta = paths.read_json(prefix + ".json")
    if embeddings.ndim != 2 or len(embeddings) != len(meta.get("names", ())):
        raise ValueError(
            f"text classifier {prefix}: {embeddings.shape} embeddings for "
            f"{len(meta.get('names', ()))} names"
        )
    if not np.all(np.isfinite(embeddings)):
        raise ValueError(f"text classifier {prefix}.npy holds non-finite values")
    return embeddings.astype(np.float32), meta


def compute(pretrain_workdir: str, table: CategoryTable, templates: str) -> tuple[np.ndarray, dict]:
    """The classifier of `table` with the text tower of a pretraining run."""
    from rovit_jax.data import sources
    from rovit_jax.runs import load_pretrained_towers

    pcfg, params, step = load_pretrained_towers(pretrain_workdir)
    embed = make_text_embedder(pcfg, params, sources.tokenizer_for(pcfg))
    emb, _ = build_text_classifier(
        table.names(), embed, templates=PROMPT_ENSEMBLES[templates], pad_to_bucket=False
    )
    meta = {
        "ids": [c.id for c in table],
        "names": table.names(),
        "frequencies": [c.frequency for c in table],
        "templates": templates,
        "pretrain_step": int(step),
    }
    return emb, meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rovit_jax.classifier", description=__doc__)
    parser.add_argument("--pretrain_workdir", required=True, help="a pretraining run's workdir")
    parser.add_argument("--vocabulary", required=True, help="built-in name, JSON or names file")
    parser.add_argument("--templates", default="clip", choices=sorted(PROMPT_ENSEMBLES))
    parser.add_argument("--out", required=True, help="output prefix (.npy and .json written)")
    args = parser.parse_args(argv)
    try:
        table = read_vocabulary(args.vocabulary)
        read_pretraining_config(args.pretrain_workdir)  # before any weight is read
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    emb, meta = compute(args.pretrain_workdir, table, args.templates)
    save_classifier(args.out, emb, meta)
    print(f"wrote {args.out}.npy {tuple(emb.shape)} and {args.out}.json ({len(table)} categories)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
