"""Start from a big_vision SigLIP checkpoint: the tree becomes a run, the predictor embeds like SigLIP.

The reference is Hugging Face's `SiglipModel` (an independent implementation of big_vision's
SigLIP) with random weights. Its state dict is written as a big_vision `.npz` under the
published big_vision parameter names (attention kernels [width, heads, head_dim], the MAP head,
`txt/head` with its bias, `t`, `b`; no `img/head`), and `python -m rovit_jax.interop import
--from big_vision` turns it into a run with no config. `Predictor.from_checkpoint` must then give
SigLIP's normalised embeddings on the same caption strings (Hugging Face's side tokenizing with
its T5 tokenizer over the same SentencePiece model, padded with EOS as big_vision does) and the
same images.
"""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import train_t5_layout_spm
from PIL import Image

from rovit_jax.interop.__main__ import main as interop_main

TOL = 1e-4
CAPTIONS = ["A photo of a CAT.", "Hello, World!!", "café naïve résumé", "a dog " * 60]
SEQ = 32


def _spm(folder) -> str:
    return train_t5_layout_spm(folder)


def _siglip(vocab: int, seed: int, base: bool = False):
    """A random SiglipModel: small, or at SigLIP B/16's architecture (224 px, 12 layers of 768
    in each tower; the vocabulary is the test's SentencePiece model's)."""
    from transformers import SiglipConfig, SiglipModel

    if base:
        torch.manual_seed(seed)
        config = SiglipConfig(text_config=dict(vocab_size=vocab, max_position_embeddings=64))
        assert (config.vision_config.hidden_size, config.vision_config.patch_size) == (768, 16)
        return _randomize(SiglipModel(config).eval(), seed)
    text = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=SEQ,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(seed)
    return _randomize(
        SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval(), seed
    )


