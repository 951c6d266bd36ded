"""Optimizer from config: AdamW, warmup + cosine/linear decay, clipping, regex decay/freeze masks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from rovit_jax.train.mesh import path_str

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.lr`, then `optim.schedule` decay to `optim.end_lr_fraction`."""
    lr, warmup = float(optim.lr), int(optim.warmup_steps)
    decay_steps = max(int(total_steps) - warmup, 1)
    end = lr * float(optim.get("end_lr_fraction", 0.0))
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif optim.schedule == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(
            f"config key `optim.schedule`: unknown {optim.schedule!r}; choose one of {SCHEDULES}"
        )
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def regex_mask(params: Any, patterns: Sequence[str]) -> Any:
    """Boolean pytree: True where a leaf's '/'-joined path matches any of `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(rx.search(path_str(path)) for rx in compiled), params
    )


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with decoupled weight decay (masked by `optim.no_decay`), clipping, frozen params.

    `optim.frozen` regexes select parameters that receive no update at all (their optimizer state
    is empty), e.g. a frozen image tower. `optim.grad_scales` (regex, factor) rules multiply the
    gradients first, before clipping: Adam's update is invariant to a constant gradient scale
    (up to eps), so they act only through the global-norm clipping (unlike `optim.lr_mults`,
    which scale the updates).
    """
    schedule = make_schedule(optim, total_steps)
    no_decay = list(optim.get("no_decay", ()))
    chain = []
    grad_scales = [tuple(m) for m in optim.get("grad_scales", ())]
    if grad_scales:
        chain.append(scale_by_regex(grad_scales))
    if optim.get("clip_norm"):
        chain.append(optax.clip_by_global_norm(float(optim.clip_norm)))
    chain.append(optax.scale_by_adam(b1=float(optim.b1), b2=float(optim.b2), eps=float(optim.eps)))
    if float(optim.weight_decay):
        chain.append(
            optax.add_decayed_weights(
                float(optim.weight_decay),
                mask=lambda p: jax.tree.map(lambda x: not x, regex_mask(p, no_decay)),
            )
        )
    chain.append(optax.scale_by_learning_rate(schedule))
    lr_mults = [tuple(m) for m in optim.get("lr_mults", ())]
    if lr_mults:
        chain.append(scale_by_regex(lr_mults))
    tx = optax.chain(*chain)
    frozen = list(optim.get("frozen", ()))
    if frozen:
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            lambda p: jax.tree.map(lambda f: "frozen" if f else "train", regex_mask(p, frozen)),
        )
    return tx, schedule


def scale_by_regex(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiplies the updates of parameters whose path matches a rule's regex (first match wins).

    Used for the detector's reduced backbone learning rate: `[("^backbone/", 0.1)]`, and first
    in the chain for `optim.grad_scales`.
    """
    compiled = [(re.compile(rx), float(m)) for rx, m in rules]

    def mult(path) -> float:
        name = path_str(path)
        return next((m for rx, m in compiled if rx.search(name)), 1.0)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda p, u: u * mult(p), updates), state

    return optax.GradientTransformation(init_fn, update_fn)
