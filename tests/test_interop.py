"""Weight interchange: timm export parity, timm / open_clip / big_vision imports, errors, CLI.

PyTorch models (timm, open_clip, a hand-written reference of the documented text layout) are the
oracles; every model gets random values in ALL parameters (biases and norms included), so a
wrongly mapped tensor changes the outputs.
"""

import os
import pickle

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from rovit_jax.config_files import load_config
from rovit_jax.interop import (
    export_image_tower_safetensors,
    export_text_tower_safetensors,
    import_big_vision,
    import_open_clip,
    import_timm,
    read_export,
    timm_model_kwargs,
)
from rovit_jax.interop.__main__ import main as interop_main
from rovit_jax.interop.towers import (
    flatten,
    image_tower,
    init_params,
    param_shapes,
    unflatten,
)
from rovit_jax.models.two_tower import TwoTower
from rovit_jax.models.vit import ViT
from rovit_jax.tasks.pretrain import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4
MU = dict(width=64, depth=2, mlp_dim=256, num_heads=2)  # the "mu" size of the tiny configs


def _tiny_config():
    return load_config("shapes_pretrain:tiny")  # mu/8 at 32 px, text mu, vocab 512, embed 32


def _random_params(model, seed):
    """Random values in every parameter (initial biases are 0 and norm scales 1, which would hide
    mapping bugs); norm scales stay near 1."""
    rng = np.random.default_rng(seed)
    values = {}
    for path, shape in param_shapes(model).items():
        noise = 0.1 * rng.standard_normal(shape).astype(np.float32)
        values[path] = noise + 1.0 if path.endswith("/scale") else noise
    return unflatten(values)


def _randomize_torch(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _images(n=3, size=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def config():
    return _tiny_config()


@pytest.fixture(scope="module")
def two_tower_params(config):
    return _random_params(build_model(config), 1)


@pytest.fixture(scope="module")
def vit_forward(config):
    """The config's image tower, jitted: params, [B, H, W, 3] -> pooled [B, D]."""
    vit = image_tower(config)
    return jax.jit(lambda p, x: vit.apply({"params": p}, x)[0])


# ---- (a) export -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "pool, pre_norm", [("gap", False), ("tok", True), ("map", False)], ids=["gap", "tok_pre", "map"]
)
def test_export_loads_into_timm_with_same_embeddings(tmp_path, pool, pre_norm):
    import timm

    vit = ViT(**MU, patch_size=8, posemb_grid=(4, 4), pool_type=pool, pre_norm=pre_norm)
    proj = 0.1 * np.random.default_rng(3).standard_normal((64, 32)).astype(np.float32)
    params = {"img": _random_params(vit, 2), "img_proj": {"kernel": proj}}
    path = str(tmp_path / "img.safetensors")
    kwargs = export_image_tower_safetensors(params, vit, path)
    assert kwargs == timm_model_kwargs(vit)
    tensors = load_file(path)
    extras = {k: tensors.pop(k) for k in list(tensors) if k.startswith("rovit.")}
    assert set(extras) == {"rovit.img_proj.weight"}
    timm_vit = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    timm_vit.load_state_dict(tensors, strict=True)
    assert timm_vit.pos_embed.shape[1] == 16 + (pool == "tok")

    x = _images()
    with torch.no_grad():
        pooled_t = timm_vit(_nchw(x))
        z_t = F.normalize(pooled_t @ extras["rovit.img_proj.weight"].T, dim=-1).numpy()
    forward = jax.jit(lambda p, x: vit.apply({"params": p}, x)[0])
    pooled = np.asarray(forward(params["img"], x))
    diff = np.abs(pooled_t.numpy() - pooled).max()
    print(f"export {pool} pre_norm={pre_norm}: pooled max |diff| {diff:.2e}")
    assert diff < TOL
    z = pooled @ params["img_proj"]["kernel"]
    assert np.abs(z_t - z / np.linalg.norm(z, axis=-1, keepdims=True)).max() < TOL

    _, meta = read_export(path)
    assert meta["timm_kwargs"] == kwargs and meta["format"] == "rovit_jax.timm_vit.v1"
    back, report = import_timm(path, vit)  # the export imports back to the same tower
    assert [k for k, _ in report.not_loaded] == ["rovit.img_proj.weight"]
    assert not report.missing
    assert np.abs(np.asarray(forward(back, x)) - pooled).max() < TOL


def _torch_text_reference(t, s, tokens):
    """The documented text layout, evaluated with plain torch ops."""
    b, length = tokens.shape
    d, h = s["width"], s["num_heads"]
    eps = s["layer_norm_eps"]
    valid = torch.cumprod((tokens != s["pad_id"]).long(), dim=1).bool()
    mask = valid[:, None, None, :]
    if s["causal"]:
        mask = mask & torch.tril(torch.ones(length, length, dtype=torch.bool))
    x = t["token_embedding.weight"][tokens] + t["pos_embed"][:length]
    for i in range(s["depth"]):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (d,), t[p + "norm1.weight"], t[p + "norm1.bias"], eps)
        qkv = F.linear(y, t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, length, 3, h, d // h).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        att = att.transpose(1, 2).reshape(b, length, d)
        x = x + F.linear(att, t[p + "attn.proj.weight"], t[p + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), t[p + "norm2.weight"], t[p + "norm2.bias"], eps)
        y = F.gelu(F.linear(y, t[p + "mlp.fc1.weight"], t[p + "mlp.fc1.bias"]), approximate="tanh")
        x = x + F.linear(y, t[p + "mlp.fc2.weight"], t[p + "mlp.fc2.bias"])
    x = F.layer_norm(x, (d,), t["norm.weight"], t["norm.bias"], eps)
    assert s["pool_type"] == "mean"
    w = valid.float() / valid.sum(1, keepdim=True)
    pooled = torch.einsum("bl,bld->bd", w, x)
    return F.normalize(pooled @ t["proj.weight"].T, dim=-1)


def test_text_export_matches_documented_layout(tmp_path, config, two_tower_params):
    path = str(tmp_path / "txt.safetensors")
    settings = export_text_tower_safetensors(two_tower_params, config, path)
    tensors, meta = read_export(path)
    assert meta["text_tower"] == settings and meta["format"] == "rovit_jax.text_tower.v1"
    assert tensors["logit_scale"].shape == () == tensors["logit_bias"].shape
    assert float(tensors["logit_scale"]) == pytest.approx(float(two_tower_params["t"].item()))
    assert float(tensors["logit_bias"]) == pytest.approx(float(two_tower_params["b"].item()))
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 512, (4, 32)).astype(np.int32)
    tokens[0, 5:] = 0  # padded
    tokens[1, 12] = 0  # everything from the first pad on is ignored
    tokens[1, 20:] = rng.integers(1, 512, 12)
    ref = _torch_text_reference(
        {k: torch.from_numpy(v) for k, v in tensors.items()},
        settings,
        torch.from_numpy(tokens).long(),
    ).numpy()
    model = build_model(config)
    embed = jax.jit(lambda p, t: model.apply({"params": p}, t, method=model.embed_texts))
    z = embed(two_tower_params, tokens)
    diff = np.abs(ref - np.asarray(z)).max()
    print(f"text export: max |diff| {diff:.2e}")
    assert diff < TOL


