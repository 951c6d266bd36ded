"""The authors' classification-side detection behaviour against independent numpy re-derivations.

Each numpy reference transcribes the authors' released F-VLM / DITO code (google-research fvlm/):
  score fusion      modeling/task_heads.py `ClipFasterRCNNHead.ensemble_class_outputs` and the
                    objectness product after it in `__call__`;
  background weight losses/base_losses.py `weighted_softmax_cross_entropy` (SUM_BY_NONZERO_WEIGHTS
                    with per-RoI weight 1: the mean over RoIs);
  background row    utils/dataset_utils.py `load_dataset_class_names` (background named ".");
  frozen VLM        modeling/clip_models.py `_WINDOW_ATTENTION_SIZE_FROZEN_*` (window attention
                    in every block but the last).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_detector import _config, _task

from rovit_jax.detect_config import detect_defaults
from rovit_jax.detection import rcnn
from rovit_jax.detection.text_classifier import PROMPT_ENSEMBLES
from rovit_jax.models.layers import unscan_params
from rovit_jax.models.vit import ViT
from rovit_jax.ops import boxes as box_ops
from rovit_jax.ops.roi_align import batched_roi_align
from rovit_jax.runs import vlm_tower_params
from rovit_jax.tasks.detect import DetectTask, rcnn_config, validate_config


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _authors_ensemble(class_logits, pretrained_logits, base_indicator, w_base, w_novel):
    """numpy transcription of `ensemble_class_outputs` (inputs: logits over [bg, classes])."""
    class_probs = _softmax(class_logits)
    pretrained_probs = _softmax(pretrained_logits)
    base_probs = class_probs ** (1.0 - w_base) * pretrained_probs**w_base
    novel_probs = class_probs ** (1.0 - w_novel) * pretrained_probs**w_novel
    ensembled = np.where(base_indicator[None, None, :], base_probs, novel_probs)
    ensembled = np.concatenate([class_probs[:, :, :1], ensembled[:, :, 1:]], axis=-1)
    return ensembled / ensembled.sum(-1, keepdims=True)


def _cfg(fusion: str = "authors"):
    """The default detection config's RCNNConfig at a 64 px canvas, with `infer.fusion`."""
    c = detect_defaults()
    c.det.update(image_size=64, min_level=3, max_level=4)
    c.infer.fusion = fusion
    return rcnn_config(c)


def test_authors_fusion_matches_numpy_transcription():
    rng = np.random.default_rng(0)
    b, p, k, k_valid = 2, 5, 8, 6
    det_logits = rng.normal(0, 3, (b, p, 1 + k)).astype(np.float32)
    vlm_logits = rng.normal(0, 3, (b, p, 1 + k)).astype(np.float32)
    obj = rng.uniform(0.05, 1, (b, p)).astype(np.float32)
    text_valid = np.arange(k) < k_valid
    is_novel = np.array([False, True, False, False, True, True, False, False])
    # Padded vocabulary entries: -1e9 logits for both scorers, as the detector produces them.
    valid_cols = np.concatenate([[True], text_valid])
    det_logits = np.where(valid_cols, det_logits, -1e9)
    vlm_logits = np.where(valid_cols, vlm_logits, -1e9)
    det_probs = jnp.asarray(_softmax(det_logits.astype(np.float64)), jnp.float32)

    got = np.asarray(
        rcnn.fused_class_scores(
            det_probs, jnp.asarray(vlm_logits), obj, text_valid, is_novel, _cfg(fusion="authors")
        )
    )
    # The authors' code has no padding: the reference sees only the valid columns.
    n = 1 + k_valid
    base_indicator = np.concatenate([[True], ~is_novel[:k_valid]])
    ens = _authors_ensemble(
        det_logits[..., :n].astype(np.float64),
        vlm_logits[..., :n].astype(np.float64),
        base_indicator,
        0.35,
        0.65,
    )
    want = (obj[..., None].astype(np.float64) ** 3.0 * ens)[..., 1:]
    np.testing.assert_allclose(got[..., :k_valid], want, rtol=2e-5, atol=1e-9)
    assert np.all(got[..., k_valid:] == 0)
    # With objectness 1 the classes hold what the renormalised row leaves to background.
    ones = np.asarray(
        rcnn.fused_class_scores(
            det_probs, jnp.asarray(vlm_logits), np.ones((b, p)), text_valid, is_novel, _cfg()
        )
    )
    np.testing.assert_allclose(1.0 - ones.sum(-1), ens[..., 0], rtol=1e-4, atol=1e-6)

    # The earlier formula stays available and differs: VLM softmax over the classes only, no
    # renormalisation.
    old = np.asarray(
        rcnn.fused_class_scores(
            det_probs,
            jnp.asarray(vlm_logits),
            obj,
            text_valid,
            is_novel,
            _cfg(fusion="classes_only"),
        )
    )
    w = np.where(is_novel[:k_valid], 0.65, 0.35)
    p_det = np.asarray(det_probs, np.float64)[..., 1:n]
    p_vlm = _softmax(vlm_logits[..., 1:n].astype(np.float64))
    want_old = p_det ** (1 - w) * p_vlm**w * obj[..., None] ** 3.0
    np.testing.assert_allclose(old[..., :k_valid], want_old, rtol=2e-5, atol=1e-9)
    assert not np.allclose(old[..., :k_valid], want, rtol=1e-3)

    # Detector only (no VLM): the detector's class probabilities times objectness^3 in both
    # modes (the authors' head multiplies objectness^3 into whatever class scores it has).
    for fusion in ("authors", "classes_only"):
        det_only = np.asarray(
            rcnn.fused_class_scores(det_probs, None, obj, text_valid, is_novel, _cfg(fusion=fusion))
        )
        np.testing.assert_allclose(
            det_only[..., :k_valid], p_det * obj[..., None] ** 3.0, rtol=2e-5, atol=1e-9
        )


