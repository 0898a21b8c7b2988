"""CAME: confidence-guided adaptive memory-efficient optimization, as an optax transform.

Luo et al., ACL 2023 (arXiv 2307.02047). The update is the one the official implementation
computes (yangluo7/CAME ``came_pytorch/CAME.py``, PyPI ``came-pytorch`` 0.1.3), per parameter
with gradient ``g``:

1. ``U = g² + eps1``.
2. Parameters with ``ndim >= 2`` factor the second moment over their last two dims (leading
   dims are a batch of matrices): ``r = b2·r + (1-b2)·mean_{-1}(U)``,
   ``c = b2·c + (1-b2)·mean_{-2}(U)``, ``u = g · rsqrt(r / mean_{-1}(r))[..., None] ·
   rsqrt(c)[..., None, :]``. Others keep a full ``v = b2·v + (1-b2)·U`` and
   ``u = g · rsqrt(v)``.
3. ``u = u / max(1, RMS(u) / clip_threshold)``, the RMS over the whole tensor.
4. ``m = b1·m + (1-b1)·u``.
5. Factored parameters only, the confidence term: ``I = (u - m)² + eps2``, ``R`` and ``C`` are
   ``b3`` averages of its row and column means, and ``update = m · rsqrt(R / mean_{-1}(R)) ⊗
   rsqrt(C)``. Non-factored parameters use ``update = m``.
6. ``p ← p - lr·wd·p`` (decoupled), then ``p ← p - lr·update``. No bias correction.

Statistics are float32 whatever the gradient dtype; the returned update has the parameter's
dtype (the gradient's when ``params`` is not given).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from pydantic import Field

from jaxllm.optim.registry import OptimizerOptions, register_optimizer

__all__ = ["CameState", "came", "scale_by_came"]


class CameState(NamedTuple):
    """State of :func:`scale_by_came`; every leaf float32 except ``count``.

    For a parameter of shape ``[..., R, C]`` (``ndim >= 2``): ``v_row``/``res_row`` are
    ``[..., R]``, ``v_col``/``res_col`` are ``[..., C]`` and ``v`` is a ``[1]`` placeholder.
    For ``ndim < 2``: ``v`` has the parameter's shape and the four factored leaves are ``[1]``
    placeholders (the layout of ``optax.adafactor``'s state).
    """

    count: jax.Array
    mu: optax.Updates
    v_row: optax.Updates
    v_col: optax.Updates
    v: optax.Updates
    res_row: optax.Updates
    res_col: optax.Updates


def _placeholder() -> jax.Array:
    return jnp.zeros((1,), jnp.float32)


def _factored(x: jax.Array) -> bool:
    return jnp.ndim(x) >= 2


def _rsqrt_factors(row: jax.Array, col: jax.Array) -> jax.Array:
    """``rsqrt(row / mean(row))[..., None] * rsqrt(col)[..., None, :]``, as the official code.

    For a ``[R, C]`` matrix this is ``rsqrt(R · row ⊗ col / sum(row))``, which is the paper's
    Alg. 1 estimate ``r c / (1ᵀ r)`` built from row and column sums instead of means.
    """
    row_factor = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))[..., None]
    col_factor = jax.lax.rsqrt(col)[..., None, :]
    return row_factor * col_factor


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def scale_by_came(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
) -> optax.GradientTransformation:
    """CAME's preconditioned direction (steps 1–5 above), before learning rate and decay.

    Returns float32 updates pointing uphill (``+update``), like ``optax.scale_by_adam``;
    :func:`came` adds the decay, the learning rate and the sign.
    """

    def init_fn(params: optax.Params) -> CameState:
        def zeros(p: jax.Array) -> jax.Array:
            return jnp.zeros(jnp.shape(p), jnp.float32)

        def row(p: jax.Array) -> jax.Array:
            return jnp.zeros(jnp.shape(p)[:-1], jnp.float32) if _factored(p) else _placeholder()

        def col(p: jax.Array) -> jax.Array:
            shape = jnp.shape(p)[:-2] + jnp.shape(p)[-1:]
            return jnp.zeros(shape, jnp.float32) if _factored(p) else _placeholder()

        def full(p: jax.Array) -> jax.Array:
            return _placeholder() if _factored(p) else zeros(p)

        return CameState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            v_row=jax.tree.map(row, params),
            v_col=jax.tree.map(col, params),
            v=jax.tree.map(full, params),
            res_row=jax.tree.map(row, params),
            res_col=jax.tree.map(col, params),
        )

    def leaf_update(g, mu, v_row, v_col, v, res_row, res_col):
        g = jnp.asarray(g).astype(jnp.float32)
        sq = jnp.square(g) + eps1
        if _factored(g):
            v_row = b2 * v_row + (1.0 - b2) * jnp.mean(sq, axis=-1)
            v_col = b2 * v_col + (1.0 - b2) * jnp.mean(sq, axis=-2)
            u = g * _rsqrt_factors(v_row, v_col)
        else:
            v = b2 * v + (1.0 - b2) * sq
            u = g * jax.lax.rsqrt(v)
        u = u / jnp.maximum(_rms(u) / clip_threshold, 1.0)
        mu = b1 * mu + (1.0 - b1) * u
        if _factored(g):
            # Instability: how far this step's clipped update strays from the momentum.
            res = jnp.square(u - mu) + eps2
            res_row = b3 * res_row + (1.0 - b3) * jnp.mean(res, axis=-1)
            res_col = b3 * res_col + (1.0 - b3) * jnp.mean(res, axis=-2)
            update = mu * _rsqrt_factors(res_row, res_col)
        else:
            update = mu
        return update, mu, v_row, v_col, v, res_row, res_col

    def update_fn(updates: optax.Updates, state: CameState, params: optax.Params = None):
        del params
        treedef = jax.tree.structure(updates)
        flat = [treedef.flatten_up_to(tree) for tree in (updates, *state[1:])]
        outs = [leaf_update(*args) for args in zip(*flat)]
        new_updates, *stats = [treedef.unflatten([o[i] for o in outs]) for i in range(7)]
        count = optax.safe_int32_increment(state.count)
        return new_updates, CameState(count, *stats)

    return optax.GradientTransformation(init_fn, update_fn)


def came(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps1: float = 1e-30,
    eps2: float = 1e-16,
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
) -> optax.GradientTransformation:
    """The CAME optimizer (defaults of ``came-pytorch`` 0.1.3).

    Args:
      learning_rate: a float or an optax schedule, called with the step count (0 on the first
        update).
      b1: momentum decay (the official ``betas[0]``).
      b2: second-moment decay (``betas[1]``).
      b3: instability (confidence) decay (``betas[2]``); the CAME README advises ``b3 > b2``.
      eps1: added to ``g²``.
      eps2: added to the instability ``(u - m)²``.
      clip_threshold: the update's RMS is clipped to this before the momentum.
      weight_decay: decoupled: ``p ← p - lr·wd·p`` besides ``p ← p - lr·update``.
      mask: which parameters get weight decay, as in ``optax.add_decayed_weights``: a pytree
        of bools shaped like the params, or a callable from params to one.

    Weight decay needs ``params`` in ``update``. The returned updates are added to the
    parameters with ``optax.apply_updates``. The state is a chain's tuple:
    ``(CameState, decay state, learning-rate state)``.
    """
    tx = optax.chain(
        scale_by_came(b1, b2, b3, eps1, eps2, clip_threshold),
        # As the official code, no decay term at all when wd == 0, so params stay optional.
        optax.add_decayed_weights(weight_decay, mask) if weight_decay else optax.identity(),
        optax.scale_by_learning_rate(learning_rate),
    )

    def update_fn(grads: optax.Updates, state: optax.OptState, params: optax.Params = None):
        updates, state = tx.update(grads, state, params)
        # The statistics are float32; the update goes back to the dtype it will be added to.
        like = grads if params is None else params
        updates = jax.tree.map(lambda u, x: u.astype(jnp.asarray(x).dtype), updates, like)
        return updates, state

    return optax.GradientTransformation(tx.init, update_fn)


class CameOptions(OptimizerOptions):
    """`optim.optimizers.came`: CAME's own hyperparameters (b1, b2 are `optim`'s)."""

    b3: float = Field(0.9999, ge=0, lt=1, description="instability decay")
    eps1: float = Field(1e-30, gt=0, description="added to g²")
    eps2: float = Field(1e-16, gt=0, description="added to the instability")
    clip_threshold: float = Field(1.0, gt=0, description="update RMS clip")


@register_optimizer("came", CameOptions, lr=2e-4, b2=0.999, weight_decay=0.1)
def _came(learning_rate, options: CameOptions, *, b1, b2, weight_decay, mask):
    return came(
        learning_rate, b1=b1, b2=b2, b3=options.b3, eps1=options.eps1, eps2=options.eps2,
        clip_threshold=options.clip_threshold, weight_decay=weight_decay, mask=mask,
    )  # fmt: skip