# ---- (b) timm import --------------------------------------------------------------------------
def _timm_vit(img_size, seed, act_layer="gelu_tanh"):
    """A small random timm ViT; act_layer=None keeps timm's default (exact GELU)."""
    import timm

    act = {} if act_layer is None else dict(act_layer=act_layer)
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=4.0,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
        num_classes=0,
        **act,
    )
    return _randomize_torch(vit, seed)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_import_timm_same_embeddings(tmp_path, config, vit_forward, fmt):
    vit = _timm_vit(32, seed=4)
    path = str(tmp_path / f"timm.{fmt}")
    if fmt == "safetensors":
        save_file(vit.state_dict(), path)
    else:
        torch.save(vit.state_dict(), path)
    params_img, report = import_timm(path, config)
    assert not report.not_loaded and not report.missing, str(report)
    x = _images(seed=5)
    pooled = vit_forward(params_img, x)
    with torch.no_grad():
        ref = vit(_nchw(x)).numpy()
    diff = np.abs(ref - np.asarray(pooled)).max()
    print(f"timm import ({fmt}): max |diff| {diff:.2e}")
    assert diff < TOL
    # timm's default is exact GELU; this source was built with gelu_tanh, the config's default.
    assert "activation 'gelu', this model 'gelu_tanh'" in " ".join(report.notes)