def test_background_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (3, 7, 5)).astype(np.float32)
    classes = rng.integers(0, 5, (3, 7))
    classes[0, :3] = 0  # some background RoIs for sure
    for bg_weight in (0.9, 0.25):
        got = float(jnp.mean(rcnn.classification_loss_terms(logits, classes, bg_weight)))
        # weighted_softmax_cross_entropy: -onehot * log_softmax * class_weights (background
        # column = bg_weight), summed over classes, averaged over all RoIs (not over weights).
        x = logits.astype(np.float64)
        log_p = x - x.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        onehot = np.eye(5)[classes]
        class_weights = np.ones(5)
        class_weights[0] = bg_weight
        want = np.mean(np.sum(-onehot * log_p * class_weights, -1))
        np.testing.assert_allclose(got, want, rtol=1e-5)
    unweighted = float(jnp.mean(rcnn.classification_loss_terms(logits, classes, 1.0)))
    assert got < unweighted


def test_config_fields_defaults_validation_and_older_runs():
    config = _config()
    cfg = rcnn_config(config)
    assert (cfg.roi.background_weight, cfg.infer.fusion, cfg.infer.vlm_pool_boxes) == (
        0.9,
        "authors",
        "proposals",
    )
    assert config.head.background == "text" and config.infer.vlm_window_attention is True
    # A run config written before these fields existed keeps the behaviour it was run with.
    old = ml_collections.ConfigDict(config.to_dict())
    del old.roi["background_weight"], old.head["background"]
    for key in ("fusion", "vlm_pool_boxes", "vlm_window_attention"):
        del old.infer[key]
    validate_config(old, check_files=False)
    cfg = rcnn_config(old)
    old_values = (cfg.roi.background_weight, cfg.infer.fusion, cfg.infer.vlm_pool_boxes)
    assert old_values == (1.0, "classes_only", "refined")
    for key, value, needle in (
        ("infer.fusion", "geometric", "infer.fusion"),
        ("infer.vlm_pool_boxes", "boxes", "infer.vlm_pool_boxes"),
        ("head.background", "fixed", "head.background"),
        ("roi.background_weight", -0.5, "roi.background_weight"),
        ("infer.vlm_window_attention", "yes", "infer.vlm_window_attention"),
        ("det.window_size", 0, "infer.vlm_window_attention"),
        ("infer.vlm_window_size", 0, "infer.vlm_window_size"),
        ("infer.vlm_global_blocks", "last", "infer.vlm_global_blocks"),
    ):
        bad = _config(**{"infer.vlm_window_size": None})
        parent, leaf = key.split(".")
        # Replace the parent block: ConfigDict would refuse a value of another type.
        bad[parent] = ml_collections.ConfigDict({**bad[parent].to_dict(), leaf: value})
        with pytest.raises(ValueError, match=f"`{needle}` = ") as e:
            validate_config(bad, check_files=False)
        assert repr(value) in str(e.value) or key == "det.window_size"
    validate_config(
        _config(**{"det.window_size": 0, "infer.vlm_window_attention": False}), check_files=False
    )


