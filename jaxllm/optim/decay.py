"""Decoupled weight decay (``p ← p - lr·wd·p``) on matrices only, for every optimizer."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: norms' scales and biases (ndim < 2) are left alone."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


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
