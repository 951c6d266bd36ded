"""Image-text contrastive losses: softmax (CLIP/ALIGN), sigmoid (SigLIP) and focal (RO-ViT).

Every loss works on a square image-by-text logit matrix

    logits[i, j] = scale * <zimg_i, ztxt_j> + bias,        shape [B, B],

with the matching (positive) pairs on the diagonal.

`chunked_contrastive_loss` computes the same values from sharded embeddings without ever building the
global [B, B] matrix: every batch shard keeps its image block and the text blocks travel round a ring
of the batch shards, so each device only holds [B/n, B/n] logit blocks at a time.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

LossFn = Callable[[jax.Array], jax.Array]

CONTRASTIVE_LOSS_KINDS: tuple[str, ...] = ("softmax", "sigmoid", "focal")


# ---------------------------------------------------------------------------------------------------
# Shared helpers.
# ---------------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in CONTRASTIVE_LOSS_KINDS:
        raise ValueError(
            f"Unknown contrastive loss kind={kind!r}; valid kinds are {list(CONTRASTIVE_LOSS_KINDS)}."
        )


def _check_focal_params(alpha: float, gamma: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got alpha={alpha!r}.")
    if float(gamma) < 0.0:
        raise ValueError(f"gamma must be non-negative, got gamma={gamma!r}.")


def _check_square_logits(logits: jax.Array) -> None:
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(
            f"logits must be a square [B, B] matrix, got logits.shape={tuple(logits.shape)}."
        )
    if logits.shape[0] == 0:
        raise ValueError("logits must have a non-empty batch, got logits.shape=(0, 0).")


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    # Losses are reduced over B*B entries: never accumulate in bf16/fp16.
    return jnp.promote_types(dtype, jnp.float32)


def _focal_terms(
    logits: jax.Array, positive: jax.Array | bool, alpha: float, gamma: float
) -> jax.Array:
    """Elementwise focal terms -w * (1 - p_t)^gamma * log(p_t).

    Args:
      logits: [..., rows, cols] logits z.
      positive: boolean mask broadcastable to `logits` (True where the pair matches) or a Python bool.
      alpha: positives are weighted by 2*alpha, negatives by 2*(1 - alpha).
      gamma: focusing exponent (0 gives the plain sigmoid loss).

    Returns:
      [..., rows, cols] non-negative loss terms.
    """
    sign = jnp.where(positive, 1.0, -1.0).astype(logits.dtype)
    z_t = sign * logits
    log_p_t = jax.nn.log_sigmoid(z_t)
    weight = jnp.where(positive, 2.0 * alpha, 2.0 * (1.0 - alpha)).astype(logits.dtype)
    # (1 - p_t)^gamma = sigmoid(-z_t)^gamma, taken in log space: stays finite (and its gradient
    # stays finite) for gamma = 0 and for |z| in the thousands, where 1 - sigmoid(z_t) underflows.
    modulator = jnp.exp(gamma * jax.nn.log_sigmoid(-z_t))
    return -weight * modulator * log_p_t


def _sigmoid_terms(logits: jax.Array, positive: jax.Array | bool) -> jax.Array:
    """Elementwise SigLIP terms -log_sigmoid(label * z), label = +1 / -1; shape of `logits`."""
    sign = jnp.where(positive, 1.0, -1.0).astype(logits.dtype)
    return -jax.nn.log_sigmoid(sign * logits)


# ---------------------------------------------------------------------------------------------------
# Unchunked losses on a full [B, B] logit matrix.
# ---------------------------------------------------------------------------------------------------


def softmax_contrastive_loss(logits: jax.Array) -> jax.Array:
    """Symmetric softmax cross-entropy of CLIP/ALIGN.

    Args:
      logits: [B, B] image-by-text logits, positives on the diagonal.

    Returns:
      Scalar 0.5 * (mean_i CE(row i -> i) + mean_j CE(column j -> j)).
    """
    _check_square_logits(logits)
    logits = logits.astype(_compute_dtype(logits.dtype))
    diag = jnp.diagonal(logits)
    i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diag)
    t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diag)
    return 0.5 * (i2t + t2i)


def sigmoid_contrastive_loss(logits: jax.Array) -> jax.Array:
    """SigLIP pairwise sigmoid loss.

    Args:
      logits: [B, B] image-by-text logits, positives on the diagonal.

    Returns:
      Scalar sum_ij -log_sigmoid(label_ij * logits_ij) / B with label +1 on the diagonal, -1 elsewhere.
    """
    _check_square_logits(logits)
    logits = logits.astype(_compute_dtype(logits.dtype))
    batch = logits.shape[0]
    positive = jnp.eye(batch, dtype=bool)
    return jnp.sum(_sigmoid_terms(logits, positive)) / batch


def focal_contrastive_loss(
    logits: jax.Array, *, alpha: float = 0.5, gamma: float = 1.0
) -> jax.Array:
    """RO-ViT focal contrastive loss: an independent sigmoid focal loss on every entry.

    With p_t = sigmoid(z) for positives and 1 - sigmoid(z) for negatives each entry contributes
    -w * (1 - p_t)^gamma * log(p_t), w = 2*alpha (positives) or 2*(1 - alpha) (negatives).
    gamma=0, alpha=0.5 is exactly `sigmoid_contrastive_loss`.

    Args:
      logits: [B, B] image-by-text logits, positives on the diagonal.
      alpha: class-balance weight in [0, 1]; 0.5 weighs every entry by 1.
      gamma: focusing exponent >= 0.

    Returns:
      Scalar sum over all B*B terms divided by B.
    """
    _check_square_logits(logits)
    _check_focal_params(alpha, gamma)
    logits = logits.astype(_compute_dtype(logits.dtype))
    batch = logits.shape[0]
    positive = jnp.eye(batch, dtype=bool)
    return jnp.sum(_focal_terms(logits, positive, alpha, gamma)) / batch


def contrastive_loss_fn(kind: str, *, alpha: float = 0.5, gamma: float = 1.0) -> LossFn:
    """Returns the unchunked loss `logits [B, B] -> scalar` for `kind` in softmax/sigmoid/focal.

    `alpha` and `gamma` are only used by the focal loss.
    """
    _check_kind(kind)
    if kind == "softmax":
        return softmax_contrastive_loss
    if kind == "sigmoid":
        return sigmoid_contrastive_loss
    _check_focal_params(alpha, gamma)
    return functools.partial(focal_contrastive_loss, alpha=alpha, gamma=gamma)


# ---------------------------------------------------------------------------------------------------
# Chunked (ring) loss over a batch-sharded mesh.
# ---------------------------------------------------------------------------------------------------


def _block_logits(zimg: jax.Array, ztxt: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """[b, E] x [b, E] -> [b, b] logits in the loss compute dtype."""
    dtype = _compute_dtype(jnp.result_type(zimg, ztxt))
    sims = jnp.einsum("ie,je->ij", zimg, ztxt, preferred_element_type=dtype)
    return scale.astype(dtype) * sims + bias.astype(dtype)


def _ring_sum_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    axes: tuple[str, ...],
    num_shards: int,
    terms_fn: Callable[[jax.Array, jax.Array | bool], jax.Array],
) -> jax.Array:
    """Per-device body for the elementwise (sigmoid / focal) losses.

    Args:
      zimg: [b, E] this device's image block.
      ztxt: [b, E] this device's text block.
      scale, bias: replicated scalars.

    Returns:
      Replicated scalar: the sum of all B*B terms (not yet divided by B).
    """
    b = zimg.shape[0]
    # Hop 0: the device's own text block holds the positives on its diagonal.
    total = jnp.sum(terms_fn(_block_logits(zimg, ztxt, scale, bias), jnp.eye(b, dtype=bool)))
    if num_shards > 1:
        perm = [(j, (j + 1) % num_shards) for j in range(num_shards)]

        # Rematerialised in the backward pass so autodiff stores one [b, E] text block per hop
        # instead of a [b, b] logit block per hop (which together would be a [b, B] row block).
        @functools.partial(jax.checkpoint, prevent_cse=False)
        def hop(carry, _):
            acc, txt = carry
            txt = jax.lax.ppermute(txt, axes, perm)
            acc = acc + jnp.sum(terms_fn(_block_logits(zimg, txt, scale, bias), False))
            return (acc, txt), None

        (total, _), _ = jax.lax.scan(hop, (total, ztxt), None, length=num_shards - 1)
    return jax.lax.psum(total, axes)


def _ring_softmax_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    axes: tuple[str, ...],
    num_shards: int,
) -> jax.Array:
    """Per-device body for the symmetric softmax loss with streaming log-sum-exps.

    Row LSEs of the local image block accumulate in place; the column LSEs of each text block travel
    with that block round the ring, so after the last hop every block's column LSE is complete (held
    by whichever device the block ended up on).

    Returns:
      Replicated scalar: sum_i (row_lse_i - z_ii) + sum_j (col_lse_j - z_jj) (not yet halved or / B).
    """
    block = _block_logits(zimg, ztxt, scale, bias)
    positives = jnp.sum(jnp.diagonal(block))
    row_lse = jax.nn.logsumexp(block, axis=1)  # [b]
    col_lse = jax.nn.logsumexp(block, axis=0)  # [b], belongs to the travelling text block
    if num_shards > 1:
        perm = [(j, (j + 1) % num_shards) for j in range(num_shards)]

        @functools.partial(jax.checkpoint, prevent_cse=False)
        def hop(carry, _):
            row_lse, txt, col_lse = carry
            txt, col_lse = jax.lax.ppermute((txt, col_lse), axes, perm)
            block = _block_logits(zimg, txt, scale, bias)
            # Online LSE: merging two partial LSEs is a stable logaddexp.
            row_lse = jnp.logaddexp(row_lse, jax.nn.logsumexp(block, axis=1))
            col_lse = jnp.logaddexp(col_lse, jax.nn.logsumexp(block, axis=0))
            return (row_lse, txt, col_lse), None

        (row_lse, _, col_lse), _ = jax.lax.scan(
            hop, (row_lse, ztxt, col_lse), None, length=num_shards - 1
        )
    local = jnp.sum(row_lse) + jnp.sum(col_lse) - 2.0 * positives
    return jax.lax.psum(local, axes)


def chunked_contrastive_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    scale: jax.Array | float,
    bias: jax.Array | float | None,
    *,
    kind: str,
    mesh: Mesh,
    batch_axes: tuple[str, ...] = ("data", "fsdp"),
    alpha: float = 0.5,
    gamma: float = 1.0,
) -> jax.Array:
    """Contrastive loss of `logits = scale * zimg @ ztxt.T + bias` computed block-wise on a ring.

    The batch is sharded over the `n` shards of `batch_axes`. Each device keeps its [B/n, E] image
    block, the text blocks are passed round the ring with `ppermute`, and each device only ever holds
    [B/n, B/n] logit blocks. The value and its gradients equal those of the unchunked loss of the
    same kind on the full [B, B] logits.

    Args:
      zimg: [B, E] image embeddings (B = global batch, sharded along axis 0 over `batch_axes`).
      ztxt: [B, E] text embeddings, same sharding.
      scale: scalar logit scale (the multiplier itself, not its log).
      bias: scalar logit bias, or None for no bias.
      kind: "softmax", "sigmoid" or "focal".
      mesh: device mesh containing `batch_axes`.
      batch_axes: mesh axes the batch is sharded over, major to minor.
      alpha, gamma: focal-loss parameters (ignored by the other kinds).

    Returns:
      Replicated scalar loss.
    """
    _check_kind(kind)
    if kind == "focal":
        _check_focal_params(alpha, gamma)
    if isinstance(batch_axes, str):
        batch_axes = (batch_axes,)
    batch_axes = tuple(batch_axes)
    missing = [a for a in batch_axes if a not in mesh.axis_names]
    if not batch_axes or missing:
        raise ValueError(
            f"batch_axes={batch_axes!r} must be a non-empty tuple of mesh axes; the mesh has axes "
            f"{tuple(mesh.axis_names)}."
        )
    if zimg.ndim != 2 or zimg.shape != ztxt.shape:
        raise ValueError(
            "zimg and ztxt must both be [B, E] with equal shapes, got "
            f"zimg.shape={tuple(zimg.shape)}, ztxt.shape={tuple(ztxt.shape)}."
        )
    num_shards = 1
    for axis in batch_axes:
        num_shards *= mesh.shape[axis]
    batch = zimg.shape[0]
    if batch == 0 or batch % num_shards:
        raise ValueError(
            f"batch size B={batch} must be a positive multiple of the number of batch shards "
            f"{num_shards} (mesh axes {batch_axes})."
        )

    scale = jnp.asarray(scale)
    bias = jnp.zeros((), scale.dtype) if bias is None else jnp.asarray(bias)
    if scale.ndim != 0 or bias.ndim != 0:
        raise ValueError(
            f"scale and bias must be scalars, got scale.shape={scale.shape}, bias.shape={bias.shape}."
        )

    if kind == "softmax":
        body = functools.partial(_ring_softmax_loss, axes=batch_axes, num_shards=num_shards)
    else:
        if kind == "sigmoid":
            terms_fn = _sigmoid_terms
        else:
            terms_fn = functools.partial(_focal_terms, alpha=alpha, gamma=gamma)
        body = functools.partial(
            _ring_sum_loss, axes=batch_axes, num_shards=num_shards, terms_fn=terms_fn
        )

    batch_spec = P(batch_axes, None)
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        # On Explicit meshes shard_map does not reshard by itself: put the batch where it expects it.
        zimg, ztxt = jax.reshard((zimg, ztxt), jax.sharding.NamedSharding(mesh, batch_spec))
    total = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(batch_spec, batch_spec, P(), P()),
        out_specs=P(),
    )(zimg, ztxt, scale, bias)
    if kind == "softmax":
        return 0.5 * total / batch
    return total / batch
