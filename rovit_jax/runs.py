"""Finding and loading training runs: their config, parameters and tokenizer.

Every place that loads a run goes through here: the detection task (its pretraining run and
`init.detector_workdir`), the predictor, the classifier and export commands and the benchmarks.
A run's workdir (written by `python -m rovit_jax.main`) holds `config.json` and orbax
checkpoints in `checkpoints/<step>/`. A detection run's towers and tokenizer come from its
pretraining run, found as `DetectTask` finds it: `config.init.pretrain_workdir`, else
`<workdir>/pretrain`. Nothing here unpickles or executes code from a file: configs are JSON,
parameters are orbax array checkpoints, tokenizers are SentencePiece protobufs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, NamedTuple

import ml_collections

from rovit_jax import paths
from rovit_jax.detection.text_classifier import clean_name

__all__ = [
    "CheckpointKindError",
    "LoadedRun",
    "PretrainedTowers",
    "load_pretrained_towers",
    "load_run",
    "load_run_params",
    "load_tokenizer",
    "read_pretraining_config",
    "read_run_config",
    "resolve_pretrain_workdir",
    "training_names",
    "vlm_tower_params",
]

EXPECTED = (
    "a training run's workdir (config.json and checkpoints/<step>/, as written by "
    "`python -m rovit_jax.main`): a detection run, or a pretraining run for embeddings only"
)


class CheckpointKindError(ValueError):
    """A directory that is not the kind of run an operation needs."""


class PretrainedTowers(NamedTuple):
    """A pretraining run's config and its two towers' parameters ({"img", "txt", ...}; None for
    planning, where only shapes matter), and their checkpoint step when read from a run."""

    config: ml_collections.ConfigDict
    params: Any
    step: int | None = None


def vlm_tower_params(tower_params: dict[str, Any]) -> dict[str, Any]:
    """The towers' parameters without the text tower: what the frozen image side (VLM region
    embeddings for score fusion) needs, so jitted inference does not carry the text weights."""
    return {k: v for k, v in tower_params.items() if k != "txt"}


@dataclasses.dataclass
class LoadedRun:
    """A run ready for inference.

    Attributes:
      kind: "detect" (a detector run) or "pretrain" (a pretraining run: towers only).
      workdir: the run's directory.
      config: the run's config.
      params: the run's parameters (the detector's, or the two towers' for "pretrain").
      step: the checkpoint step of `params`.
      pretrain_workdir, pretrain_config, pretrain_params, pretrain_step: the pretraining run
        providing the two towers (the run itself for "pretrain").
      tokenizer: the text tower's tokenizer.
    """

    kind: str
    workdir: str
    config: ml_collections.ConfigDict
    params: Any
    step: int
    pretrain_workdir: str
    pretrain_config: ml_collections.ConfigDict
    pretrain_params: Any
    pretrain_step: int
    tokenizer: Any

    @property
    def towers(self) -> PretrainedTowers:
        """The pretraining run's config and tower parameters."""
        return PretrainedTowers(self.pretrain_config, self.pretrain_params, self.pretrain_step)


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of the run in `workdir`; clear errors when it is not a run."""
    workdir = paths.absolute(workdir)
    if not paths.isdir(workdir):
        raise FileNotFoundError(
            f"checkpoint directory {workdir} does not exist; expected {EXPECTED}"
        )
    path = os.path.join(workdir, "config.json")
    if not paths.isfile(path):
        raise CheckpointKindError(
            f"{workdir} is not a training run: it has no config.json; expected {EXPECTED}"
        )
    try:
        config = ml_collections.ConfigDict(paths.read_json(path))
    except (OSError, ValueError) as e:
        raise CheckpointKindError(f"{path} is not a readable run config: {e}") from None
    task = config.get("task")
    if task not in ("detect", "pretrain"):
        raise CheckpointKindError(
            f"{path}: task {task!r} is neither 'detect' nor 'pretrain'; expected {EXPECTED}"
        )
    return config


def load_run_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
    """(parameters, step) of checkpoint `step` (None = the latest) of the run in `workdir`."""
    from rovit_jax.train.checkpoint import load_params

    try:
        params, got = load_params(workdir, step)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"run {workdir} has no usable checkpoint ({e}); expected checkpoints/<step>/ written "
            "by training"
        ) from None
    logging.info("loaded parameters of %s at step %d", workdir, got)
    return params, got


def read_pretraining_config(workdir: str) -> ml_collections.ConfigDict:
    """The config of the pretraining run in `workdir`; CheckpointKindError for any other run."""
    config = read_run_config(workdir)
    if config.task != "pretrain":
        raise CheckpointKindError(
            f"{workdir} is a {config.task!r} run, not a pretraining run (a detection run's towers "
            "come from <workdir>/pretrain or its config's init.pretrain_workdir)"
        )
    return config


def load_pretrained_towers(workdir: str, *, step: int | None = None) -> PretrainedTowers:
    """The config and tower parameters of the pretraining run in `workdir`.

    Raises:
      FileNotFoundError: `workdir` missing, or without a usable checkpoint.
      CheckpointKindError (a ValueError): `workdir` is not a pretraining run.
    """
    config = read_pretraining_config(workdir)
    params, got = load_run_params(workdir, step)
    return PretrainedTowers(config, params, got)


def resolve_pretrain_workdir(workdir: str, config: ml_collections.ConfigDict) -> str:
    """The pretraining run of detection run `workdir` (as DetectTask finds it).

    A configured `init.pretrain_workdir` that no longer exists (a run copied elsewhere) falls
    back to `<workdir>/pretrain` when that holds a run.
    """
    configured = config.get("init", {}).get("pretrain_workdir") or ""
    nested = os.path.join(workdir, "pretrain")
    candidates = [configured, nested] if configured else [nested]
    for path in candidates:
        if paths.isfile(os.path.join(path, "config.json")):
            return path
    raise FileNotFoundError(
        f"detection run {workdir}: its pretraining run is not at "
        + " nor ".join(repr(c) for c in candidates)
        + " (config key `init.pretrain_workdir`); the text tower and tokenizer come from it"
    )


def load_tokenizer(pretrain_config: ml_collections.ConfigDict, data_dir: str | None = None):
    """The tokenizer of a pretraining config.

    `tokenizer.model_path` when set; for the shapes world, the SentencePiece model cached beside
    the built dataset (under `data.data_dir`, else `data_dir`, else the default tfds folder).
    Only when that cache is missing is the shapes world rebuilt (deterministic from the config),
    as training did.
    """
    from rovit_jax.data import shapes_tfds, sources
    from rovit_jax.data.tokenizer import make_tokenizer
    from rovit_jax.pretrain_settings import pretrain_settings

    settings = pretrain_settings(pretrain_config)
    data, tok = settings["data"], settings["tokenizer"]
    pcfg = ml_collections.ConfigDict(pretrain_config.to_dict())
    if data.name == "shapes_world" and tok.kind == "sentencepiece" and not tok.model_path:
        pcfg.data.data_dir = data.data_dir or data_dir or sources.default_data_dir()
        # Where `tokenizer.shapes_tokenizer` cached the run's model (no dataset is built).
        builder = shapes_tfds.shapes_builder(
            pcfg.data.data_dir, **settings["data.world"].as_kwargs()
        )
        path = os.path.join(
            os.fspath(builder.data_dir), "tokenizer", f"unigram_{tok.vocab_size}.model"
        )
        if paths.isfile(path):
            return make_tokenizer(tok, model_path=path)
        logging.warning(
            "tokenizer %s not found: rebuilding the shapes world under %s to retrain it",
            path,
            pcfg.data.data_dir,
        )
    return sources.tokenizer_for(pcfg)


def training_names(config: ml_collections.ConfigDict) -> frozenset[str]:
    """Cleaned names of the categories a detection run was trained on (its base vocabulary).

    Used to weight VLM score fusion: a query naming a training category is "base", any other
    is "novel". Known without reading annotation files for the shapes world (its dataset
    metadata, when built) and the built-in vocabularies (lvis, coco, ov_coco); otherwise empty
    (every query novel).
    """
    from rovit_jax.config_sections import resolved_sections
    from rovit_jax.data import vocabularies
    from rovit_jax.data.categories import CategoryTable
    from rovit_jax.data.settings import DetectionDataSettings, WorldSettings

    sections = resolved_sections((DetectionDataSettings, WorldSettings), config)
    data = sections["data"]
    table = None
    try:
        if data.name == "shapes_world":
            from rovit_jax.data import shapes_tfds
            from rovit_jax.data.sources import default_data_dir

            builder = shapes_tfds.shapes_builder(
                data.data_dir or default_data_dir(), **sections["data.world"].as_kwargs()
            )
            if builder.is_prepared():
                table = CategoryTable.from_records(builder.info.metadata["categories"])
        elif data.name in ("lvis", "coco", "tfds_coco", "ov_coco"):
            name = "coco" if data.name == "tfds_coco" else data.name
            table = vocabularies.vocabulary(name)
            if name == "ov_coco":
                from rovit_jax.data.coco import ov_coco_split

                table = ov_coco_split(table)
    except Exception as e:  # noqa: BLE001 - best effort: unknown means "every query novel".
        logging.warning("training vocabulary of the run unknown (%s): queries count as novel", e)
    if table is None:
        return frozenset()
    novel = set(data.novel_frequencies)
    return frozenset(clean_name(c.name) for c in table if c.frequency not in novel)


def load_run(workdir: str, *, step: int | None = None) -> LoadedRun:
    """Loads a detection or pretraining run (`step`: the run's checkpoint; None = latest).

    Raises:
      FileNotFoundError: `workdir` missing, no usable checkpoint, or a detection run whose
        pretraining run cannot be found (each message names the directory).
      CheckpointKindError (a ValueError): `workdir` is not a training run.
    """
    workdir = paths.absolute(workdir)
    config = read_run_config(workdir)
    if config.task == "pretrain":
        params, got = load_run_params(workdir, step)
        tokenizer = load_tokenizer(config)
        return LoadedRun(
            "pretrain", workdir, config, params, got, workdir, config, params, got, tokenizer
        )
    pretrain_workdir = resolve_pretrain_workdir(workdir, config)
    pcfg = read_run_config(pretrain_workdir)
    if pcfg.task != "pretrain":
        raise CheckpointKindError(
            f"detection run {workdir}: {pretrain_workdir} is a {pcfg.task!r} run, not a "
            "pretraining run"
        )
    from rovit_jax.config_sections import resolved_sections
    from rovit_jax.data.settings import DetectionDataSettings
    from rovit_jax.detection.settings import InitSettings

    sections = resolved_sections((DetectionDataSettings, InitSettings), config)
    data = sections["data"]
    params, got = load_run_params(workdir, step)
    # The towers the detector was finetuned from (and fuses with): its configured checkpoint.
    pparams, pstep = load_run_params(pretrain_workdir, sections["init"].pretrain_step)
    tokenizer = load_tokenizer(pcfg, data.data_dir)
    return LoadedRun(
        "detect", workdir, config, params, got, pretrain_workdir, pcfg, pparams, pstep, tokenizer
    )
