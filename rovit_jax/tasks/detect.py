"""Open-vocabulary detection finetuning on a pretrained ViT, evaluated LVIS-style with AP_r."""

from __future__ import annotations

import logging
import os
from functools import cached_property
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from rovit_jax import paths
from rovit_jax.config_sections import resolve_sections
from rovit_jax.data import sources
from rovit_jax.detection import rcnn
from rovit_jax.detection.settings import DETECTION_SECTIONS, OLDER_DEFAULTS, detection_settings
from rovit_jax.detection.text_classifier import (
    PROMPT_ENSEMBLES,
    background_text_embedding,
    build_text_classifier,
)
from rovit_jax.models.detector import OpenVocabDetector
from rovit_jax.models.frozen_vlm import FrozenRegionEmbedder, load_pretrained_backbone
from rovit_jax.models.layers import COMPUTE_DTYPES
from rovit_jax.pretrain_settings import pretrain_settings
from rovit_jax.run_config import run_problems, run_settings
from rovit_jax.runs import (
    CheckpointKindError,
    PretrainedTowers,
    load_pretrained_towers,
    load_run_params,
    read_run_config,
)

# Values of the fields that follow the authors' detection pipeline for a run config written
# before they existed (the behaviour that run was trained and evaluated with): the `older` values
# of detection.settings. infer.proposal_nms_iou is not listed: such runs used their rpn.nms_iou at
# test time too.
PRE_AUTHORS_DEFAULTS = OLDER_DEFAULTS


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ValueError(f"config key `{key}` = {value!r}: {why}")


def validate_config(
    config: ml_collections.ConfigDict, *, check_files: bool = True
) -> dict[str, Any]:
    """Checks detection settings that would otherwise fail late or silently.

    Args:
      config: a detection config.
      check_files: also check the dataset settings and that annotation files, image folders,
        a detector run to start from and (nested) pretraining data exist. False when only the
        model and the step are built (memory planning, `DetectTask.for_planning`).

    Raises:
      rovit_jax.config_check.ConfigError (a ValueError) listing every problem found, one per
      line, each naming the config key and its value. With `init.run_pretraining`, problems of
      the nested pretraining config are listed too, as `pretrain.<key>`.

    Returns:
      {section: typed settings} of DETECTION_SECTIONS and "run" (`run_config.RunSettings`),
      resolved while checking.
    """
    from rovit_jax import config_check as cc  # Local: keeps this module's imports unchanged.
    from rovit_jax.tasks import pretrain

    p = cc.Problems()
    run = run_problems(p, config)

    # The data, canvas, pyramid, proposals, RoI heads and inference: the typed sections check
    # their own fields; what spans fields is checked here.
    sections = resolve_sections(DETECTION_SECTIONS, config, p)
    sections["run"] = run
    if check_files and sections["data"] is not None:
        # The files the dataset reads, so a missing one is reported before anything is built.
        steps = None if run is None else run.total_steps
        sections["data"].input_problems(p, total_steps=steps)
    det = sections["det"]
    if det is not None:
        p.check(
            det.image_size % (2**det.max_level) == 0,
            "det.image_size",
            det.image_size,
            f"must be divisible by the coarsest stride 2**{det.max_level} (det.max_level)",
        )
        p.check(
            det.image_size % det.mask_stride == 0,
            "det.mask_stride",
            det.mask_stride,
            f"must divide det.image_size = {det.image_size}",
        )
    infer = sections["infer"]
    if (
        infer is not None
        and det is not None
        and infer.vlm_window_attention
        and infer.vlm_window_size is None
        and det.window_size == 0
    ):
        p.add(
            "infer.vlm_window_attention",
            True,
            "uses the detector's window (det.window_size), which is 0 (global attention): set "
            "det.window_size > 0, infer.vlm_window_size or infer.vlm_window_attention=False",
        )

    # Initialisation: the detector run to start from, and the nested pretraining config.
    init = sections["init"]
    if init is not None and init.detector_workdir and check_files:
        cc.check_path(
            p, config, "init.detector_workdir", kind="dir", needed_for="init.detector_workdir"
        )
    if init is not None and init.run_pretraining:
        nested = cc.config_get(config, "pretrain", None)
        if not nested:
            p.add(
                "pretrain",
                nested,
                "must be a full pretraining config when init.run_pretraining=True",
            )
        else:
            try:
                pretrain.validate_config(nested, check_files=check_files)
            except cc.ConfigError as e:
                p.extend(e.problems, prefix="pretrain.")
    p.raise_if_any()
    return sections


