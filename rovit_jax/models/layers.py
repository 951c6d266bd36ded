"""Transformer building blocks shared by the image and text towers (pre-LN, big_vision naming).

Parameter layout of an encoder (kept stable: checkpoint converters map these names)::

  Transformer/encoderblock_{i}/LayerNorm_0
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0/{query,key,value,out}
  Transformer/encoderblock_{i}/LayerNorm_1
  Transformer/encoderblock_{i}/MlpBlock_0/{Dense_0,Dense_1}
  Transformer/encoder_norm

With ``scan_layers`` the blocks are one scanned module ``Transformer/encoderblock/...`` whose
leaves carry a leading [depth] axis; `unscan_params` converts such a tree to the layout above.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rovit_jax.models.attention import attention_function
from rovit_jax.models.logical_axes import EMBED, HEADS, KV, LAYERS, MLP, named

__all__ = [
    "TRANSFORMER_SIZES",
    "COMPUTE_DTYPES",
    "REMAT_POLICIES",
    "transformer_size",
    "MlpBlock",
    "Encoder1DBlock",
    "Encoder",
    "MAPHead",
    "unscan_params",
]

Dtype = Any

# name -> (width, depth, mlp_dim, num_heads). The last three are tiny sizes for CPU runs.
TRANSFORMER_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "mu": (64, 2, 256, 2),
    "pico": (96, 3, 384, 3),
    "nano": (128, 4, 512, 4),
}

REMAT_POLICIES = ("none", "full", "dots")
# Values of the `compute_dtype` setting (parameters and optimizer state stay float32).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# The sharding of [batch, ...] activations, set by the trainer while it traces a train step.
# Only the scanned block uses it: XLA's propagation does not carry the batch sharding into a
# scan's loop carry under wide FSDP (it split the hidden dimension instead and kept the whole
# global batch on every device). The mesh stays out of the model: the trainer supplies it.
_BATCH_SHARDING: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "batch_sharding", default=None
)


@contextlib.contextmanager
def batch_sharding(sharding: Any) -> Iterator[None]:
    """Within this context, scanned blocks constrain their [B, ...] carry to `sharding`."""
    token = _BATCH_SHARDING.set(sharding)
    try:
        yield
    finally:
        _BATCH_SHARDING.reset(token)


def transformer_size(name: str) -> dict[str, int]:
    """Returns {width, depth, mlp_dim, num_heads} of a size name such as "B" or "mu"."""
    if name not in TRANSFORMER_SIZES:
        raise ValueError(f"unknown variant {name!r}; known sizes: {sorted(TRANSFORMER_SIZES)}")
    width, depth, mlp_dim, num_heads = TRANSFORMER_SIZES[name]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)


def check_remat_policy(remat_policy: str) -> None:
    if remat_policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {remat_policy!r}")


# MLP activations by name: flax's default tanh-approximate GELU (big_vision, SigLIP), the exact
# erf GELU (timm and open_clip defaults) and OpenAI CLIP's QuickGELU. Not stored in weights, so
# importing a checkpoint exactly needs the source's choice.
ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
}
DEFAULT_NORM_EPS = 1e-6  # flax's LayerNorm default (= timm's ViTs); torch's default is 1e-5


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def _attention_inits() -> dict[str, Any]:
    """Flax attention's initialisers (Xavier kernels, zero biases) with logical names: query /
    key / value kernels [D, heads, head_dim] and biases [heads, head_dim], output [heads,
    head_dim, D] (its bias stays unnamed)."""
    xavier = nn.initializers.xavier_uniform()
    return dict(
        kernel_init=named(xavier, EMBED, HEADS, KV),
        bias_init=named(nn.initializers.zeros, HEADS, KV),
        out_kernel_init=named(xavier, HEADS, KV, EMBED),
        out_bias_init=nn.initializers.zeros,
    )


class MlpBlock(nn.Module):
    """Transformer MLP: Dense -> activation (GELU) -> Dropout -> Dense. [..., D] -> [..., D]."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dense = dict(dtype=self.dtype, param_dtype=jnp.float32)
        xavier, tiny = nn.initializers.xavier_uniform(), nn.initializers.normal(stddev=1e-6)
        d = x.shape[-1]
        x = nn.Dense(
            self.mlp_dim,
            name="Dense_0",
            kernel_init=named(xavier, EMBED, MLP),
            bias_init=named(tiny, MLP),
            **dense,
        )(x)
        x = ACTIVATIONS[self.activation](x)
        x = nn.Dropout(rate=self.dropout)(x, deterministic)
        return nn.Dense(
            d, name="Dense_1", kernel_init=named(xavier, MLP, EMBED), bias_init=tiny, **dense
        )(x)


