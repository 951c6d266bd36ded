"""Start from an open_clip checkpoint: one command writes a run, the predictor embeds like open_clip.

open_clip builds the source models (random weights; a small one, and ViT-B-16 at its real
architecture), saves them as safetensors, and `python -m rovit_jax.interop import --from
open_clip` writes a pretraining run with no hand-written config. `Predictor.from_checkpoint` on
that run must give open_clip's own normalised embeddings, each side tokenizing the same caption
strings and preprocessing the same images (of several aspect ratios) its own way: ours with the
CLIP BPE and pixel convention recorded at import, open_clip's with `tokenize` and its
evaluation transform.
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from rovit_jax.interop.__main__ import main as interop_main

TOL = 1e-4
CAPTIONS = [
    "a photo of a dog !( in a park",
    "Hello, World!! It's a CAT &amp; a mouse.",
    "Café naïve résumé — über 10% 中文 🐱",
    "a diagram",
]


def small_clip_config(quick_gelu: bool = False) -> dict:
    """A small open_clip CLIP (2 layers of 64 in each tower) with CLIP's real vocabulary and
    context, so that both sides tokenize real captions."""
    return dict(
        embed_dim=32,
        quick_gelu=quick_gelu,  # True: as OpenAI's weights
        vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
    )


def _images(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(48, 40), (30, 64), (64, 64), (97, 53)]  # portrait, landscape, square, odd
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _randomize(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _reference(model, image_size: int, images, preprocess_cfg=None):
    import open_clip

    transform = open_clip.image_transform(image_size, is_train=False, **(preprocess_cfg or {}))
    pixels = torch.stack([transform(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        zt = model.encode_text(open_clip.tokenize(CAPTIONS), normalize=True).numpy()
        zi = model.encode_image(pixels, normalize=True).numpy()
    return zt, zi


def _import(tmp_path, model, *extra):
    weights = str(tmp_path / "open_clip.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    out = str(tmp_path / "run")
    assert (
        interop_main(["import", "--from", "open_clip", "--weights", weights, "--out", out, *extra])
        == 0
    )
    return out


def _compare(out, zt_ref, zi_ref, images, what):
    from rovit_jax.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(out)
    zt = predictor.embed_texts(CAPTIONS)
    zi = predictor.embed_images(images)
    dt, di = np.abs(zt - zt_ref).max(), np.abs(zi - zi_ref).max()
    print(f"{what}: text max |diff| {dt:.2e}, image max |diff| {di:.2e}")
    assert dt < TOL and di < TOL
    return predictor


def test_small_open_clip_model_from_its_config_json(tmp_path):
    from open_clip.model import CLIP

    cfg = small_clip_config(quick_gelu=True)
    torch.manual_seed(0)
    model = _randomize(CLIP(**cfg), seed=1)
    cfg_path = tmp_path / "model_config.json"
    cfg_path.write_text(json.dumps(cfg))
    out = _import(tmp_path, model, "--open_clip_config", str(cfg_path))
    images = _images(seed=2)
    zt_ref, zi_ref = _reference(model, 32, images)
    predictor = _compare(out, zt_ref, zi_ref, images, "small open_clip")
    # What the run records: CLIP's tokenizer (copied into the run), tower and pixel conventions.
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["tokenizer"]["kind"] == "clip_bpe"
    assert config["tokenizer"]["model_path"].startswith(out)
    assert os.path.isfile(config["tokenizer"]["model_path"])
    assert (
        config["model"]["text"]["pool_type"] == "eos"
        and not config["model"]["text"]["mask_padding"]
    )
    assert config["model"]["image"]["activation"] == "quick_gelu"
    assert config["pp"]["eval_resize"] == "crop" and config["pp"]["interpolation"] == "bicubic"
    # Retrieval over files ranks with the same embeddings.
    folder = tmp_path / "images"
    folder.mkdir()
    for i, a in enumerate(images):
        Image.fromarray(a).save(folder / f"{i}.png")
    ranked = predictor.retrieve(str(folder), CAPTIONS[0], k=4)
    scores = zi_ref @ zt_ref[0]
    order = [f"{i}.png" for i in np.argsort(-scores)]
    assert [os.path.basename(p) for p, _ in ranked] == order
    np.testing.assert_allclose([s for _, s in ranked], np.sort(scores)[::-1], atol=TOL)


def test_vit_b16_at_its_real_architecture_from_the_model_name(tmp_path):
    import open_clip

    torch.manual_seed(0)
    model = _randomize(open_clip.create_model("ViT-B-16"), seed=3)
    out = _import(tmp_path, model, "--model", "ViT-B-16")
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert (config["model"]["text"]["width"], config["model"]["text"]["num_heads"]) == (512, 8)
    assert (config["model"]["image"]["width"], config["pp"]["image_size"]) == (768, 224)
    images = _images(seed=4)
    images = [
        np.asarray(Image.fromarray(a).resize((a.shape[1] * 4, a.shape[0] * 4))) for a in images
    ]
    zt_ref, zi_ref = _reference(model, 224, images)
    _compare(out, zt_ref, zi_ref, images, "open_clip ViT-B-16")


def test_import_without_a_config_refuses_other_formats(tmp_path):
    with pytest.raises(ValueError, match="--from timm needs --config"):
        interop_main(
            ["import", "--from", "timm", "--weights", "x.safetensors", "--out", str(tmp_path / "r")]
        )


def test_detection_finetunes_from_the_imported_run(tmp_path):
    """The README's detection command on the imported run, at CPU size (the shapes world's tiny
    detection config, a few steps): it trains, evaluates and writes its detections."""
    import subprocess
    import sys

    from conftest import xla_flags
    from open_clip.model import CLIP

    cfg = small_clip_config()
    torch.manual_seed(0)
    cfg_path = tmp_path / "model_config.json"
    cfg_path.write_text(json.dumps(cfg))
    run = _import(tmp_path, _randomize(CLIP(**cfg), seed=5), "--open_clip_config", str(cfg_path))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workdir = str(tmp_path / "detect")
    cmd = [
        sys.executable,
        "-m",
        "rovit_jax.main",
        f"--config={os.path.join(repo, 'configs', 'shapes_detect.py')}:tiny,steps=2",
        "--config.init.run_pretraining=False",
        f"--config.init.pretrain_workdir={run}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        f"--workdir={workdir}",
    ]
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))  # one device, as a user's CPU run
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    assert os.path.isfile(os.path.join(workdir, "detections_fused.json"))
    assert "final evaluation at step" in done.stdout + done.stderr


def test_lvis_recipe_init_argument_names_the_imported_run():
    from rovit_jax.config_files import load_config

    for name in ("clip_b16", "siglip_b16"):
        c = load_config(f"lvis_detect:init={name}")
        assert c.init.pretrain_workdir == f"runs/{name}" and not c.init.run_pretraining
        assert tuple(c.det.global_blocks) == (2, 5, 8, 11)  # B/16's ViTDet global blocks
    assert load_config("lvis_detect:init=/data/my_run").init.pretrain_workdir == "/data/my_run"
    assert load_config("lvis_detect").init.pretrain_workdir == ""


def test_export_back_to_open_clip_loads_strictly_and_embeds_the_same(tmp_path):
    """Import an open_clip model, export the run to open_clip's layout: open_clip's CLIP loads
    it with strict=True from the exported config, and embeds exactly as the original does."""
    import open_clip
    from open_clip.model import CLIP
    from safetensors.numpy import load_file

    cfg = small_clip_config()
    torch.manual_seed(0)
    source = _randomize(CLIP(**cfg), seed=6)
    cfg_path = tmp_path / "model_config.json"
    cfg_path.write_text(json.dumps(cfg))
    run = _import(tmp_path, source, "--open_clip_config", str(cfg_path))
    out = str(tmp_path / "exported")
    assert interop_main(["export", "--checkpoint", run, "--out", out, "--layout", "open_clip"]) == 0
    exported_cfg = json.loads(open(os.path.join(out, "open_clip_config.json")).read())
    clone = CLIP(**exported_cfg).eval()
    state = {
        k: torch.from_numpy(v)
        for k, v in load_file(os.path.join(out, "open_clip_model.safetensors")).items()
    }
    clone.load_state_dict(state, strict=True)
    images = _images(seed=7)
    preprocess = open_clip.image_transform(32, is_train=False)
    pixels = torch.stack([preprocess(Image.fromarray(a)) for a in images])
    tokens = open_clip.tokenize(CAPTIONS)
    with torch.no_grad():
        for encode, x in (("encode_text", tokens), ("encode_image", pixels)):
            want = getattr(source, encode)(x, normalize=True).numpy()
            got = getattr(clone, encode)(x, normalize=True).numpy()
            assert np.abs(want - got).max() < TOL, encode


def test_export_to_open_clip_refuses_what_it_cannot_express(tmp_path):
    from rovit_jax.interop.open_clip_export import open_clip_model_config
    from rovit_jax.pretrain_config import pretrain_defaults

    with pytest.raises(ValueError, match=r"pool_type='gap'.*mask_padding=True.*pool_type='mean'"):
        open_clip_model_config(pretrain_defaults())