def _randomize(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _big_vision_tree(model) -> dict[str, np.ndarray]:
    """The model's weights under big_vision's names and layouts."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    cfg_v, cfg_t = model.config.vision_config, model.config.text_config
    out: dict[str, np.ndarray] = {}

    def dense(dst, src):
        out[f"{dst}/kernel"], out[f"{dst}/bias"] = sd[f"{src}.weight"].T, sd[f"{src}.bias"]

    def norm(dst, src):
        out[f"{dst}/scale"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def attention(dst, q, k, v, o, heads):
        for name, (w, b) in zip(("query", "key", "value"), (q, k, v)):
            d = w.shape[1]
            out[f"{dst}/{name}/kernel"] = w.T.reshape(d, heads, d // heads)
            out[f"{dst}/{name}/bias"] = b.reshape(heads, d // heads)
        w, b = o
        out[f"{dst}/out/kernel"] = w.T.reshape(heads, w.shape[1] // heads, w.shape[0])
        out[f"{dst}/out/bias"] = b

    def blocks(dst, src, cfg):
        for i in range(cfg.num_hidden_layers):
            s, d = f"{src}.encoder.layers.{i}", f"{dst}/encoderblock_{i}"
            norm(f"{d}/LayerNorm_0", f"{s}.layer_norm1")
            norm(f"{d}/LayerNorm_1", f"{s}.layer_norm2")
            dense(f"{d}/MlpBlock_0/Dense_0", f"{s}.mlp.fc1")
            dense(f"{d}/MlpBlock_0/Dense_1", f"{s}.mlp.fc2")
            a = f"{s}.self_attn"
            attention(
                f"{d}/MultiHeadDotProductAttention_0",
                *[(sd[f"{a}.{n}_proj.weight"], sd[f"{a}.{n}_proj.bias"]) for n in "qkv"],
                (sd[f"{a}.out_proj.weight"], sd[f"{a}.out_proj.bias"]),
                cfg.num_attention_heads,
            )

    out["img/embedding/kernel"] = sd["vision_model.embeddings.patch_embedding.weight"].transpose(
        2, 3, 1, 0
    )
    out["img/embedding/bias"] = sd["vision_model.embeddings.patch_embedding.bias"]
    out["img/pos_embedding"] = sd["vision_model.embeddings.position_embedding.weight"][None]
    blocks("img/Transformer", "vision_model", cfg_v)
    norm("img/Transformer/encoder_norm", "vision_model.post_layernorm")
    out["img/MAPHead_0/probe"] = sd["vision_model.head.probe"]
    w, b = (
        sd["vision_model.head.attention.in_proj_weight"],
        sd["vision_model.head.attention.in_proj_bias"],
    )
    attention(
        "img/MAPHead_0/MultiHeadDotProductAttention_0",
        *zip(np.split(w, 3), np.split(b, 3)),
        (
            sd["vision_model.head.attention.out_proj.weight"],
            sd["vision_model.head.attention.out_proj.bias"],
        ),
        cfg_v.num_attention_heads,
    )
    norm("img/MAPHead_0/LayerNorm_0", "vision_model.head.layernorm")
    dense("img/MAPHead_0/MlpBlock_0/Dense_0", "vision_model.head.mlp.fc1")
    dense("img/MAPHead_0/MlpBlock_0/Dense_1", "vision_model.head.mlp.fc2")
    out["txt/Embed_0/embedding"] = sd["text_model.embeddings.token_embedding.weight"]
    out["txt/pos_embedding"] = sd["text_model.embeddings.position_embedding.weight"][None]
    blocks("txt/Encoder_0", "text_model", cfg_t)
    norm("txt/Encoder_0/encoder_norm", "text_model.final_layer_norm")
    dense("txt/head", "text_model.head")
    out["t"], out["b"] = sd["logit_scale"].reshape(1), sd["logit_bias"].reshape(1)
    return {f"params/{k}": v for k, v in out.items()}


def _features(output):
    return output if torch.is_tensor(output) else output.pooler_output


@pytest.mark.parametrize("base", [False, True], ids=["small", "B16"])
def test_siglip_big_vision_tree_imports_and_embeds_like_siglip(tmp_path, base):
    from transformers import T5Tokenizer

    from rovit_jax.inference.predictor import Predictor

    model_path = _spm(tmp_path)
    vocab = spm.SentencePieceProcessor(model_file=model_path).get_piece_size()
    model = _siglip(vocab, seed=0, base=base)
    size, seq = (224, 64) if base else (32, SEQ)
    weights = str(tmp_path / "siglip.npz")
    np.savez(weights, **_big_vision_tree(model))
    out = str(tmp_path / "run")
    argv = ["import", "--from", "big_vision", "--weights", weights, "--out", out]
    assert interop_main([*argv, "--tokenizer", model_path]) == 0
    report = json.loads(open(os.path.join(out, "import_report.json")).read())
    assert not report["missing"] and not report["not_loaded"], report
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["model"]["image"]["pool_type"] == "map" and not config["model"]["image_head"]
    assert config["model"]["head_bias"] and config["model"]["text"]["num_heads"] == (
        12 if base else 4
    )

    # Hugging Face's side: its T5 tokenizer over the same model, EOS appended and padded with it.
    hf_tok = T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=0, pad_token="</s>")
    ids = hf_tok(CAPTIONS, max_length=seq, truncation=True, padding="max_length")["input_ids"]
    rng = np.random.default_rng(1)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(48, 40), (32, 32), (20, 70)]
    ]
    pixels = (
        np.stack(
            [np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR)) for a in images]
        ).astype(np.float32)
        / 127.5
        - 1.0
    )
    with torch.no_grad():
        zt_ref = _features(model.get_text_features(input_ids=torch.tensor(ids))).numpy()
        zi_ref = _features(
            model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        ).numpy()
    zt_ref /= np.linalg.norm(zt_ref, axis=-1, keepdims=True)
    zi_ref /= np.linalg.norm(zi_ref, axis=-1, keepdims=True)

    predictor = Predictor.from_checkpoint(out)
    np.testing.assert_array_equal(predictor.tokenizer.encode(CAPTIONS), ids)
    zt, zi = predictor.embed_texts(CAPTIONS[:3]), predictor.embed_images(images)
    dt, di = np.abs(zt - zt_ref[:3]).max(), np.abs(zi - zi_ref).max()
    print(
        f"big_vision SigLIP ({'B/16' if base else 'small'}): text max |diff| {dt:.2e}, image max |diff| {di:.2e}"
    )
    assert dt < TOL and di < TOL
    with pytest.raises(ValueError, match="tokens long"):  # longer than the context: refused
        predictor.embed_texts(CAPTIONS[3:])


def test_big_vision_import_without_config_needs_the_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="needs --tokenizer"):
        interop_main(
            ["import", "--from", "big_vision", "--weights", "x.npz", "--out", str(tmp_path / "r")]
        )


@pytest.mark.parametrize("siglip_like", [False, True], ids=["gap_with_head", "map_without_head"])
def test_a_whole_image_region_embeds_like_the_image(siglip_like):
    """The frozen VLM's region path (RoIAlign on the last map, mean, the image head when there
    is one) on a box covering the whole image: for a GAP tower it is the image embedding (up to
    RoIAlign's sampling); a SigLIP-like tower (MAP pooling, no image head) pools the region's
    features by their mean (GAP) and embeds them in the MAP head's width."""
    import jax

    from rovit_jax.interop.towers import init_params
    from rovit_jax.models.frozen_vlm import FrozenRegionEmbedder
    from rovit_jax.models.two_tower import TwoTower

    size = dict(width=64, depth=2, mlp_dim=128, num_heads=4)
    image = dict(size, patch_size=8, posemb_grid=(4, 4), pool_type="map" if siglip_like else "gap")
    text = dict(size, vocab_size=64, max_len=8)
    model = TwoTower(
        image=image,
        text=text,
        embed_dim=64 if siglip_like else 32,
        image_head=not siglip_like,
        head_bias=siglip_like,
    )
    params = init_params(model, seed=0)
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    embedder = FrozenRegionEmbedder.build(
        model, window_attention=False, window_size=2, global_blocks=(), pool_size=7
    )
    boxes = np.tile(np.asarray([[[0.0, 0.0, 32.0, 32.0]]], np.float32), (2, 1, 1))
    region = np.asarray(jax.jit(embedder.region_embeddings)(params, images, boxes))[:, 0]
    assert region.shape == (2, model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(region, axis=-1), 1.0, atol=1e-5)
    if not siglip_like:
        whole = np.asarray(model.apply({"params": params}, images, method=model.embed_images))
        cosine = np.sum(region * whole, axis=-1)
        print(f"whole-image region vs image embedding: cosine {cosine.min():.5f}")
        assert cosine.min() > 0.99, cosine