def _sharing_towers(task, config):
    """A task of another config on the same (random) pretrained towers as `task`."""
    config.data.data_dir = task.config.data.data_dir
    return DetectTask(config, "", pretrained=task.pretrained)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # The authors' frozen layout (the shapes config windows every block instead).
    config = _config(**{"infer.vlm_global_blocks": (-1,), "infer.vlm_window_size": None})
    task = _task(config, str(tmp_path_factory.mktemp("tfds_authors")))
    vlm_params = vlm_tower_params(task.pretrained.params)
    params = jax.jit(task.init_params)(jax.random.key(0))
    return config, task, vlm_params, params


def test_fixed_background_is_the_text_embedding_of_a_dot(tiny):
    config, task, _, params = tiny
    templates = PROMPT_ENSEMBLES[config.text.templates]
    # Independent: the text tower on every template filled with ".", averaged, normalised.
    texts = [t.replace("{}", ".") for t in templates]
    raw = np.asarray(task.text_embedder(texts), np.float64).mean(0)
    want = raw / np.linalg.norm(raw)
    np.testing.assert_allclose(task.background_embedding, want, rtol=1e-5, atol=1e-6)

    np.testing.assert_allclose(params["bg_embedding"], want, rtol=1e-5, atol=1e-6)
    model = task.model
    np.testing.assert_allclose(
        model.apply({"params": params}, method=model.background_embedding),
        want,
        rtol=1e-5,
        atol=1e-6,
    )

    # Fixed: no gradient reaches it with background="text"; "learned" trains it. Same parameter
    # tree either way (checkpoints of one load into the other).
    learned = model.clone(background="learned")
    region = jnp.asarray(np.random.default_rng(2).normal(size=(1, 3, want.shape[0])), jnp.float32)
    region /= jnp.linalg.norm(region, axis=-1, keepdims=True)
    text = jnp.asarray(task.full_vocabulary["embeddings"])
    valid = jnp.asarray(task.full_vocabulary["valid"])

    def bg_grad(m):
        def loss(p):
            logits = m.apply({"params": p}, region, text, valid, method=m.class_logits)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0])

        return np.asarray(jax.grad(loss)(params)["bg_embedding"])

    assert np.all(bg_grad(model) == 0) and np.abs(bg_grad(learned)).max() > 0
    s = config.det.image_size
    shapes = [
        jax.tree.map(
            jnp.shape,
            jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"],
        )
        for m in (model, learned)
    ]
    assert shapes[0] == shapes[1]


