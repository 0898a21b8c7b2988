"""The optimizer chain a config asks for: clip → optimizer (with decay mask and schedule).

`optim.name` picks the optimizer; `lr`, `b2` and `weight_decay` left at None take that
optimizer's own defaults (`DEFAULTS`). Lion, Signum and signSGD are optax's own transforms;
weight decay is decoupled (``p ← p - lr·wd·p``) and masked by `decay_mask` for every one of them.
`optim.groups` splits the parameters into groups with their own learning-rate scale and weight
decay (`jaxllm.optim.groups`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm.optim.came import came
from jaxllm.optim.schedules import warmup_schedule
from jaxllm.optim.stacked import per_layer

# Per optimizer: peak lr, b2, weight decay. Sign-based updates have unit size per coordinate,
# so Lion's paper advises an lr 3-10x below AdamW's and a weight decay 3-10x above it (the
# product lr·wd, the decay per step, stays put); Signum and signSGD follow Lion.
DEFAULTS: dict[str, dict[str, float | None]] = {
    "adamw": {"lr": 3e-4, "b2": 0.95, "weight_decay": 0.1},
    "came": {"lr": 2e-4, "b2": 0.999, "weight_decay": 0.1},
    "lion": {"lr": 1e-4, "b2": 0.99, "weight_decay": 0.3},
    "signum": {"lr": 1e-4, "b2": None, "weight_decay": 0.3},
    "sign_sgd": {"lr": 1e-4, "b2": None, "weight_decay": 0.3},
    "sgd": {"lr": 0.1, "b2": None, "weight_decay": 0.0},
}


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norms' scales and biases (ndim < 2) are left alone."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def resolved(optim_cfg) -> dict[str, Any]:
    """`lr`, `b2`, `weight_decay` of `optim_cfg` with None replaced by the optimizer's default."""
    table = DEFAULTS[optim_cfg.name]
    return {k: table[k] if getattr(optim_cfg, k) is None else getattr(optim_cfg, k) for k in table}


def with_decoupled_decay(
    tx: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mask: Any = None,
) -> optax.GradientTransformation:
    """`tx`'s update plus ``-lr·wd·p`` on the masked parameters (AdamW-style decoupled decay),
    for optax transforms that have no decay of their own (Signum, signSGD, SGD)."""
    if not weight_decay:
        return tx
    decay = optax.chain(
        optax.add_decayed_weights(weight_decay, mask), optax.scale_by_learning_rate(learning_rate)
    )

    def init_fn(params):
        return tx.init(params), decay.init(params)

    def update_fn(updates, state, params=None):
        out, s0 = tx.update(updates, state[0], params)
        zeros = jax.tree.map(jnp.zeros_like, updates)
        d, s1 = decay.update(zeros, state[1], params)
        return jax.tree.map(lambda u, v: u + v.astype(u.dtype), out, d), (s0, s1)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    optim_cfg,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float | None = None,
    mask: Any = decay_mask,
) -> optax.GradientTransformation:
    """The bare optimizer `optim_cfg.name` (no clipping), at `learning_rate`; `weight_decay`
    None takes the resolved config value."""
    c = optim_cfg
    r = resolved(c)
    wd = r["weight_decay"] if weight_decay is None else weight_decay
    if c.name == "adamw":
        return optax.adamw(
            learning_rate, b1=c.b1, b2=r["b2"], eps=c.eps, weight_decay=wd, mask=mask
        )
    if c.name == "came":
        return came(
            learning_rate, b1=c.b1, b2=r["b2"], b3=c.b3, eps1=c.eps1, eps2=c.eps2,
            clip_threshold=c.clip_threshold, weight_decay=wd, mask=mask,
        )  # fmt: skip
    if c.name == "lion":
        # optax.lion's default weight_decay is 1e-3, not 0: always pass ours.
        return optax.lion(learning_rate, b1=c.b1, b2=r["b2"], weight_decay=wd, mask=mask)
    if c.name == "signum":
        return with_decoupled_decay(optax.signum(learning_rate, beta=c.b1), learning_rate, wd, mask)
    if c.name == "sign_sgd":
        return with_decoupled_decay(optax.sign_sgd(learning_rate), learning_rate, wd, mask)
    if c.name == "sgd":
        momentum = c.b1 or None
        return with_decoupled_decay(optax.sgd(learning_rate, momentum), learning_rate, wd, mask)
    raise ValueError(f"unknown optimizer {c.name!r}")


def build_optimizer(
    optim_cfg, total_steps: int, stacked: Any = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(transformation, learning-rate schedule) for `optim_cfg` (an `OptimConfig`).

    stacked: a pytree of bools like the params marking the stacked [U, ...] parameters of a
    scanned decoder, which the optimizer then updates per layer (`jaxllm.optim.stacked`)."""
    from jaxllm.optim.groups import grouped_optimizer

    c = optim_cfg
    lr = warmup_schedule(resolved(c)["lr"], total_steps, c.warmup_steps, c.schedule, c.min_lr_ratio)
    if c.groups:
        opt = grouped_optimizer(c, lr)
    else:
        opt = make_optimizer(c, lr)
    if stacked is not None and any(jax.tree.leaves(stacked)):
        opt = per_layer(opt, stacked)
    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip else []
    return optax.chain(*parts, opt), lr