def _window_partition(
    x: jax.Array, grid_hw: tuple[int, int], window: int
) -> tuple[jax.Array, jax.Array]:
    """Splits [B, h*w, D] tokens into windows.

    Returns:
      windows [B * nw, window**2, D] (zero padded at the bottom/right) and
      valid [B * nw, window**2] bool marking real (non-padding) tokens.
    """
    b, _, d = x.shape
    h, w = grid_hw
    ph, pw = (-h) % window, (-w) % window
    hp, wp = (h + ph) // window, (w + pw) // window

    def split(t: jax.Array) -> jax.Array:  # [B, h+ph, w+pw, C] -> [B*nw, window**2, C]
        c = t.shape[-1]
        t = t.reshape(t.shape[0], hp, window, wp, window, c).transpose(0, 1, 3, 2, 4, 5)
        return t.reshape(t.shape[0] * hp * wp, window * window, c)

    x = jnp.pad(x.reshape(b, h, w, d), ((0, 0), (0, ph), (0, pw), (0, 0)))
    valid = jnp.pad(jnp.ones((1, h, w, 1), bool), ((0, 0), (0, ph), (0, pw), (0, 0)))
    valid = jnp.tile(split(valid)[..., 0], (b, 1))
    return split(x), valid


def _window_merge(x: jax.Array, batch: int, grid_hw: tuple[int, int], window: int) -> jax.Array:
    """Inverse of _window_partition: [B * nw, window**2, D] -> [B, h*w, D]."""
    h, w = grid_hw
    hp, wp = -(-h // window), -(-w // window)
    d = x.shape[-1]
    x = x.reshape(batch, hp, wp, window, window, d).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(batch, hp * window, wp * window, d)[:, :h, :w]
    return x.reshape(batch, h * w, d)


def _num_shards(sharding: Any) -> int:
    """How many ways `sharding` splits the leading dimension."""
    spec = sharding.spec[0] if len(sharding.spec) else None
    axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
    n = 1
    for a in axes:
        n *= sharding.mesh.shape[a]
    return n


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)); x + MLP(LN(x)). [B, N, D] -> [B, N, D].

    ``window_size > 0`` restricts attention to non-overlapping windows of the (h, w) token grid
    ``grid_hw`` (ViTDet-style local attention; padding tokens are masked out, and the parameters
    are the same as for global attention so one checkpoint serves both).
    """

    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    window_size: int = 0
    grid_hw: tuple[int, int] | None = None
    scanned: bool = False  # return (x, None), the carry/output pair nn.scan expects
    activation: str = "gelu_tanh"
    norm_eps: float = DEFAULT_NORM_EPS
    attention: str = "auto"  # see rovit_jax.models.attention

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool = True, mask: jax.Array | None = None
    ) -> jax.Array | tuple[jax.Array, None]:
        """x: [B, N, D]; mask: None or bool broadcastable to [B, heads, N, N] (True = attend)."""
        sharding = _BATCH_SHARDING.get() if self.scanned else None
        if sharding is not None and x.shape[0] % _num_shards(sharding) == 0:
            x = jax.lax.with_sharding_constraint(x, sharding)
        attn = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            deterministic=deterministic,
            name="MultiHeadDotProductAttention_0",
            attention_fn=attention_function(self.attention),
            **_attention_inits(),
        )
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="LayerNorm_0")(x)
        if self.window_size > 0:
            if mask is not None:
                raise ValueError("window attention does not take an attention mask")
            if self.grid_hw is None or self.grid_hw[0] * self.grid_hw[1] != x.shape[1]:
                raise ValueError(
                    f"window attention needs grid_hw with h*w == {x.shape[1]} tokens, "
                    f"got grid_hw={self.grid_hw!r}"
                )
            win, valid = _window_partition(y, self.grid_hw, self.window_size)
            win = attn(win, win, mask=valid[:, None, None, :])
            y = _window_merge(win, x.shape[0], self.grid_hw, self.window_size)
        else:
            y = attn(y, y, mask=mask)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        x = x + y
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="LayerNorm_1")(x)
        y = MlpBlock(
            mlp_dim=self.mlp_dim,
            dropout=self.dropout,
            dtype=self.dtype,
            activation=self.activation,
            name="MlpBlock_0",
        )(y, deterministic)
        y = nn.Dropout(rate=self.dropout)(y, deterministic)
        return (x + y, None) if self.scanned else x + y


class Encoder(nn.Module):
    """A stack of pre-LN blocks plus the final LayerNorm "encoder_norm".

    ``window_sizes`` gives each block its attention window (0 = global); empty means all global.
    ``scan_layers`` runs the (identical, global-attention) blocks as one `nn.scan`: XLA compiles
    one block instead of `depth` copies, which cuts compile time of deep models; parameters are
    stacked along a leading [depth] axis and the per-block outputs `block_{i}` are not returned.
    """

    depth: int
    mlp_dim: int
    num_heads: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    window_sizes: tuple[int, ...] = ()
    grid_hw: tuple[int, int] | None = None
    scan_layers: bool = False
    activation: str = "gelu_tanh"  # see ACTIVATIONS
    norm_eps: float = DEFAULT_NORM_EPS
    attention: str = "auto"  # see rovit_jax.models.attention

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool = True, mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """x: [B, N, D] -> (normed [B, N, D], aux {"block_{i}": [B, N, D]}, empty when scanned)."""
        check_remat_policy(self.remat_policy)
        check_activation(self.activation)
        if self.window_sizes and len(self.window_sizes) != self.depth:
            raise ValueError(
                f"window_sizes must have depth={self.depth} entries, got {self.window_sizes!r}"
            )
        block_cls = Encoder1DBlock
        if self.remat_policy != "none":
            policy = (
                jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                if self.remat_policy == "dots"
                else None
            )
            # Argument 2 (`deterministic`; 0 is self) selects Python control flow: keep it static.
            # Inside a scan, CSE cannot merge the recomputation away, so its prevention is moot.
            block_cls = nn.remat(
                Encoder1DBlock,
                policy=policy,
                static_argnums=(2,),
                prevent_cse=not self.scan_layers,
            )
        aux = {}
        final_norm = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="encoder_norm")
        if self.scan_layers:
            if any(self.window_sizes):
                raise ValueError(
                    "scan_layers needs identical blocks; window attention in some blocks "
                    f"(window_sizes={self.window_sizes!r}) is not supported"
                )
            x, _ = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )(
                mlp_dim=self.mlp_dim,
                num_heads=self.num_heads,
                dropout=self.dropout,
                dtype=self.dtype,
                grid_hw=self.grid_hw,
                scanned=True,
                activation=self.activation,
                norm_eps=self.norm_eps,
                attention=self.attention,
                name="encoderblock",
            )(x, deterministic, mask)
            return final_norm(x), aux
        for i in range(self.depth):
            window = self.window_sizes[i] if self.window_sizes else 0
            x = block_cls(
                mlp_dim=self.mlp_dim,
                num_heads=self.num_heads,
                dropout=self.dropout,
                dtype=self.dtype,
                window_size=window,
                grid_hw=self.grid_hw,
                activation=self.activation,
                norm_eps=self.norm_eps,
                attention=self.attention,
                name=f"encoderblock_{i}",
            )(x, deterministic, mask)
            aux[f"block_{i}"] = x
        return final_norm(x), aux


def unscan_params(tree: Any) -> Any:
    """Splits every scanned `encoderblock` subtree (leaves [depth, ...]) into `encoderblock_{i}`.

    Works on any nested dict of parameters (a whole model or one tower); other entries are
    returned unchanged. Used to load a checkpoint trained with ``scan_layers`` into a model built
    without it (e.g. a detector backbone with window attention).
    """
    if not isinstance(tree, dict) and not hasattr(tree, "items"):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "encoderblock" and hasattr(value, "items"):
            depth = {int(leaf.shape[0]) for leaf in jax.tree.leaves(value)}
            if len(depth) != 1:
                raise ValueError(f"scanned encoderblock leaves disagree on depth: {sorted(depth)}")
            for i in range(depth.pop()):
                out[f"encoderblock_{i}"] = jax.tree.map(lambda a, i=i: a[i], dict(value))
        else:
            out[key] = unscan_params(value)
    return out


class MAPHead(nn.Module):
    """Multihead attention pooling with a learned probe: [B, N, D] -> [B, D]."""

    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    activation: str = "gelu_tanh"
    norm_eps: float = DEFAULT_NORM_EPS
    attention: str = "auto"  # see rovit_jax.models.attention

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x: [B, N, D]; mask: None or [B, N] bool of tokens that may be attended."""
        b, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), jnp.float32)
        probe = jnp.tile(probe, (b, 1, 1)).astype(self.dtype)
        attn_mask = None if mask is None else mask[:, None, None, :]
        x = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="MultiHeadDotProductAttention_0",
            # One query: where cuDNN cannot take it (a masked row), even attention="cudnn" runs
            # the einsum kernel here rather than fail.
            attention_fn=attention_function(
                "auto" if self.attention == "cudnn" else self.attention
            ),
            **_attention_inits(),
        )(probe, x, mask=attn_mask)
        y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="LayerNorm_0")(x)
        x = x + MlpBlock(
            mlp_dim=self.mlp_dim, dtype=self.dtype, activation=self.activation, name="MlpBlock_0"
        )(y)
        return x[:, 0]
