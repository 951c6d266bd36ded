"""Evaluation's one-pass scoring of both variants equals separate `rcnn.detect` calls.

In its own file so that the test runner can schedule it beside the slow detector tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_detector import _config, _task

from rovit_jax.detection import rcnn
from rovit_jax.runs import vlm_tower_params


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds_detect_variants"))


def test_fused_and_detector_only_in_one_pass_equal_two_detect_calls(data_dir):
    """Evaluation scores both variants from one backbone pass; each must equal `rcnn.detect`."""
    config = _config()
    task = _task(config, data_dir)
    params = task.init_params(jax.random.key(0))
    vlm_params = vlm_tower_params(task.pretrained.params)
    vocab = task.full_vocabulary
    text = [jnp.asarray(vocab[k]) for k in ("embeddings", "valid", "is_novel")]
    s = config.det.image_size
    images = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, s, s, 3)), jnp.float32)
    vlm_fn = lambda im, bx: task.frozen_vlm.region_embeddings(vlm_params, im, bx)  # noqa: E731
    scale = jnp.exp(vlm_params["t"])
    kw = dict(vlm_region_embeddings_fn=vlm_fn, vlm_logit_scale=scale, with_masks=False)
    run = lambda fn, **k: jax.jit(  # noqa: E731
        lambda p, im: fn(task.model, p, im, *text, task.rcnn, **k)
    )(params, images)
    both = run(rcnn.detect_variants, **kw)
    fused = run(rcnn.detect, **kw)
    plain = run(rcnn.detect)
    assert "masks" not in both["fused"] and "masks" in plain
    with pytest.raises(ValueError, match="vlm_region_embeddings_fn"):
        rcnn.detect_variants(task.model, params, images, *text, task.rcnn, ("fused",))
    for got, want in ((both["fused"], fused), (both["detector_only"], plain)):
        assert int(want["valid"].sum()) > 0
        np.testing.assert_array_equal(got["valid"], want["valid"])
        np.testing.assert_array_equal(got["classes"], want["classes"])
        np.testing.assert_allclose(got["scores"], want["scores"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["boxes"], want["boxes"], rtol=1e-5, atol=1e-4)
    # The two variants rank differently: fusion changes the scores.
    assert not np.allclose(both["fused"]["scores"], both["detector_only"]["scores"])
