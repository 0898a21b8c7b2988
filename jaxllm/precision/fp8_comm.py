"""FP8-LM's data-parallel gradient all-reduce with a shared scale and automatic scaling μ
(Peng et al., arXiv 2310.18313, §2.1; MS-AMP).

Summing FP8 gradients of N replicas has two failure modes: pre-scaling (each replica sends
``g_i / N``) leaves small values under FP8's range, post-scaling (``Σ g_i`` then ``/ N``)
overflows it. Per gradient tensor, on the replicas of `axis_name`:

1. Shared scale: every replica's scale ``s_i = fp8_max / amax(g_i)`` is all-reduced with MIN,
   ``s = min_i s_i`` (= fp8_max / the global amax: one scalar per tensor on the wire), so the
   FP8 payloads of all replicas share one scale and can be summed as they are.
2. Automatic scaling: each replica sends ``FP8_E4M3(μ · s · g_i / N)``. At μ = 1 this is
   pre-scaling (the sum cannot pass fp8_max); a larger μ uses more of FP8's range for each
   payload, at the risk of the sum overflowing where the replicas' gradients agree.
3. The payloads are summed and the sum is E4M3 again (saturating) with scale ``μ · s / N``:
   ``Σ_i g_i ≈ FP8(Σ_i payload_i) · N / (μ · s)``.
4. μ follows the paper's rule: if more than 0.001% of the summed values reach fp8_max, μ is
   set to 1/2 for the next step; otherwise μ grows exponentially, from 1/2 to 2 in 1000 steps
   (a factor ``4^(1/1000)`` per step), and stays at 2.

JAX's collectives have no FP8 sum, so the payloads are summed with a float32 `psum` of their
(exact) FP8 values and the sum is rounded to E4M3 once: the result of an FP8 all-reduce that
accumulates in high precision (an FP8 NCCL ring also rounds each partial sum); the wire carries
float32, so this reproduces the numerics, not the bandwidth.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.precision.fp8 import E4M3, fp8_max, scale_from_amax, to_fp8

OVERFLOW_THRESHOLD = 1e-5  # 0.001% of the values
MU_LOW, MU_HIGH, GROWTH_STEPS = 0.5, 2.0, 1000


def fp8_psum(grads: Any, mu: jax.Array, axis_name: str) -> tuple[Any, jax.Array]:
    """(≈ ``psum(grads, axis_name)`` through the FP8 all-reduce, the fraction of summed values
    that hit fp8_max). Call where `axis_name` is bound (inside `shard_map`); returns float32
    gradients, the same on every replica."""
    n = jax.lax.psum(1, axis_name)
    fmax = fp8_max(E4M3)

    def one(g):
        g = g.astype(jnp.float32)
        amax = jax.lax.pmax(jnp.max(jnp.abs(g)), axis_name)  # = MIN of the replicas' scales
        s = scale_from_amax(amax, E4M3)
        payload = to_fp8(g, E4M3, mu * s / n).astype(jnp.float32)
        total = jax.lax.psum(payload, axis_name)
        hits = jnp.sum(jnp.abs(total) >= fmax)
        return to_fp8(total, E4M3, 1.0).astype(jnp.float32) * n / (mu * s), hits

    out = jax.tree.map(one, grads)
    is_pair = lambda x: isinstance(x, tuple)
    summed = jax.tree.map(lambda p: p[0], out, is_leaf=is_pair)
    hits = sum(p[1] for p in jax.tree.leaves(out, is_leaf=is_pair))
    size = sum(g.size for g in jax.tree.leaves(grads))
    return summed, jnp.asarray(hits, jnp.float32) / max(size, 1)


def update_mu(mu: jax.Array, overflow: jax.Array) -> jax.Array:
    """Next step's μ: 1/2 after an overflow step, else ×4^(1/1000) up to 2."""
    grown = jnp.minimum(mu * (MU_HIGH / MU_LOW) ** (1.0 / GROWTH_STEPS), MU_HIGH)
    return jnp.where(overflow > OVERFLOW_THRESHOLD, MU_LOW, grown).astype(jnp.float32)


class FP8AllReduceState(NamedTuple):
    mu: jax.Array  # float32 scalar, the auto-scaling factor of the next step
    overflow: jax.Array  # the last step's fraction of summed values at fp8_max (for logging)


def fp8_allreduce(axis_name: str = "data") -> optax.GradientTransformation:
    """An optax transformation that sums the replicas' gradients over `axis_name` through
    `fp8_psum` and adapts μ. Its update must run where `axis_name` is bound (a data-parallel
    `shard_map` step whose gradients are per replica); chain the optimizer after it, e.g.
    ``optax.chain(fp8_allreduce("data"), fp8_lm(adamw, "O1"))``. μ starts at 1."""

    def init(params):
        del params
        return FP8AllReduceState(jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32))

    def update(grads, state, params=None):
        del params
        summed, overflow = fp8_psum(grads, state.mu, axis_name)
        return summed, FP8AllReduceState(update_mu(state.mu, overflow), overflow)

    return optax.GradientTransformation(init, update)