def test_import_default_timm_vit_exactly_with_exact_gelu(tmp_path, config):
    """A timm ViT with timm's own defaults (exact GELU, eps 1e-6) matches a config that says so."""
    source = _timm_vit(32, seed=12, act_layer=None)
    exact = _tiny_config()
    exact.model.image.activation = "gelu"
    params_img, report = import_timm(source.state_dict(), exact)
    assert not report.not_loaded and not report.missing and not report.notes, str(report)
    x = _images(seed=13)
    vit = image_tower(exact)
    pooled = jax.jit(lambda p, x: vit.apply({"params": p}, x)[0])(params_img, x)
    with torch.no_grad():
        ref = source(_nchw(x)).numpy()
    diff = np.abs(ref - np.asarray(pooled)).max()
    print(f"timm import, exact GELU: max |diff| {diff:.2e}")
    assert diff < TOL
    # The tanh-GELU default differs measurably from the source: the option is what matches.
    approx = jax.jit(lambda p, x: image_tower(config).apply({"params": p}, x)[0])(params_img, x)
    assert np.abs(ref - np.asarray(approx)).max() > 10 * diff
    # Exporting the exact-GELU tower names timm's exact GELU.
    assert timm_model_kwargs(exact)["act_layer"] == "gelu"


def test_import_timm_resizes_position_embeddings(config, vit_forward):
    source = _timm_vit(48, seed=6)  # 6x6 patch grid; the config's is 4x4
    params_img, report = import_timm(source.state_dict(), config)
    pe6 = source.pos_embed.detach().reshape(1, 6, 6, 64).permute(0, 3, 1, 2)
    pe4 = F.interpolate(pe6, size=(4, 4), mode="bilinear", align_corners=False, antialias=False)
    expected = pe4.permute(0, 2, 3, 1)[0].numpy()
    assert np.abs(params_img["pos_embedding"] - expected).max() < 1e-6
    assert any("resized 6x6 -> 4x4" in note for p, _, note in report.loaded if p == "pos_embedding")
    # The imported tower equals a 32 px timm ViT holding the torch-resized embedding.
    small = _timm_vit(32, seed=0)
    state = dict(source.state_dict(), pos_embed=pe4.permute(0, 2, 3, 1).reshape(1, 16, 64))
    small.load_state_dict(state, strict=True)
    x = _images(seed=7)
    pooled = vit_forward(params_img, x)
    with torch.no_grad():
        ref = small(_nchw(x)).numpy()
    assert np.abs(ref - np.asarray(pooled)).max() < TOL


# ---- (c) open_clip ----------------------------------------------------------------------------
def _open_clip_model(seed, defaults=False, vocab_size=512, context_length=16):
    """A small random open_clip CLIP and its model config.

    Configured to match this project's default blocks (tanh GELU, LayerNorm eps 1e-6), or with
    open_clip's own defaults (exact GELU, eps 1e-5) when `defaults`.
    """
    from open_clip.model import CLIP

    same = {} if defaults else dict(act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": 1e-6})
    text = dict(context_length=context_length, vocab_size=vocab_size, width=64, heads=2, layers=2)
    cfg = dict(
        embed_dim=32,
        vision_cfg=dict(layers=2, width=64, head_width=32, patch_size=8, image_size=32, **same),
        text_cfg=dict(text, **same),
    )
    torch.manual_seed(seed)
    return _randomize_torch(CLIP(**cfg), seed), cfg


# Captions with what CLIP's cleaning and BPE must handle: punctuation ("!(" starts with id 0,
# the padding id), upper case, HTML entities, accents, CJK, emoji, a text longer than the context.
CAPTIONS = [
    "a photo of a dog !( in a park",
    "Hello, World!! It's a CAT &amp; a mouse.",
    "Café naïve résumé — über 10% 中文 🐱",
    "",
    "a very long caption " * 30,
]


@pytest.mark.parametrize("defaults", [False, True], ids=["tanh_gelu", "open_clip_defaults"])
def test_import_open_clip_same_embeddings(tmp_path, defaults):
    """The imported model on caption strings, each side with its own tokenizer (ours:
    ClipBpeTokenizer; open_clip's: open_clip.tokenize), equals open_clip's forward pass."""
    import open_clip

    from rovit_jax.data.tokenizer import ClipBpeTokenizer

    source, source_cfg = _open_clip_model(
        seed=8, defaults=defaults, vocab_size=49408, context_length=77
    )
    path = str(tmp_path / "open_clip.pt")
    torch.save({"epoch": 3, "state_dict": source.state_dict()}, path)  # a training checkpoint
    # open_clip's defaults (exact GELU, eps 1e-5) are matched by the towers' options.
    arch = dict(activation="gelu", norm_eps=1e-5) if defaults else {}
    text = dict(MU, vocab_size=49408, max_len=77, pool_type="eos", causal=True, **arch)
    model = TwoTower(
        image=dict(MU, patch_size=8, posemb_grid=(4, 4), pool_type="tok", pre_norm=True, **arch),
        text=dict(text, mask_padding=False),
        embed_dim=32,
        bias_init=None,
    )
    params, report = import_open_clip(path, model, model_cfg=source_cfg)
    assert not report.missing, str(report)
    assert not report.not_loaded, str(report)
    assert not report.notes, report.notes
    x = _images(seed=9)
    tokens = ClipBpeTokenizer(max_len=77).encode(CAPTIONS)
    with torch.no_grad():
        zi_ref = source.encode_image(_nchw(x), normalize=True).numpy()
        zt_ref = source.encode_text(open_clip.tokenize(CAPTIONS), normalize=True).numpy()
    (zi, zt), aux = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t))(params, x, tokens)
    di, dt = np.abs(zi_ref - np.asarray(zi)).max(), np.abs(zt_ref - np.asarray(zt)).max()
    print(f"open_clip import ({defaults=}): image max |diff| {di:.2e}, text {dt:.2e}")
    assert di < TOL and dt < TOL
    assert float(aux["scale"]) == pytest.approx(float(source.logit_scale.detach().exp()), rel=1e-6)
    # Masking from the first pad id (0, also '!') would cut the first caption short.
    first = tokens[0].tolist()
    assert 0 in first[: first.index(49407)]
    masked = model.clone(text=dict(text, mask_padding=True))
    (_, zt_masked), _ = jax.jit(lambda p, x, t: masked.apply({"params": p}, x, t))(
        params, x, tokens
    )
    assert np.abs(zt_ref[0] - np.asarray(zt_masked)[0]).max() > 1e-2
    _, report = import_open_clip(path, masked, model_cfg=source_cfg)
    assert any("mask_padding=True" in note for note in report.notes), report.notes


