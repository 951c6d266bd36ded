"""Tensor-level conversions between this project's (big_vision) parameter layout and PyTorch
transformer layouts (timm, open_clip), in both directions, plus the bookkeeping of an import.

Layout correspondences (D width, H heads, hd = D / H, M MLP width, P patch side):

  ours (flax)                                   torch
  LayerNorm {scale, bias} [D]                   {weight, bias} [D]
  Dense kernel [in, out], bias [out]            Linear weight [out, in], bias [out]
  attention query/key/value kernel [D, H, hd]   fused qkv weight [3D, D] (rows q, k, v; each
                                                head-major: row h * hd + j), bias [3D]
  attention out kernel [H, hd, D]               proj weight [D, D] (columns head-major)
  Conv kernel [P, P, 3, D] (HWIO)               Conv2d weight [D, 3, P, P] (OIHW)

LayerScale (timm ``ls1.gamma``, open_clip ``ls_1.gamma``) multiplies a residual branch's output
by a per-channel vector; it is folded exactly into the branch's last Linear on import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from rovit_jax.interop.report import ImportReport
from rovit_jax.interop.towers import unflatten

__all__ = [
    "BlockNames",
    "TIMM_BLOCK",
    "OPEN_CLIP_BLOCK",
    "Converter",
    "block_to_torch",
    "map_head_to_timm",
    "layer_norm_to_torch",
    "dense_to_torch",
    "load_block",
    "load_map_head",
    "load_layer_norm",
]


@dataclasses.dataclass(frozen=True)
class BlockNames:
    """Names of one pre-LN transformer block's tensors, relative to the block's prefix."""

    norm1: str
    qkv_weight: str
    qkv_bias: str
    out: str  # Linear module name (".weight" / ".bias" appended)
    norm2: str
    fc1: str
    fc2: str
    ls1: str  # LayerScale gamma after attention (absent in most checkpoints)
    ls2: str  # LayerScale gamma after the MLP


TIMM_BLOCK = BlockNames(
    norm1="norm1",
    qkv_weight="attn.qkv.weight",
    qkv_bias="attn.qkv.bias",
    out="attn.proj",
    norm2="norm2",
    fc1="mlp.fc1",
    fc2="mlp.fc2",
    ls1="ls1.gamma",
    ls2="ls2.gamma",
)
OPEN_CLIP_BLOCK = BlockNames(
    norm1="ln_1",
    qkv_weight="attn.in_proj_weight",
    qkv_bias="attn.in_proj_bias",
    out="attn.out_proj",
    norm2="ln_2",
    fc1="mlp.c_fc",
    fc2="mlp.c_proj",
    ls1="ls_1.gamma",
    ls2="ls_2.gamma",
)

_ATTN = "MultiHeadDotProductAttention_0"


# ---- ours -> torch ------------------------------------------------------------------------------
def layer_norm_to_torch(p: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"weight": np.asarray(p["scale"]), "bias": np.asarray(p["bias"])}


def dense_to_torch(p: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {"weight": np.asarray(p["kernel"]).T}
    if "bias" in p:
        out["bias"] = np.asarray(p["bias"])
    return out


def _heads_in(kernel: Any) -> np.ndarray:
    """[D, H, hd] -> Linear weight [H * hd, D]."""
    k = np.asarray(kernel)
    return k.reshape(k.shape[0], -1).T


def _heads_out(kernel: Any) -> np.ndarray:
    """[H, hd, D] -> Linear weight [D, H * hd]."""
    k = np.asarray(kernel)
    return k.reshape(-1, k.shape[-1]).T


def _prefixed(prefix: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def block_to_torch(block: dict[str, Any], names: BlockNames) -> dict[str, np.ndarray]:
    """One `encoderblock_{i}` subtree -> {torch name relative to the block: tensor}."""
    attn = block[_ATTN]
    out = {}
    out.update(_prefixed(names.norm1, layer_norm_to_torch(block["LayerNorm_0"])))
    out[names.qkv_weight] = np.concatenate(
        [_heads_in(attn[n]["kernel"]) for n in ("query", "key", "value")], axis=0
    )
    out[names.qkv_bias] = np.concatenate(
        [np.asarray(attn[n]["bias"]).reshape(-1) for n in ("query", "key", "value")]
    )
    out[f"{names.out}.weight"] = _heads_out(attn["out"]["kernel"])
    out[f"{names.out}.bias"] = np.asarray(attn["out"]["bias"])
    out.update(_prefixed(names.norm2, layer_norm_to_torch(block["LayerNorm_1"])))
    out.update(_prefixed(names.fc1, dense_to_torch(block["MlpBlock_0"]["Dense_0"])))
    out.update(_prefixed(names.fc2, dense_to_torch(block["MlpBlock_0"]["Dense_1"])))
    return out


def map_head_to_timm(head: dict[str, Any]) -> dict[str, np.ndarray]:
    """A `MAPHead_0` subtree -> timm `AttentionPoolLatent` names (relative to `attn_pool`)."""
    attn = head[_ATTN]
    out = {
        "latent": np.asarray(head["probe"]),
        "q.weight": _heads_in(attn["query"]["kernel"]),
        "q.bias": np.asarray(attn["query"]["bias"]).reshape(-1),
        "kv.weight": np.concatenate(
            [_heads_in(attn["key"]["kernel"]), _heads_in(attn["value"]["kernel"])], axis=0
        ),
        "kv.bias": np.concatenate(
            [np.asarray(attn[n]["bias"]).reshape(-1) for n in ("key", "value")]
        ),
        "proj.weight": _heads_out(attn["out"]["kernel"]),
        "proj.bias": np.asarray(attn["out"]["bias"]),
    }
    out.update(_prefixed("norm", layer_norm_to_torch(head["LayerNorm_0"])))
    out.update(_prefixed("mlp.fc1", dense_to_torch(head["MlpBlock_0"]["Dense_0"])))
    out.update(_prefixed("mlp.fc2", dense_to_torch(head["MlpBlock_0"]["Dense_1"])))
    return out


# ---- torch -> ours ------------------------------------------------------------------------------
class Converter:
    """Collects an import: reads checkpoint tensors with shape checks, writes parameters with
    shape checks, and builds the parameter tree and the report.

    Args:
      tensors: {checkpoint name: array}.
      shapes: {parameter path: shape} of the target model (paths joined with "/").
      init_fn: () -> {parameter path: initial value}; called only when some parameter is not
        loaded (initialising a large model is slow).
      source: file name for messages.
      fmt: format name for messages ("timm", ...).
    """

    def __init__(
        self,
        tensors: dict[str, np.ndarray],
        shapes: dict[str, tuple[int, ...]],
        init_fn: Callable[[], dict[str, np.ndarray]],
        *,
        source: str,
        fmt: str,
    ):
        self.tensors = tensors
        self.shapes = shapes
        self._init_fn = init_fn
        self._initial: dict[str, np.ndarray] | None = None
        self.values: dict[str, np.ndarray] = {}
        self.used: set[str] = set()
        self.reasons: dict[str, str] = {}  # checkpoint key -> why it was not loaded
        self.missing_reasons: dict[str, str] = {}  # parameter path -> why it was not loaded
        self.report = ImportReport(source=source, format=fmt)

    def has(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def param_shape(self, path: str) -> tuple[int, ...]:
        return tuple(self.shapes[path])

    def has_param(self, path: str) -> bool:
        return path in self.shapes

    def params(self) -> list[str]:
        return list(self.shapes)

    def initial(self, path: str) -> np.ndarray:
        """The initial value of parameter `path` (initialises the model on first use)."""
        if self._initial is None:
            self._initial = self._init_fn()
        return np.array(self._initial[path])

    def get(self, key: str, shape: tuple[int, ...] | None = None, *, target: str = "") -> Any:
        """The checkpoint tensor `key` (None when absent), checked against `shape`."""
        if key not in self.tensors:
            return None
        arr = np.asarray(self.tensors[key])
        if shape is not None and tuple(arr.shape) != tuple(shape):
            for_what = f" for parameter {target!r}" if target else ""
            raise ValueError(
                f"{self.report.format} tensor {key!r} in {self.report.source} has shape "
                f"{tuple(arr.shape)}, but the model needs {tuple(shape)}{for_what}"
            )
        self.used.add(key)
        return arr

    def put(self, path: str, value: Any, source: str, note: str = "") -> None:
        """Sets parameter `path` (which must exist in the model, with the same shape)."""
        if path not in self.shapes:
            raise KeyError(f"internal: no parameter {path!r} in the model")
        value = np.asarray(value, np.float32)
        want = self.param_shape(path)
        if value.shape != want:
            raise ValueError(
                f"{self.report.format} tensor {source!r} in {self.report.source} gives shape "
                f"{value.shape} for parameter {path!r}, whose shape is {want}"
            )
        self.values[path] = value
        self.report.loaded.append((path, source, note))

    def skip(self, key: str, reason: str) -> None:
        """Marks checkpoint tensor `key` (if present) as deliberately not loaded."""
        if key in self.tensors:
            self.used.add(key)
            self.reasons[key] = reason

    def skip_prefix(self, prefix: str, reason: str) -> None:
        for key in self.tensors:
            if key.startswith(prefix):
                self.skip(key, reason)

    def mark_missing(self, path: str, reason: str) -> None:
        self.missing_reasons[path] = reason

    def note(self, text: str) -> None:
        if text not in self.report.notes:
            self.report.notes.append(text)

    def finish(self, unknown_reason: str = "no counterpart in this model") -> dict[str, Any]:
        """The parameter tree (initial values where nothing was loaded); fills the report."""
        for key in sorted(self.tensors):
            if key in self.reasons:
                self.report.not_loaded.append((key, self.reasons[key]))
            elif key not in self.used:
                self.report.not_loaded.append((key, unknown_reason))
        missing = [path for path in sorted(self.shapes) if path not in self.values]
        for path in missing:
            reason = self.missing_reasons.get(path, "not in the checkpoint")
            self.report.missing.append((path, reason))
        if not self.values:
            first = sorted(self.tensors)[:8]
            raise ValueError(
                f"no tensor of {self.report.source} matched the {self.report.format} layout "
                f"(its first names: {first})"
            )
        values = dict(self.values)
        values.update({path: self.initial(path) for path in missing})
        return unflatten(values)


def load_layer_norm(cv: Converter, src: str, tgt: str) -> None:
    """torch LayerNorm `src`.{weight,bias} -> flax LayerNorm `tgt`/{scale,bias}."""
    d = cv.param_shape(f"{tgt}/scale")
    for torch_name, ours in (("weight", "scale"), ("bias", "bias")):
        value = cv.get(f"{src}.{torch_name}", d, target=f"{tgt}/{ours}")
        if value is not None:
            cv.put(f"{tgt}/{ours}", value, f"{src}.{torch_name}")


def _load_linear(
    cv: Converter, src: str, tgt: str, *, gamma: np.ndarray | None = None, gamma_key: str = ""
) -> None:
    """torch Linear `src` -> flax Dense `tgt`; a LayerScale `gamma` [out] is folded in."""
    d_in, d_out = cv.param_shape(f"{tgt}/kernel")
    w = cv.get(f"{src}.weight", (d_out, d_in), target=f"{tgt}/kernel")
    b = cv.get(f"{src}.bias", (d_out,), target=f"{tgt}/bias")
    note = f"LayerScale {gamma_key} folded in" if gamma is not None else ""
    scale = np.ones((d_out,), np.float32) if gamma is None else gamma
    if w is not None:
        cv.put(f"{tgt}/kernel", w.T * scale[None, :], f"{src}.weight", note)
    if b is not None:
        cv.put(f"{tgt}/bias", b * scale, f"{src}.bias", note)


def _load_heads_in(
    cv: Converter, w: np.ndarray | None, b: np.ndarray | None, tgt: str, w_key: str, b_key: str
) -> None:
    """Linear rows [H * hd, D] (+ bias) -> DenseGeneral kernel [D, H, hd] (+ bias [H, hd])."""
    d, h, hd = cv.param_shape(f"{tgt}/kernel")
    if w is not None:
        cv.put(f"{tgt}/kernel", w.T.reshape(d, h, hd), w_key)
    if b is not None:
        cv.put(f"{tgt}/bias", b.reshape(h, hd), b_key)
    elif w is not None:
        cv.put(f"{tgt}/bias", np.zeros((h, hd), np.float32), b_key, "absent (no bias): zeros")


def _load_heads_out(
    cv: Converter, src: str, tgt: str, *, gamma: np.ndarray | None = None, gamma_key: str = ""
) -> None:
    """Linear [D, H * hd] -> DenseGeneral kernel [H, hd, D]; LayerScale `gamma` folded in."""
    h, hd, d = cv.param_shape(f"{tgt}/kernel")
    w = cv.get(f"{src}.weight", (d, h * hd), target=f"{tgt}/kernel")
    b = cv.get(f"{src}.bias", (d,), target=f"{tgt}/bias")
    note = f"LayerScale {gamma_key} folded in" if gamma is not None else ""
    scale = np.ones((d,), np.float32) if gamma is None else gamma
    if w is not None:
        cv.put(f"{tgt}/kernel", (w * scale[:, None]).T.reshape(h, hd, d), f"{src}.weight", note)
    if b is not None:
        cv.put(f"{tgt}/bias", b * scale, f"{src}.bias", note)


def load_block(cv: Converter, src: str, tgt: str, names: BlockNames) -> None:
    """A torch block at prefix `src` ("blocks.3") -> `tgt` ("Transformer/encoderblock_3")."""
    attn = f"{tgt}/{_ATTN}"
    d, h, hd = cv.param_shape(f"{attn}/query/kernel")
    load_layer_norm(cv, f"{src}.{names.norm1}", f"{tgt}/LayerNorm_0")
    qkv_w = cv.get(f"{src}.{names.qkv_weight}", (3 * h * hd, d), target=f"{attn}/query/kernel")
    qkv_b = cv.get(f"{src}.{names.qkv_bias}", (3 * h * hd,), target=f"{attn}/query/bias")
    for k, name in enumerate(("query", "key", "value")):
        rows = slice(k * h * hd, (k + 1) * h * hd)
        _load_heads_in(
            cv,
            None if qkv_w is None else qkv_w[rows],
            None if qkv_b is None else qkv_b[rows],
            f"{attn}/{name}",
            f"{src}.{names.qkv_weight}[{name}]",
            f"{src}.{names.qkv_bias}[{name}]",
        )
    ls1 = cv.get(f"{src}.{names.ls1}", (d,))
    _load_heads_out(cv, f"{src}.{names.out}", f"{attn}/out", gamma=ls1, gamma_key=names.ls1)
    load_layer_norm(cv, f"{src}.{names.norm2}", f"{tgt}/LayerNorm_1")
    _load_linear(cv, f"{src}.{names.fc1}", f"{tgt}/MlpBlock_0/Dense_0")
    ls2 = cv.get(f"{src}.{names.ls2}", (d,))
    _load_linear(
        cv, f"{src}.{names.fc2}", f"{tgt}/MlpBlock_0/Dense_1", gamma=ls2, gamma_key=names.ls2
    )


def load_map_head(cv: Converter, src: str, tgt: str) -> None:
    """timm `AttentionPoolLatent` at `src` (e.g. "attn_pool") -> our `MAPHead_0` at `tgt`."""
    attn = f"{tgt}/{_ATTN}"
    d, h, hd = cv.param_shape(f"{attn}/query/kernel")
    probe = cv.get(f"{src}.latent", cv.param_shape(f"{tgt}/probe"), target=f"{tgt}/probe")
    if probe is not None:
        cv.put(f"{tgt}/probe", probe, f"{src}.latent")
    q_w = cv.get(f"{src}.q.weight", (h * hd, d), target=f"{attn}/query/kernel")
    q_b = cv.get(f"{src}.q.bias", (h * hd,), target=f"{attn}/query/bias")
    _load_heads_in(cv, q_w, q_b, f"{attn}/query", f"{src}.q.weight", f"{src}.q.bias")
    kv_w = cv.get(f"{src}.kv.weight", (2 * h * hd, d), target=f"{attn}/key/kernel")
    kv_b = cv.get(f"{src}.kv.bias", (2 * h * hd,), target=f"{attn}/key/bias")
    for k, name in enumerate(("key", "value")):
        rows = slice(k * h * hd, (k + 1) * h * hd)
        _load_heads_in(
            cv,
            None if kv_w is None else kv_w[rows],
            None if kv_b is None else kv_b[rows],
            f"{attn}/{name}",
            f"{src}.kv.weight[{name}]",
            f"{src}.kv.bias[{name}]",
        )
    _load_heads_out(cv, f"{src}.proj", f"{attn}/out")
    load_layer_norm(cv, f"{src}.norm", f"{tgt}/LayerNorm_0")
    _load_linear(cv, f"{src}.mlp.fc1", f"{tgt}/MlpBlock_0/Dense_0")
    _load_linear(cv, f"{src}.mlp.fc2", f"{tgt}/MlpBlock_0/Dense_1")
