"""The pretraining config's `model` (and `model.image`, `model.text`), `loss`, `cpe`, `pp`,
`tokenizer`, `eval` and `optim` sections, typed (with `data`, `data.world` and `data.eval`,
defined in `rovit_jax.data.settings`): each
field's default, allowed values and bounds, written once (paper values as defaults).

`pretrain_config.pretrain_defaults()` builds these sections from the classes and
`tasks.pretrain` resolves them once from a config (`pretrain_settings`); cross-section checks
(the patch size dividing `pp.image_size`, `cpe.up_size` against the patch grid) stay in
`tasks.pretrain.validate_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from rovit_jax.config_sections import (
    Section,
    resolved_sections,
    setting,
)
from rovit_jax.data.pixels import DEFAULT_MEAN, DEFAULT_STD, EVAL_RESIZES, INTERPOLATIONS
from rovit_jax.data.settings import ImageTextDataSettings, RetrievalDataSettings, WorldSettings
from rovit_jax.data.tokenizer import TOKENIZER_KINDS
from rovit_jax.losses.contrastive import CONTRASTIVE_LOSS_KINDS
from rovit_jax.models.layers import ACTIVATIONS, DEFAULT_NORM_EPS
from rovit_jax.models.text import TEXT_POOL_TYPES, text_variant
from rovit_jax.models.vit import POOL_TYPES, vit_variant
from rovit_jax.train.optim import OptimSettings

__all__ = [
    "CPESettings",
    "ImageTowerSettings",
    "ModelSettings",
    "TextTowerSettings",
    "LossSettings",
    "PRETRAIN_SECTIONS",
    "PreprocessSettings",
    "RetrievalEvalSettings",
    "TokenizerSettings",
    "pretrain_settings",
]

_AREA = dict(min_value=0.0, max_value=1.0, min_exclusive=True, ordered=True)  # 0 < lo <= hi <= 1


@dataclasses.dataclass(frozen=True)
class ModelSettings(Section):
    """`model.*`: the shared embedding and the loss's learnable scale and bias."""

    SECTION: ClassVar[str] = "model"

    embed_dim: int = setting(768, min_value=1)  # unverified
    temperature_init: float = setting(10.0, min_value=0.0, min_exclusive=True)  # scale = exp(t)
    bias_init: float | None = setting(None)  # None: no bias (paper); SigLIP uses -10
    # SigLIP's image embedding is its MAP head's output (no projection); its text head has a
    # bias. CLIP and this project project both towers without biases.
    image_head: bool = setting(True, older=True)
    head_bias: bool = setting(False, older=False)


# pre_norm (CLIP's ln_pre), a causal text tower, exact GELU ("gelu"; or "quick_gelu") and
# LayerNorm eps 1e-5 are not RO-ViT's choices; they exist so that CLIP-family weights can be
# imported exactly (rovit_jax.interop sets them from the source). Older run configs lack them.
_ACTIVATION = dict(choices=tuple(sorted(ACTIVATIONS)), older="gelu_tanh")
_SIZE_KEYS = ("width", "depth", "mlp_dim", "num_heads")
_NORM_EPS = dict(min_value=0.0, min_exclusive=True, older=DEFAULT_NORM_EPS)


@dataclasses.dataclass(frozen=True)
class _TowerSettings(Section):
    """What both towers share: their MLP activation and LayerNorm eps, and sizes that override
    the named variant's (any tower a checkpoint holds, e.g. CLIP's 512-wide text tower)."""

    activation: str = setting("gelu_tanh", **_ACTIVATION)
    norm_eps: float = setting(DEFAULT_NORM_EPS, **_NORM_EPS)
    width: int | None = setting(None, min_value=1, older=None)  # None: the variant's
    depth: int | None = setting(None, min_value=1, older=None)
    mlp_dim: int | None = setting(None, min_value=1, older=None)
    num_heads: int | None = setting(None, min_value=1, older=None)

    def _sized(self, size: dict[str, int]) -> dict[str, int]:
        """`size` (a variant's) with this section's overrides; ValueError naming the section's
        keys when the heads do not divide the width."""
        size = dict(size, **{k: v for k in _SIZE_KEYS if (v := getattr(self, k)) is not None})
        if size["width"] % size["num_heads"]:
            raise ValueError(
                f"`{self.SECTION}.num_heads` = {size['num_heads']} must divide the width "
                f"{size['width']} (`{self.SECTION}.width` or variant {self.variant!r})"
            )
        return size


@dataclasses.dataclass(frozen=True)
class ImageTowerSettings(_TowerSettings):
    """`model.image.*`: the ViT (variants: rovit_jax.models.vit.vit_variant)."""

    SECTION: ClassVar[str] = "model.image"

    variant: str = setting("B/16", validate=vit_variant)
    pool_type: str = setting("gap", choices=POOL_TYPES)
    pre_norm: bool = setting(False, older=False)

    def size(self) -> dict[str, int]:
        """{width, depth, mlp_dim, num_heads, patch_size}: the variant's, with the overrides."""
        return self._sized(vit_variant(self.variant))


@dataclasses.dataclass(frozen=True)
class TextTowerSettings(_TowerSettings):
    """`model.text.*`: the text transformer (variants: rovit_jax.models.text.text_variant)."""

    SECTION: ClassVar[str] = "model.text"

    variant: str = setting("B", validate=text_variant)
    pool_type: str = setting("mean", choices=TEXT_POOL_TYPES)
    causal: bool = setting(False, older=False)
    # Ignore everything from the first `tokenizer.pad_id` on (this project's towers). SigLIP's
    # tower attends to its padding and CLIP's pads with id 0, a real piece: both need False.
    mask_padding: bool = setting(True, older=True)

    def size(self) -> dict[str, int]:
        """{width, depth, mlp_dim, num_heads}: the variant's, with the overrides."""
        return self._sized(text_variant(self.variant))