def test_import_open_clip_reports_what_does_not_match(tmp_path, config):
    source, source_cfg = _open_clip_model(seed=11)
    path = str(tmp_path / "open_clip.safetensors")
    save_file(source.state_dict(), path)
    # The shapes config: GAP (no class token), no pre-norm, bidirectional mean-pooled text, but
    # a context of 32 > open_clip's 16 and a logit bias the checkpoint lacks.
    params, report = import_open_clip(path, config)
    not_loaded = dict(report.not_loaded)
    assert {"visual.class_embedding", "visual.ln_pre.weight", "visual.ln_pre.bias"} <= set(
        not_loaded
    )
    assert "class token" in not_loaded["visual.class_embedding"]
    assert "pre_norm" in not_loaded["visual.ln_pre.weight"]
    assert set(report.missing_paths()) == {"b"}
    notes = " ".join(report.notes)
    for expected in ("causal", "argmax", "activation 'gelu', this model 'gelu_tanh'", "eps 1e-05"):
        assert expected in notes, expected
    pe = source.positional_embedding.detach().numpy()
    assert np.array_equal(params["txt"]["pos_embedding"][:16], pe)
    kept = init_params(build_model(config), int(config.seed))["txt"]["pos_embedding"][16:]
    assert np.array_equal(params["txt"]["pos_embedding"][16:], kept)
    assert "positions 16..31 kept at init" in str(report)
    # With open_clip's model config the notes name each architectural difference.
    _, report = import_open_clip(path, config, model_cfg=source_cfg)
    notes = " ".join(report.notes)
    for expected in ("ln_pre", "pool_type='tok'", "causal mask differs", "pool_type='argmax'"):
        assert expected in notes, (expected, report.notes)
    assert "activation" not in notes and "eps" not in notes


# ---- (d) big_vision ---------------------------------------------------------------------------
def _big_vision_npz(params, path, *, scanned):
    """Writes `params` under big_vision's names and shapes (independent of the importer)."""
    renames = {
        "txt/embedding/": "txt/Embed_0/",
        "txt/Transformer/": "txt/Encoder_0/",
        "img_proj/": "img/head/",
        "txt_proj/": "txt/head/",
    }
    out = {}
    for key, value in flatten(params).items():
        for ours, theirs in renames.items():
            if key.startswith(ours):
                key = theirs + key[len(ours) :]
        if key in ("img/pos_embedding", "txt/pos_embedding"):
            value = value.reshape(1, -1, value.shape[-1])
        out[key] = value
    out["img/head/bias"] = np.ones(32, np.float32)
    out["txt/head/bias"] = np.ones(32, np.float32)
    if scanned:
        stacked = {}
        for key, value in out.items():
            if "/encoderblock_" in key:
                head, rest = key.split("/encoderblock_", 1)
                index, tail = rest.split("/", 1)
                stacked.setdefault(f"{head}/encoderblock/{tail}", {})[int(index)] = value
            else:
                stacked[key] = value
        out = {
            k: np.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v
            for k, v in stacked.items()
        }
        assert out["img/Transformer/encoderblock/LayerNorm_0/scale"].shape == (2, 64)
    np.savez(path, **{f"params/{k}": v for k, v in out.items()})