def test_vlm_window_attention_in_every_block_but_the_last(tiny):
    config, task, vlm_params, _ = tiny
    s, ws = config.det.image_size, config.det.window_size
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.uniform(-1, 1, (1, s, s, 3)), jnp.float32)
    grid = np.asarray(task.frozen_vlm.patch_grid(vlm_params, images))

    # Reference: the pretrained ViT config run with window_size=ws and global_blocks=(last,).
    image = dict(task.two_tower.image, pool_type="gap", scan_layers=False)
    depth = image["depth"]
    ref_vit = ViT(**dict(image, window_size=ws, global_blocks=(depth - 1,)))
    used = ("embedding", "pos_embedding", "Transformer", "pre_norm")
    img_params = {k: v for k, v in unscan_params(vlm_params["img"]).items() if k in used}
    _, aux = ref_vit.apply({"params": img_params}, images)
    np.testing.assert_allclose(grid, aux["patch_grid"], rtol=1e-5, atol=1e-5)

    # The window is real: before the last block, changing pixels inside one window leaves every
    # token of the other windows unchanged (and changes its own).
    p = image["patch_size"]
    moved = images.at[:, : ws * p, : ws * p].set(0.5)
    _, aux_moved = ref_vit.apply({"params": img_params}, moved)
    gh = s // p
    before = np.asarray(aux[f"block_{depth - 2}"]).reshape(gh, gh, -1)
    after = np.asarray(aux_moved[f"block_{depth - 2}"]).reshape(gh, gh, -1)
    inside = np.zeros((gh, gh), bool)
    inside[:ws, :ws] = True
    np.testing.assert_allclose(after[~inside], before[~inside], rtol=1e-5, atol=1e-6)
    assert np.abs(after[inside] - before[inside]).max() > 1e-3

    # Every block windowed, with a window of its own (the shapes config's layout): the final map
    # of one window does not depend on the pixels of any other.
    own = _sharing_towers(
        task, _config(**{"infer.vlm_global_blocks": (), "infer.vlm_window_size": ws // 2})
    )
    assert (
        own.frozen_vlm.backbone.global_blocks == ()
        and own.frozen_vlm.backbone.window_size == ws // 2
    )
    w = ws // 2
    windowed_grid = np.asarray(own.frozen_vlm.patch_grid(vlm_params, images))
    moved_grid = np.asarray(
        own.frozen_vlm.patch_grid(vlm_params, images.at[:, : w * p, : w * p].set(0.5))
    )
    inside = np.zeros((gh, gh), bool)
    inside[:w, :w] = True
    np.testing.assert_allclose(
        moved_grid[0][~inside], windowed_grid[0][~inside], rtol=1e-5, atol=1e-6
    )
    assert np.abs(moved_grid[0][inside] - windowed_grid[0][inside]).max() > 1e-3
    # A block index outside the tower is named before anything compiles.
    far = _sharing_towers(task, _config(**{"infer.vlm_global_blocks": (7,)}))
    with pytest.raises(ValueError, match=r"`infer.vlm_global_blocks` = \(7,\).*outside"):
        _ = far.model

    # Global attention everywhere (the earlier behaviour) gives a different map.
    glob_task = _sharing_towers(task, _config(**{"infer.vlm_window_attention": False}))
    assert glob_task.frozen_vlm.backbone is None
    glob = np.asarray(glob_task.frozen_vlm.patch_grid(vlm_params, images))
    assert np.abs(glob - grid).max() > 1e-3

    # Region embeddings: RoIAlign of the windowed map, mean, projection, normalisation.
    boxes = jnp.asarray([[[8.0, 8.0, 60.0, 90.0], [30.0, 2.0, 100.0, 40.0]]], jnp.float32)
    got = np.asarray(task.frozen_vlm.region_embeddings(vlm_params, images, boxes))
    pooled = np.asarray(
        batched_roi_align(
            jnp.asarray(grid),
            boxes,
            output_size=config.roi.pool_size,
            spatial_scale=1.0 / p,
            sampling_ratio=2,
        )
    ).mean(axis=(2, 3))
    emb = pooled @ np.asarray(vlm_params["img_proj"]["kernel"])
    np.testing.assert_allclose(
        got, emb / np.linalg.norm(emb, axis=-1, keepdims=True), rtol=1e-4, atol=1e-5
    )


def test_vlm_scores_pool_proposals_and_share_the_background_row(tiny, monkeypatch):
    """The VLM gets the shrunk proposals (not the refined boxes); its classifier's row 0 is the
    detector's background row."""
    config, task, _, params = tiny
    model, cfg = task.model, task.rcnn
    vocab = task.full_vocabulary
    text = [jnp.asarray(vocab[k]) for k in ("embeddings", "valid")]
    s, e = config.det.image_size, text[0].shape[1]
    images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (1, s, s, 3)), jnp.float32)
    region = jnp.asarray(np.random.default_rng(5).normal(size=(e,)), jnp.float32)
    region /= jnp.linalg.norm(region)
    # Known proposals (an untrained RPN proposes nothing useful).
    y0, x0 = np.random.default_rng(6).uniform(0, s / 2, (2, 1, 6))
    props = jnp.asarray(np.stack([y0, x0, y0 + s / 3, x0 + s / 4], -1), jnp.float32)
    objectness, props_valid = jnp.full((1, 6), 0.5), jnp.ones((1, 6), bool)
    monkeypatch.setattr(
        rcnn, "_batched_proposals", lambda *a, **k: (props, objectness, props_valid)
    )

    def run(params, images):
        seen = []

        def vlm_fn(im, bx):
            seen.append(bx)
            return jnp.broadcast_to(region, bx.shape[:2] + (e,))

        scored = rcnn._region_scores(
            model, params, images, *text, cfg, vlm_fn, jnp.asarray(10.0, jnp.float32)
        )
        return seen[0], scored["boxes"], scored["vlm_logits"]

    seen, refined, vlm_logits = jax.jit(run)(params, images)
    np.testing.assert_allclose(seen, box_ops.shrink_boxes(props, 0.7), rtol=1e-5, atol=1e-4)
    assert not np.allclose(seen, box_ops.shrink_boxes(refined, 0.7), atol=1e-2)
    scale = 1.0 / config.infer.vlm_temperature if config.infer.vlm_temperature else 10.0
    bg = np.asarray(task.background_embedding)
    np.testing.assert_allclose(
        vlm_logits[..., 0], np.full(vlm_logits.shape[:2], float(region @ bg) * scale), rtol=1e-4
    )