def rcnn_config(
    config: ml_collections.ConfigDict, sections: dict[str, Any] | None = None
) -> rcnn.RCNNConfig:
    """The settings `rcnn` reads: `sections` (`detection_settings(config)` when not given) and
    the pyramid's geometry. ConfigError on a problem."""
    sections = detection_settings(config) if sections is None else sections
    det = sections["det"]
    return rcnn.RCNNConfig(
        image_size=det.image_size,
        min_level=det.min_level,
        max_level=det.max_level,
        rpn=sections["rpn"],
        roi=sections["roi"],
        infer=sections["infer"],
    )


class DetectTask:
    """Finetunes `OpenVocabDetector` on base categories; evaluates base + novel AP.

    What the task derives lazily (the pretraining run, the vocabularies) can be handed in
    instead: `pretrained` (a run already loaded, e.g. by the predictor, or random towers in
    tests and benchmarks) and `base_vocabulary` / `full_vocabulary` (dicts as the properties of
    those names return).
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str = "",
        *,
        check_files: bool = True,
        pretrained: PretrainedTowers | tuple[ml_collections.ConfigDict, Any] | None = None,
        base_vocabulary: dict[str, Any] | None = None,
        full_vocabulary: dict[str, Any] | None = None,
    ):
        # The typed sections (DETECTION_SECTIONS), resolved once while validating.
        self.settings = validate_config(config, check_files=check_files)
        self.config = config
        self.workdir = workdir
        self.rcnn = rcnn_config(config, self.settings)
        self._mesh: Mesh | None = None
        self._predict_fns: dict[bool, Any] = {}  # with_masks -> jitted predict
        # Values computed on first use (the pretraining run, the vocabularies, a finetuned
        # detector run); given ones take their place.
        given = dict(base_vocabulary=base_vocabulary, full_vocabulary=full_vocabulary)
        if pretrained is not None:
            given["pretrained"] = PretrainedTowers(*pretrained)
        self._lazy: dict[str, Any] = {k: v for k, v in given.items() if v is not None}

    def _once(self, name: str, compute) -> Any:
        """The value of `name`, computed by `compute()` on first use (or given at construction)."""
        if name not in self._lazy:
            self._lazy[name] = compute()
        return self._lazy[name]

    @classmethod
    def for_planning(
        cls,
        config: ml_collections.ConfigDict,
        pretrain_config: ml_collections.ConfigDict,
        num_classes: int,
    ) -> DetectTask:
        """A task for ahead-of-time compilation only (memory / FLOPs planning, `rovit_jax.plan`).

        Reads no dataset, tokenizer or checkpoint. The backbone is described by
        `pretrain_config` (model.image.variant, pp.image_size, model.embed_dim), as a real run's
        pretraining config.json would; the training vocabulary is `num_classes` zero text
        embeddings padded to the classifier bucket, [bucket_size(num_classes), embed_dim], as
        `build_text_classifier` pads a real one. `init_params` returns fresh parameters (the
        same shapes and shardings as the loaded backbone), so this task must not be trained.
        """
        from rovit_jax.detection.text_classifier import bucket_size
        from rovit_jax.tasks import pretrain

        pretrained = pretrain.validate_config(pretrain_config, check_files=False)
        config = ml_collections.ConfigDict(config.to_dict())
        config.init.detector_workdir = ""  # planning reads no detector run either
        k, e = bucket_size(int(num_classes)), pretrained["model"].embed_dim
        vocab = dict(embeddings=np.zeros((k, e), np.float32), valid=np.arange(k) < num_classes)
        return cls(
            config,
            check_files=False,
            pretrained=PretrainedTowers(pretrain_config, None),
            base_vocabulary=dict(vocab, category_map={}),
            full_vocabulary=dict(vocab, is_novel=np.zeros(k, bool), table=[]),
        )

    # ---- the pretrained run --------------------------------------------------------------------
    @property
    def pretrain_workdir(self) -> str:
        return self.settings["init"].pretrain_workdir or os.path.join(self.workdir, "pretrain")

    @property
    def pretrained(self) -> PretrainedTowers:
        """(pretraining config, pretrained parameters); trains them first if so configured."""
        return self._once("pretrained", self._compute_pretrained)

    def _compute_pretrained(self) -> PretrainedTowers:
        workdir = self.pretrain_workdir
        has_run = paths.exists(os.path.join(workdir, "config.json"))
        if self.settings["init"].run_pretraining:
            from rovit_jax.tasks.pretrain import PretrainTask
            from rovit_jax.train.loop import run

            pcfg = ml_collections.ConfigDict(self.config.pretrain.to_dict())
            pcfg.data.data_dir = self.settings["data"].data_dir
            logging.info("pretraining into %s (resumes if partly done)", workdir)
            result = run(pcfg, workdir, PretrainTask(pcfg))
            if jax.process_index() == 0 and result["eval"]:
                summary = ", ".join(f"{k}={v:.4f}" for k, v in sorted(result["eval"].items()))
                print(f"[rovit_jax] pretraining retrieval: {summary}", flush=True)
        elif not has_run:
            raise FileNotFoundError(
                f"config key `init.pretrain_workdir`: no pretraining run in {workdir!r} "
                "(set init.run_pretraining=True to train one first)"
            )
        return load_pretrained_towers(workdir, step=self.settings["init"].pretrain_step)

    @cached_property
    def two_tower(self):
        from rovit_jax.tasks.pretrain import build_model

        # The detection run's kernel and compute dtype, not the pretraining run's: the frozen
        # towers run at detection resolution, beside the detector.
        run = run_settings(self.config)
        return build_model(
            self.pretrained.config,
            self.pretrained_settings,
            attention=run.attention,
            compute_dtype=run.compute_dtype,
        )

    @cached_property
    def pixels(self):
        """The backbone's pixel convention, from its pretraining run (`pp.mean`, `pp.std`)."""
        from rovit_jax.data.pixels import Pixels

        return Pixels.from_settings(self.pretrained_settings["pp"])

    @cached_property
    def pretrained_settings(self) -> dict[str, Any]:
        """The pretraining run's typed sections, resolved once (the towers' shapes come from
        them)."""
        return pretrain_settings(self.pretrained.config)

    @cached_property
    def model(self) -> OpenVocabDetector:
        det = self.settings["det"]
        image = self.pretrained_settings["model.image"]
        img = image.size()
        grid = self.pretrained_settings["pp"].image_size // img["patch_size"]
        _check(
            det.image_size % img["patch_size"] == 0,
            "det.image_size",
            det.image_size,
            f"must be divisible by the backbone patch size {img['patch_size']}",
        )
        backbone = dict(
            img,
            posemb_grid=(grid, grid),
            pool_type="gap",
            window_size=det.window_size,
            global_blocks=det.global_blocks,
            pre_norm=image.pre_norm,
            activation=image.activation,
            norm_eps=image.norm_eps,
            remat_policy=self.config.remat,
            attention=run_settings(self.config).attention,
        )
        _ = self.frozen_vlm  # checks infer.vlm_global_blocks against the tower before compiling
        head = self.settings["head"]
        return OpenVocabDetector(
            backbone=backbone,
            min_level=det.min_level,
            max_level=det.max_level,
            fpn_channels=det.fpn_channels,
            num_anchors=len(self.rcnn.rpn.aspect_ratios),
            rpn_box_bias_init=(
                0.5
                if self.rcnn.rpn.objectness == "centerness" and self.rcnn.rpn.box_coding == "linear"
                else 0.0
            ),
            embed_dim=self.pretrained_settings["model"].embed_dim,
            head_conv_dim=head.conv_dim,
            head_num_convs=head.num_convs,
            head_fc_dim=head.fc_dim,
            mask_conv_dim=head.mask_conv_dim,
            mask_num_convs=head.mask_num_convs,
            base_temperature=head.base_temperature,
            background=head.background,
            box_stages=1 + len(self.rcnn.roi.cascade_ious),
            dtype=COMPUTE_DTYPES[self.config.compute_dtype],
        )

    # ---- data and vocabulary -------------------------------------------------------------------
    @cached_property
    def data(self) -> sources.DetectionData:
        """Readers, category table and evaluation protocol (see data.sources)."""
        return sources.detection_data(self.settings)

    @property
    def table(self) -> list[tuple[int, str, str]]:
        """Every evaluated category as (dataset id, name, frequency), in class order."""
        return self.data.table.as_tuples()

    @cached_property
    def tokenizer(self):
        """The pretrained text tower's tokenizer."""
        pcfg = ml_collections.ConfigDict(self.pretrained.config.to_dict())
        data_dir = self.pretrained_settings["data"].data_dir or self.settings["data"].data_dir
        pcfg.data.data_dir = data_dir
        return sources.tokenizer_for(pcfg)

    @cached_property
    def text_embedder(self):
        """texts -> [N, E] unit-norm embeddings with the pretrained text tower."""
        from rovit_jax.classifier import make_text_embedder

        return make_text_embedder(self.pretrained.config, self.pretrained.params, self.tokenizer)

    def vocabulary(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        templates = PROMPT_ENSEMBLES[self.settings["text"].templates]
        return build_text_classifier(names, self.text_embedder, templates=templates)

    @cached_property
    def background_embedding(self) -> np.ndarray:
        """[E] unit-norm text embedding of the background name "." through `text.templates`.

        With head.background="text" it is the detector's fixed background row (`init_params`
        stores it in `bg_embedding`). `validate` computes it; first asked for inside a trace
        (e.g. a jitted `init_params` without `validate`), it is computed on another thread, whose
        jax trace state is its own, so that it is still a concrete array.
        """
        templates = PROMPT_ENSEMBLES[self.settings["text"].templates]

        def compute() -> np.ndarray:
            return background_text_embedding(self.text_embedder, templates=templates)

        if not isinstance(jnp.zeros(()), jax.core.Tracer):
            return compute()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(compute).result()

    @property
    def base_vocabulary(self) -> dict[str, Any]:
        """Training vocabulary: categories not in a novel frequency group."""
        return self._once("base_vocabulary", self._compute_base_vocabulary)

    def _compute_base_vocabulary(self) -> dict[str, Any]:
        table = self.table
        novel = set(self.settings["data"].novel_frequencies)
        base = [(cid, name) for cid, name, freq in table if freq not in novel]
        emb, valid = self.vocabulary([n for _, n in base])
        return dict(
            embeddings=emb,
            valid=valid,
            category_map={cid: i for i, (cid, _) in enumerate(base)},
        )

    @property
    def full_vocabulary(self) -> dict[str, Any]:
        """Evaluation vocabulary: every category; `is_novel` marks held-out ones.

        With `text.classifier` set, the saved classifier (rovit_jax.classifier) is used; its
        names must be this dataset's categories, in order.
        """
        return self._once("full_vocabulary", self._compute_full_vocabulary)

    def _compute_full_vocabulary(self) -> dict[str, Any]:
        table = self.table
        novel = set(self.settings["data"].novel_frequencies)
        names = [n for _, n, _ in table]
        if self.settings["text"].classifier:
            emb, valid = self._saved_classifier(names)
        else:
            emb, valid = self.vocabulary(names)
        is_novel = np.zeros(valid.shape, bool)
        is_novel[: len(table)] = [f in novel for _, _, f in table]
        return dict(embeddings=emb, valid=valid, is_novel=is_novel, table=table)

    def _saved_classifier(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        from rovit_jax.classifier import load_classifier
        from rovit_jax.detection.text_classifier import bucket_size

        prefix = self.settings["text"].classifier
        emb, meta = load_classifier(prefix)
        if list(meta["names"]) != names:
            bad = next(
                (i for i, (a, b) in enumerate(zip(meta["names"], names)) if a != b),
                min(len(names), len(meta["names"])),
            )
            raise ValueError(
                f"config key `text.classifier` = {prefix!r}: its {len(meta['names'])} names are "
                f"not this dataset's {len(names)} categories (first difference at position {bad})"
            )
        k = bucket_size(len(names))
        padded = np.zeros((k, emb.shape[1]), np.float32)
        padded[: len(names)] = emb
        return padded, np.arange(k) < len(names)

    def train_batches(self, process_index: int, process_count: int):
        from rovit_jax.data import detection_input

        det = self.settings["det"]
        if self.data.train is None:
            if int(self.config.total_steps) == 0:
                return detection_input.NoBatches()
            raise ValueError(
                f"config key `data.name` = {self.settings['data'].name!r} is for evaluation only "
                "(no training data): set total_steps=0 and init.detector_workdir"
            )
        return detection_input.DetectionBatches(
            self.data.train,
            global_batch=int(self.config.batch_size),
            image_size=det.image_size,
            max_instances=det.max_instances,
            seed=int(self.config.seed),
            category_map=self.base_vocabulary["category_map"],
            scale_range=det.scale_range,
            flip=det.flip,
            mask_stride=det.mask_stride,
            with_masks=self.settings["data"].has_masks,
            pixels=self.pixels,
            num_workers=self.settings["data"].num_workers,
            worker_processes=self.settings["data"].worker_processes,
            process_index=process_index,
            process_count=process_count,
        )

    def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        det = self.settings["det"]
        b, s = int(self.config.batch_size), det.image_size
        m, ms = det.max_instances, s // det.mask_stride
        sds = jax.ShapeDtypeStruct
        shapes = {
            "image": sds((b, s, s, 3), jnp.float32),
            "boxes": sds((b, m, 4), jnp.float32),
            "classes": sds((b, m), jnp.int32),
            "valid": sds((b, m), jnp.bool_),
            "masks": sds((b, m, ms, ms), jnp.uint8),
            "image_info": sds((b, 4), jnp.float32),
        }
        if not self.settings["data"].has_masks:
            del shapes["masks"]
        return shapes

    # ---- model and loss -------------------------------------------------------------------------
    def validate(self, mesh: Mesh) -> None:
        from rovit_jax import config_check as cc

        cc.check_batches_fit_mesh(self.config, dict(mesh.shape))
        self._mesh = mesh
        # Everything derived from the pretrained run is computed here, eagerly: inside the
        # traced init/loss functions it would be staged into the trace instead.
        _ = self.pretrained, self.model, self.full_vocabulary, self.finetuned
        if int(self.config.total_steps) > 0:
            _ = self.base_vocabulary
        if self._text_background and self.finetuned is None and self.pretrained.params is not None:
            _ = self.background_embedding

    @property
    def _text_background(self) -> bool:
        return self.settings["head"].background == "text"

    @property
    def finetuned(self) -> Any | None:
        """Parameters of a finetuned detector run (`init.detector_workdir`), or None."""
        return self._once("finetuned", self._compute_finetuned)

    def _compute_finetuned(self) -> Any | None:
        workdir = self.settings["init"].detector_workdir
        if not workdir:
            return None
        config = read_run_config(workdir)
        if config.task != "detect":
            raise CheckpointKindError(
                f"config key `init.detector_workdir` = {workdir!r} is a {config.task!r} run, "
                "not a detection run"
            )
        return load_run_params(workdir)[0]

    def init_model_params(self, rng: jax.Array) -> Any:
        s = self.rcnn.image_size
        return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32))["params"]

    def init_params(self, rng: jax.Array) -> Any:
        params = self.init_model_params(rng)
        if self.finetuned is not None:
            # Vocabulary transfer: the detector is reused as is; only the text classifier changes.
            fresh = jax.tree.map(jnp.shape, params)
            if jax.tree.map(jnp.shape, self.finetuned) != fresh:
                raise ValueError(
                    "config key `init.detector_workdir` = "
                    f"{self.settings['init'].detector_workdir!r}: its parameters do not match "
                    "this config's detector (same backbone, heads and det.* settings are needed)"
                )
            return jax.tree.map(jnp.asarray, self.finetuned)
        if self.pretrained.params is None:
            return params  # for_planning: no pretrained values, only their shapes matter
        params = dict(params)
        params["backbone"] = load_pretrained_backbone(
            params["backbone"], self.pretrained.params["img"]
        )
        if self._text_background:
            # The authors' fixed background row: the text embedding of ".", never trained (the
            # model reads it behind stop_gradient).
            params["bg_embedding"] = jnp.asarray(self.background_embedding, jnp.float32)
        return params

    def step_constants(self) -> dict[str, np.ndarray]:
        """The training classifier, an argument of the train step (not a program constant):
        text_embeddings [num_base_rows, dim], text_valid [num_base_rows]."""
        vocab = self.base_vocabulary
        return {
            "text_embeddings": np.asarray(vocab["embeddings"]),
            "text_valid": np.asarray(vocab["valid"]),
        }

    def loss_fn(self, params, batch, rng, constants=None):
        c = self.step_constants() if constants is None else constants
        return rcnn.detector_loss(
            self.model,
            params,
            batch,
            jnp.asarray(c["text_embeddings"]),
            jnp.asarray(c["text_valid"]),
            rng,
            self.rcnn,
        )

    # ---- inference and evaluation --------------------------------------------------------------
    @cached_property
    def frozen_vlm(self) -> FrozenRegionEmbedder:
        """The frozen pretrained image tower that embeds regions for VLM score fusion, with
        `infer.vlm_window_attention` / `vlm_global_blocks` and `infer.vlm_window_size` (default:
        the detector's `det.window_size`)."""
        infer = self.settings["infer"]
        window = infer.vlm_window_size
        return FrozenRegionEmbedder.build(
            self.two_tower,
            window_attention=infer.vlm_window_attention,
            window_size=self.settings["det"].window_size if window is None else window,
            global_blocks=infer.vlm_global_blocks,
            pool_size=self.rcnn.roi.pool_size,
        )

    def predict_fn(self, trainer, *, with_masks: bool):
        """Jitted `(params, vlm_params, images, text_emb, text_valid, is_novel)` ->
        {"fused": detections, "detector_only": detections} (`rcnn.detect`'s dicts), both from
        one backbone and head pass. Compiled once per task and `with_masks`."""
        if with_masks not in self._predict_fns:
            self._predict_fns[with_masks] = self._jit_predict(trainer, with_masks=with_masks)
        return self._predict_fns[with_masks]

    def _jit_predict(self, trainer, *, with_masks: bool):

        def predict(params, vlm_params, images, text_emb, text_valid, is_novel):
            return rcnn.detect_variants(
                self.model,
                params,
                images,
                text_emb,
                text_valid,
                is_novel,
                self.rcnn,
                vlm_region_embeddings_fn=lambda im, bx: self.frozen_vlm.region_embeddings(
                    vlm_params, im, bx
                ),
                vlm_logit_scale=jnp.exp(vlm_params["t"]),
                with_masks=with_masks,
            )

        rep = trainer.replicated
        return jax.jit(
            predict,
            in_shardings=(trainer.param_shardings(), rep, trainer.batch_sharding, rep, rep, rep),
            out_shardings=rep,
        )

    def evaluate(self, trainer, params) -> dict[str, float]:
        from rovit_jax.tasks import detect_eval

        return detect_eval.evaluate(self, trainer, params)