@pytest.mark.parametrize("scanned", [False, True], ids=["unscanned", "scanned"])
def test_import_big_vision_round_trip(tmp_path, config, two_tower_params, scanned):
    path = str(tmp_path / "siglip.npz")
    _big_vision_npz(two_tower_params, path, scanned=scanned)
    params, report = import_big_vision(path, config)
    got, want = flatten(params), flatten(two_tower_params)
    assert set(got) == set(want)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    assert not report.missing
    assert dict(report.not_loaded).keys() == {"img/head/bias", "txt/head/bias"}


# ---- (e) errors -------------------------------------------------------------------------------
def test_shape_mismatch_names_the_tensor(tmp_path, config):
    state = _timm_vit(32, seed=12).state_dict()
    state["blocks.1.mlp.fc1.weight"] = state["blocks.1.mlp.fc1.weight"][:200]
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.fc1\.weight.*\(200, 64\).*\(256, 64\)"):
        import_timm(state, config)
    with pytest.raises(ValueError, match=r"token_embedding\.weight.*\(512, 64\).*\(100, 64\)"):
        small_vocab = build_model(config).clone(text=dict(build_model(config).text, vocab_size=100))
        import_open_clip(_open_clip_model(seed=13)[0].state_dict(), small_vocab)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_are_refused(tmp_path, config):
    arrays = {k: v.numpy() for k, v in _timm_vit(32, seed=14).state_dict().items()}
    for name in ("weights.pkl", "weights.pt"):
        path = tmp_path / name
        with open(path, "wb") as f:
            pickle.dump(arrays, f)
        with pytest.raises(ValueError, match="refus"):
            import_timm(str(path), config)
    path = tmp_path / "objects.npz"
    np.savez(path, **{"params/t": np.array([{"not": "a tensor"}], dtype=object)})
    with pytest.raises(ValueError, match="refus"):
        import_big_vision(str(path), config)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        import_timm(str(tmp_path / "missing.safetensors"), config)


# ---- CLI --------------------------------------------------------------------------------------
def test_cli_import_then_export(tmp_path, config):
    import timm

    from rovit_jax.tasks.pretrain import PretrainTask
    from rovit_jax.train import mesh as mesh_lib
    from rovit_jax.train.checkpoint import Checkpointer, abstract_with_shardings
    from rovit_jax.train.trainer import Trainer

    source = _timm_vit(32, seed=15)
    weights = str(tmp_path / "timm.safetensors")
    save_file(source.state_dict(), weights)
    workdir = str(tmp_path / "run")
    config_spec = os.path.join(REPO, "configs", "shapes_pretrain.py") + ":tiny"
    args = ["import", "--from", "timm", "--weights", weights, "--config", config_spec]
    assert interop_main([*args, "--out", workdir]) == 0
    assert os.path.isfile(os.path.join(workdir, "import_report.txt"))

    # What `python -m rovit_jax.main` does on start: restore the latest checkpoint.
    trainer = Trainer(
        config, PretrainTask(config, check_files=False), mesh_lib.make_mesh(config.mesh)
    )
    ckpt = Checkpointer(workdir, read_only=True)
    step, state, input_state = ckpt.restore_latest(
        abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
    )
    ckpt.close()
    assert step == 0 and int(state["step"]) == 0 and input_state["next_step"] == 0
    expected, _ = import_timm(weights, config)
    restored = flatten(jax.tree.map(np.asarray, state["params"]["img"]))
    for key, value in flatten(expected).items():
        assert np.array_equal(restored[key], value), key

    out = str(tmp_path / "export")
    assert interop_main(["export", "--checkpoint", workdir, "--out", out]) == 0
    tensors = load_file(os.path.join(out, "image_tower.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.startswith("rovit.")}
    _, meta = read_export(os.path.join(out, "image_tower.safetensors"))
    exported = timm.create_model("vit_base_patch16_224", pretrained=False, **meta["timm_kwargs"])
    exported.load_state_dict(tensors, strict=True)
    x = _nchw(_images(seed=16))
    with torch.no_grad():
        assert torch.allclose(exported.eval()(x), source(x), atol=TOL)
    assert os.path.isfile(os.path.join(out, "text_tower.safetensors"))
    with pytest.raises(FileExistsError):
        interop_main([*args, "--out", workdir])