def _decode_np(deltas: np.ndarray, boxes: np.ndarray, size: float) -> np.ndarray:
    """Faster R-CNN's box decoding with weights (10, 10, 5, 5), clipped to the image."""
    h, w = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    cy, cx = boxes[..., 0] + h / 2, boxes[..., 1] + w / 2
    dy, dx = deltas[..., 0] / 10, deltas[..., 1] / 10
    dh = np.minimum(deltas[..., 2] / 5, np.log(1000 / 16))
    dw = np.minimum(deltas[..., 3] / 5, np.log(1000 / 16))
    cy, cx, h, w = cy + dy * h, cx + dx * w, h * np.exp(dh), w * np.exp(dw)
    out = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], -1)
    return np.clip(out, 0, size)


def test_box_passes_refine_their_own_boxes_and_average_the_class_probabilities(tiny, monkeypatch):
    """infer.box_passes=2: the box head pools the first pass's boxes and regresses them again;
    the detector's probabilities are the mean of both passes' softmaxes."""
    config, task, _, params = tiny
    model, cfg = task.model, task.rcnn
    vocab = task.full_vocabulary
    text = [jnp.asarray(vocab[k]) for k in ("embeddings", "valid")]
    s = config.det.image_size
    images = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, (1, s, s, 3)), jnp.float32)
    y0, x0 = np.random.default_rng(8).uniform(0, s / 2, (2, 1, 6))
    props = jnp.asarray(np.stack([y0, x0, y0 + s / 3, x0 + s / 4], -1), jnp.float32)
    monkeypatch.setattr(
        rcnn,
        "_batched_proposals",
        lambda *a, **k: (props, jnp.full((1, 6), 0.5), jnp.ones((1, 6), bool)),
    )
    # A box head that moves boxes visibly (the random init's deltas are tiny).
    kernel = params["box_head"]["box"]["kernel"]
    moved = jax.random.normal(jax.random.key(9), kernel.shape, kernel.dtype) * 0.3
    params = {
        **params,
        "box_head": {
            **params["box_head"],
            "box": {"kernel": moved, "bias": 0 * params["box_head"]["box"]["bias"]},
        },
    }
    cfg = {
        n: dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, box_passes=n))
        for n in (1, 2)
    }
    one = rcnn._region_scores(model, params, images, *text, cfg[1], None, None)
    got = rcnn._region_scores(model, params, images, *text, cfg[2], None, None)

    apply = lambda method, *a: model.apply({"params": params}, *a, method=method)  # noqa: E731
    feats = apply(model.features, images)
    pooled = rcnn._pool(feats, one["boxes"], cfg[1].roi.pool_size, cfg[1])
    deltas, emb = apply(model.box_outputs, pooled)
    want_boxes = _decode_np(np.asarray(deltas, np.float64), np.asarray(one["boxes"]), s)
    logits = np.asarray(apply(model.class_logits, emb, *text), np.float64)
    second = np.exp(logits - logits.max(-1, keepdims=True))
    second /= second.sum(-1, keepdims=True)
    np.testing.assert_allclose(got["boxes"], want_boxes, rtol=1e-4, atol=1e-3)
    assert np.abs(np.asarray(got["boxes"]) - np.asarray(one["boxes"])).max() > 1.0
    np.testing.assert_allclose(
        got["det_probs"], (np.asarray(one["det_probs"]) + second) / 2, rtol=1e-4, atol=1e-6
    )
