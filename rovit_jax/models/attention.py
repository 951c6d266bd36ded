"""Scaled dot-product attention kernels, chosen by one setting (`attention`).

Every attention layer of the towers (global and windowed blocks, padded and causal text, the
MAP head) calls `attention_function(impl)`; the choice changes no parameter and no checkpoint.

  einsum  two einsums that divide the output, not the [.., q, k] weights, by the softmax's sum
          (`attention_normalising_output`). XLA fuses it well on CPUs and TPUs; it materialises
          the [heads, q, k] logits.
  xla     `jax.nn.dot_product_attention(implementation="xla")`, JAX's reference kernel (softmax
          in float32 whatever the compute dtype).
  cudnn   `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN's fused (flash) kernel,
          which never materialises the weights. It needs a GPU, bfloat16 or float16 compute, a
          head dimension that is a multiple of 8 and at most 128 (256 from Hopper on; 128 is
          kept for all), and, with a mask, even query and key lengths. Asked for where it does
          not apply, it raises ValueError naming the reason.
  auto    cudnn wherever it applies, einsum elsewhere (the default: on a CPU or TPU it is einsum).

Masks are booleans (True = attend) broadcastable to [batch, heads, q, k], as flax's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "ATTENTION_IMPLS",
    "attention_function",
    "attention_normalising_output",
    "cudnn_device_problem",
    "cudnn_problem",
    "kernel_for",
]

ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MAX_HEAD_DIM = 128


def attention_normalising_output(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
    precision: Any = None,
) -> jax.Array:
    """Softmax attention that divides the output, not the weights, by the softmax's sum.

    Equal to flax's `dot_product_attention` without dropout (masked logits are set to the
    minimum float, so a fully masked row attends uniformly, as there), but the [.., q, k] weights
    are never divided: on a CPU, where the global-attention block's softmax is memory-bound, its
    forward and backward pass take about a fifth less time (benchmarks/detect_step.py). With
    16-bit inputs the logits, the exponentials and their sum are float32, as in
    `jax.nn.dot_product_attention`; only the weighted sum of values runs in the input dtype.

    query [..., q, heads, d], key / value [..., k, heads, d], mask broadcastable to
    [..., heads, q, k] (True = attend) -> [..., q, heads, d].
    """
    depth = query.shape[-1]
    query = query / jnp.sqrt(depth).astype(query.dtype)
    wide = jnp.promote_types(query.dtype, jnp.float32)
    logits = jnp.einsum(
        "...qhd,...khd->...hqk", query, key, precision=precision, preferred_element_type=wide
    )
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    # The shift only keeps exp in range: it cancels in the ratio, so no gradient flows through it.
    shifted = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True)))
    out = jnp.einsum(
        "...hqk,...khd->...qhd", shifted.astype(value.dtype), value, precision=precision
    )
    total = jnp.swapaxes(jnp.sum(shifted, -1), -1, -2)  # [..., q, heads]
    return (out / total[..., None]).astype(value.dtype)


def cudnn_device_problem(dtype: Any, backend: str) -> str | None:
    """Why cuDNN's fused kernel cannot run on `backend` with `dtype` compute (None when it can);
    the part of `cudnn_problem` a config check can answer before any shape is known."""
    if backend != "gpu":
        return f"cuDNN attention needs a GPU; JAX's backend is {backend!r}"
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
        return f"cuDNN attention needs bfloat16 or float16 compute, got {jnp.dtype(dtype).name}"
    return None


def cudnn_problem(
    dtype: Any, head_dim: int, q_len: int, kv_len: int, masked: bool, backend: str
) -> str | None:
    """Why cuDNN's fused kernel cannot run this attention (None when it can)."""
    problem = cudnn_device_problem(dtype, backend)
    if problem is not None:
        return problem
    if head_dim % 8 or head_dim > _CUDNN_MAX_HEAD_DIM:
        return (
            f"cuDNN attention needs a head dimension that is a multiple of 8 and at most "
            f"{_CUDNN_MAX_HEAD_DIM}, got {head_dim}"
        )
    if masked and (q_len % 2 or kv_len % 2):
        return f"cuDNN attention with a mask needs even lengths, got q={q_len}, k={kv_len}"
    return None


def kernel_for(
    impl: str, dtype: Any, head_dim: int, q_len: int, kv_len: int, masked: bool, backend: str
) -> str:
    """The kernel ("einsum", "xla" or "cudnn") that `impl` runs for this attention's shapes."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl in ("einsum", "xla"):
        return impl
    problem = cudnn_problem(dtype, head_dim, q_len, kv_len, masked, backend)
    if impl == "cudnn" and problem is not None:
        raise ValueError(f"attention='cudnn': {problem}")
    return "einsum" if problem else "cudnn"


def _fused(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array | None, implementation: str
) -> jax.Array:
    """`jax.nn.dot_product_attention` on [..., len, heads, d] inputs (any number of batch dims)."""
    batch = query.shape[:-3]
    q = query.reshape(-1, *query.shape[-3:])
    k = key.reshape(-1, *key.shape[-3:])
    v = value.reshape(-1, *value.shape[-3:])
    if mask is not None:
        # [batch, heads or 1, q, k] with q and k spelled out: cuDNN takes the mask as a bias whose
        # last two dimensions must equal the lengths.
        heads = mask.shape[-3] if mask.ndim >= 3 else 1
        full = (*batch, heads, q.shape[1], k.shape[1])
        mask = jnp.broadcast_to(mask, full).reshape(-1, *full[-3:])
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    return out.reshape(*batch, *out.shape[1:])


def attention_function(impl: str = "auto") -> Callable[..., jax.Array]:
    """An `attention_fn` for flax's MultiHeadDotProductAttention that runs `impl`'s kernel.

    The kernel is picked when the layer is traced, from the inputs' dtype and shapes and JAX's
    default backend (see `kernel_for`).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {impl!r}")

    def attend(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        mask: jax.Array | None = None,
        precision: Any = None,
    ) -> jax.Array:
        kernel = kernel_for(
            impl,
            query.dtype,
            query.shape[-1],
            query.shape[-3],
            key.shape[-3],
            mask is not None,
            jax.default_backend(),
        )
        if kernel == "einsum":
            return attention_normalising_output(query, key, value, mask, precision)
        return _fused(query, key, value, mask, kernel)

    return attend