@dataclasses.dataclass(frozen=True)
class LossSettings(Section):
    """`loss.*`: the contrastive loss."""

    SECTION: ClassVar[str] = "loss"

    # "focal" (the paper's focal sigmoid loss), "sigmoid" (SigLIP), "softmax" (CLIP).
    kind: str = setting("focal", choices=CONTRASTIVE_LOSS_KINDS)
    alpha: float = setting(0.5, min_value=0.0, max_value=1.0)  # paper / reference code
    gamma: float = setting(1.0, min_value=0.0)  # paper / reference code
    # Ring-chunked loss when the batch is sharded ("auto"), or forced on / off.
    chunked: bool | str = setting("auto", choices=(True, False, "auto"), older="auto")


@dataclasses.dataclass(frozen=True)
class CPESettings(Section):
    """`cpe.*`: cropped positional embeddings (paper: RRC boxes of area scale [0.1, 1] and aspect
    ratio [0.5, 2], the PE upsampled to the detection grid 1024/16 = 64 first)."""

    SECTION: ClassVar[str] = "cpe"

    enabled: bool = setting(True)
    scale: tuple[float, float] = setting((0.1, 1.0), **_AREA)  # box area fraction
    ratio: tuple[float, float] = setting(
        (0.5, 2.0), min_value=0.0, min_exclusive=True, ordered=True
    )
    up_size: int = setting(64, min_value=1)  # grid the PE is upsampled to before cropping


@dataclasses.dataclass(frozen=True)
class PreprocessSettings(Section):
    """`pp.*`: pretraining image preprocessing."""

    SECTION: ClassVar[str] = "pp"

    image_size: int = setting(224, min_value=1)  # paper: 224 px
    # Random-resized-crop area range; None = plain resize.
    crop_scale: tuple[float, float] | None = setting(None, **_AREA, older=None)
    flip: bool = setting(False, older=False)
    # The towers' pixel convention (rovit_jax.data.pixels), recorded so that detection, the
    # predictor and exports feed them what they were trained or imported with: per-channel
    # (x / 255 - mean) / std (0.5 / 0.5: [-1, 1], as here and in SigLIP; CLIP: its own
    # constants), the resampling, and the evaluation view ("squash" to S x S, or "crop": the
    # shorter side to S and the centre S x S, as CLIP evaluates).
    mean: tuple[float, float, float] = setting(DEFAULT_MEAN, min_value=0.0, older=DEFAULT_MEAN)
    std: tuple[float, float, float] = setting(
        DEFAULT_STD, min_value=0.0, min_exclusive=True, older=DEFAULT_STD
    )
    interpolation: str = setting("bilinear", choices=INTERPOLATIONS, older="bilinear")
    eval_resize: str = setting("squash", choices=EVAL_RESIZES, older="squash")


@dataclasses.dataclass(frozen=True)
class TokenizerSettings(Section):
    """`tokenizer.*`: text length and vocabulary."""

    SECTION: ClassVar[str] = "tokenizer"

    max_len: int = setting(64, min_value=1)  # paper's text length (unverified)
    vocab_size: int = setting(64000, min_value=1)  # SentencePiece 64k of the sibling code
    # "sentencepiece" or "clip_bpe" (OpenAI CLIP / open_clip), see rovit_jax.data.tokenizer.
    kind: str = setting("sentencepiece", choices=TOKENIZER_KINDS, older="sentencepiece")
    # sentencepiece: the .model (needed for real data; the shapes world trains its own).
    # clip_bpe: CLIP's bpe_simple_vocab_16e6.txt.gz ("": the copy open_clip packages).
    model_path: str = setting("", older="")
    # SentencePiece only: BOS first ("auto": when the model has one), EOS last (T5 / SigLIP;
    # kept last when truncating), NFKC + lower-casing first (False: texts as they are).
    add_bos: bool | str = setting("auto", choices=(True, False, "auto"), older="auto")
    add_eos: bool = setting(False, older=False)
    lowercase: bool = setting(True, older=True)
    # Padding id: the model's pad piece (0 here, T5, CLIP) or, for SigLIP, its EOS piece (1).
    pad_id: int = setting(0, min_value=0, older=0)


@dataclasses.dataclass(frozen=True)
class RetrievalEvalSettings(Section):
    """`eval.*` of pretraining: zero-shot retrieval."""

    SECTION: ClassVar[str] = "eval"

    batch_size: int = setting(256, min_value=1)
    recall_ks: tuple[int, ...] = setting((1, 5, 10), min_value=1, nonempty=True)


PRETRAIN_SECTIONS = (
    ImageTextDataSettings,  # before its subsections
    WorldSettings,
    RetrievalDataSettings,
    ModelSettings,  # before its subsections
    ImageTowerSettings,
    TextTowerSettings,
    LossSettings,
    CPESettings,
    PreprocessSettings,
    TokenizerSettings,
    RetrievalEvalSettings,
    OptimSettings,
)


def pretrain_settings(config: Any) -> dict[str, Any]:
    """{section: typed settings} of `config`; ConfigError listing every problem otherwise."""
    return resolved_sections(PRETRAIN_SECTIONS, config)
