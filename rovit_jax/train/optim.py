"""Optimizer from config: AdamW, warmup + cosine/linear decay, clipping, regex decay/freeze masks."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import optax

from rovit_jax.config_sections import Section, resolved_sections, setting
from rovit_jax.train.mesh import path_str

__all__ = [
    "NO_DECAY",
    "SCHEDULES",
    "OptimSettings",
    "make_optimizer",
    "make_schedule",
    "optim_settings",
    "regex_mask",
    "scale_by_regex",
]

SCHEDULES = ("cosine", "linear", "constant")

# Weight decay skips biases, norms, embeddings of positions and the loss's scalars.
NO_DECAY = (
    r"(^|/)bias$",
    r"LayerNorm|encoder_norm|_norm/",
    r"pos_embedding",
    r"posemb",
    r"^t$",
    r"^b$",
    r"/cls$",
)

_UNIT_OPEN = dict(min_value=0.0, max_value=1.0, max_exclusive=True)


@dataclasses.dataclass(frozen=True)
class OptimSettings(Section):
    """`optim.*`: AdamW, its schedule, clipping and the regex rules over parameter paths.

    Defaults are pretraining's; `detect_defaults()` sets the detection values. Regex rules are
    (regex, factor) pairs, the first matching rule wins.
    """

    SECTION: ClassVar[str] = "optim"

    lr: float = setting(5e-4, min_value=0.0)  # unverified
    warmup_steps: int = setting(100, min_value=0)
    schedule: str = setting("cosine", choices=SCHEDULES)
    end_lr_fraction: float = setting(0.0, min_value=0.0, max_value=1.0, older=0.0)
    weight_decay: float = setting(1e-4, min_value=0.0)  # unverified
    b1: float = setting(0.9, **_UNIT_OPEN)
    b2: float = setting(0.999, **_UNIT_OPEN)
    eps: float = setting(1e-8, min_value=0.0, min_exclusive=True)
    clip_norm: float | None = setting(1.0, min_value=0.0, older=None)  # 0 or None: no clipping
    no_decay: tuple[str, ...] = setting(NO_DECAY, regex=True, older=())
    frozen: tuple[str, ...] = setting((), regex=True, older=())  # no update at all
    lr_mults: tuple[tuple[str, float], ...] = setting((), min_value=0.0, older=())  # updates
    grad_scales: tuple[tuple[str, float], ...] = setting((), min_value=0.0, older=())  # grads


def optim_settings(config: Any) -> OptimSettings:
    """`config.optim` as typed settings; ConfigError naming every bad `optim.*` key."""
    return resolved_sections((OptimSettings,), config)["optim"]


def make_schedule(optim: OptimSettings, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.lr`, then `optim.schedule` decay to `optim.end_lr_fraction`."""
    lr, warmup = optim.lr, optim.warmup_steps
    decay_steps = max(int(total_steps) - warmup, 1)
    end = lr * optim.end_lr_fraction
    if optim.schedule == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif optim.schedule == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    else:  # "constant" (OptimSettings refuses any other)
        decay = optax.constant_schedule(lr)
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
    optim: OptimSettings, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with decoupled weight decay (masked by `optim.no_decay`), clipping, frozen params.

    `optim.frozen` regexes select parameters that receive no update at all (their optimizer state
    is empty), e.g. a frozen image tower. `optim.grad_scales` (regex, factor) rules multiply the
    gradients first, before clipping: Adam's update is invariant to a constant gradient scale
    (up to eps), so they act only through the global-norm clipping (unlike `optim.lr_mults`,
    which scale the updates).
    """
    schedule = make_schedule(optim, total_steps)
    chain = []
    if optim.grad_scales:
        chain.append(scale_by_regex(optim.grad_scales))
    if optim.clip_norm:
        chain.append(optax.clip_by_global_norm(optim.clip_norm))
    chain.append(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps))
    if optim.weight_decay:
        chain.append(
            optax.add_decayed_weights(
                optim.weight_decay,
                mask=lambda p: jax.tree.map(lambda x: not x, regex_mask(p, optim.no_decay)),
            )
        )
    chain.append(optax.scale_by_learning_rate(schedule))
    if optim.lr_mults:
        chain.append(scale_by_regex(optim.lr_mults))
    tx = optax.chain(*chain)
    frozen = optim.frozen
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
