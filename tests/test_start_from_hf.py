"""Start from Hugging Face `transformers` CLIP and SigLIP state dicts (`--from hf`).

`CLIPModel` (at the default `CLIPConfig`'s architecture, OpenAI's ViT-B/32 layout, and small)
and `SiglipModel` are built with random weights and saved as safetensors beside their
`config.json`; `python -m rovit_jax.interop import --from hf` writes a run; the predictor must
give the model's own normalised features on the same caption strings (Hugging Face's side with
its own tokenizer) and the same images (its side with its own image processor).
"""

import gzip
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_start_from_siglip import _features, _randomize, _siglip, _spm

from rovit_jax.interop.__main__ import main as interop_main

TOL = 1e-4
CAPTIONS = ["a photo of a dog !( in a park", "Hello, World!! It's a CAT.", "Café naïve 中文 🐱"]


def _save(tmp_path, model) -> tuple[str, str]:
    weights, config = str(tmp_path / "model.safetensors"), str(tmp_path / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    with open(config, "w") as f:
        json.dump(model.config.to_dict(), f)
    return weights, config


def _hf_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in SimpleTokenizer().encoder.items()}
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    return CLIPTokenizer(vocab=vocab, merges=[tuple(line.split()) for line in lines])


@pytest.mark.parametrize("base", [False, True], ids=["small", "B32"])
def test_hf_clip_imports_and_embeds_like_transformers(tmp_path, base):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from rovit_jax.inference.predictor import Predictor

    if base:
        config = CLIPConfig()  # ViT-B/32 at 224 px, text 512 wide (openai/clip-vit-base-patch32)
    else:
        config = CLIPConfig(
            text_config=dict(
                hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
            ),
            vision_config=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=32,
        )
    torch.manual_seed(0)
    model = _randomize(CLIPModel(config).eval(), seed=1)
    weights, cfg_path = _save(tmp_path, model)
    out = str(tmp_path / "run")
    argv = ["import", "--from", "hf", "--weights", weights, "--hf_config", cfg_path, "--out", out]
    assert interop_main(argv) == 0
    report = json.loads(open(os.path.join(out, "import_report.json")).read())
    assert not report["missing"] and not report["not_loaded"] and not report["notes"], report

    size = config.vision_config.image_size
    # The PIL backend: the resampling of OpenAI's and open_clip's preprocessing.
    processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=size)
    rng = np.random.default_rng(2)
    # Sizes whose centre crop offsets are whole numbers: Hugging Face floors half pixels where
    # open_clip (torchvision) rounds them, so odd margins would differ by one pixel.
    shapes = [(56, 40), (32, 96), (size, size)] if not base else [(280, 224), (224, 448)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    tok = _hf_clip_tokenizer()
    batch = tok(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        zt_ref = _features(model.get_text_features(**batch)).numpy()
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        zi_ref = _features(model.get_image_features(pixel_values=pixels)).numpy()
    zt_ref /= np.linalg.norm(zt_ref, axis=-1, keepdims=True)
    zi_ref /= np.linalg.norm(zi_ref, axis=-1, keepdims=True)
    predictor = Predictor.from_checkpoint(out)
    zt, zi = predictor.embed_texts(CAPTIONS), predictor.embed_images(images)
    dt, di = np.abs(zt - zt_ref).max(), np.abs(zi - zi_ref).max()
    print(f"HF CLIP ({'B/32' if base else 'small'}): text max |diff| {dt:.2e}, image {di:.2e}")
    assert dt < TOL and di < TOL


def test_hf_siglip_imports_and_embeds_like_transformers(tmp_path):
    from transformers import T5Tokenizer

    from rovit_jax.inference.predictor import Predictor

    model_path = _spm(tmp_path)
    import sentencepiece as spm

    model = _siglip(spm.SentencePieceProcessor(model_file=model_path).get_piece_size(), seed=3)
    weights, cfg_path = _save(tmp_path, model)
    out = str(tmp_path / "run")
    argv = ["import", "--from", "hf", "--weights", weights, "--hf_config", cfg_path]
    assert interop_main([*argv, "--tokenizer", model_path, "--out", out]) == 0
    seq = model.config.text_config.max_position_embeddings
    hf_tok = T5Tokenizer.from_pretrained(str(tmp_path), extra_ids=0, pad_token="</s>")
    captions = ["A photo of a CAT.", "Hello, World!!"]
    ids = hf_tok(captions, max_length=seq, truncation=True, padding="max_length")["input_ids"]
    image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    pixels = torch.from_numpy(image[None].astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    with torch.no_grad():
        zt_ref = _features(model.get_text_features(input_ids=torch.tensor(ids))).numpy()
        zi_ref = _features(model.get_image_features(pixel_values=pixels)).numpy()
    predictor = Predictor.from_checkpoint(out)
    zt, zi = predictor.embed_texts(captions), predictor.embed_images([image])
    zt_ref /= np.linalg.norm(zt_ref, axis=-1, keepdims=True)
    zi_ref /= np.linalg.norm(zi_ref, axis=-1, keepdims=True)
    assert np.abs(zt - zt_ref).max() < TOL and np.abs(zi - zi_ref).max() < TOL


def test_hf_import_refuses_other_model_types(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "bert"}))
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(weights))
    argv = ["import", "--from", "hf", "--weights", str(weights), "--hf_config", str(cfg)]
    with pytest.raises(ValueError, match="model_type 'bert'"):
        interop_main([*argv, "--out", str(tmp_path / "r")])
