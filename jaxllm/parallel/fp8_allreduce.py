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

JAX's collectives have no FP8 sum, so the all-reduce is built from collectives that move FP8
bytes (`uint8` on the wire: XLA:CPU would widen a float8 collective to float16) and one float32
sum: the reduce-scatter half is an all-to-all of the payloads, each replica adds its slice of
the N payloads in float32 and rounds that sum to E4M3 once (an FP8 NCCL ring also rounds each
partial sum on the way), the all-gather half gathers the summed FP8 slices. The float32 sum of
N ≤ 64 E4M3 values is exact (they are multiples of 2^-9 below 2^9, so the sum needs at most 24
significant bits), so the result does not depend on the summation order.

On the wire, per gradient element and device (ring accounting, N replicas): 2(N-1)/N bytes
(the FP8 all-to-all and all-gather), against 8(N-1)/N for a float32 all-reduce; per tensor 4
more for its amax (one float32 `pmax` of all of them) and 4 for its overflow count (int32
`psum`s).

In the train step (`data_parallel_fp8`) the reduction runs in a `shard_map` manual over
`data`: each replica differentiates its own rows, then its gradients go through a nested map
manual over every other axis, in which each device reduces its own block of each tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.parallel.core.axes import DATA
from jaxllm.parallel.core.per_device import per_device
from jaxllm.parallel.core.rules import DEFAULT_RULES, replica_rules, use_rules
from jaxllm.precision.fp8 import E4M3, fp8_max, scale_from_amax, to_fp8

OVERFLOW_THRESHOLD = 1e-5  # 0.001% of the values
MU_LOW, MU_HIGH, GROWTH_STEPS = 0.5, 2.0, 1000
# μ of the first step: 1 is pre-scaling, whose sum cannot overflow
MU_INIT = 1.0


def fp8_psum(
    grads: Any, mu: jax.Array, axis_name: str, block_axes: Any = None
) -> tuple[Any, jax.Array]:
    """(≈ ``psum(grads, axis_name)`` through the FP8 all-reduce, the fraction of summed values
    that hit fp8_max). Call where `axis_name` is manual, inside a `shard_map` with
    ``check_vma=False``: the result is the same on every replica, but `all_gather` types it as
    varying over `axis_name` (jax 0.10 exports no invariant all-gather). Returns float32.

    `block_axes`: where each gradient is this device's block of a larger tensor split over
    other manual mesh axes, a tree like `grads` of the tuples of axis names that split it;
    the shared scale and the overflow fraction are then the whole tensor's.
    """
    leaves, treedef = jax.tree.flatten(grads)
    if not leaves:
        return grads, jnp.zeros((), jnp.float32)
    axes = [()] * len(leaves) if block_axes is None else treedef.flatten_up_to(block_axes)
    n = jax.lax.axis_size(axis_name)
    # One collective for every tensor's amax: the max over replicas (= the MIN of their scales)
    # and over the blocks of the tensor (a max over copies of a block changes nothing).
    every = tuple(dict.fromkeys(a for t in axes for a in t))
    local = jnp.stack([jnp.max(jnp.abs(g.astype(jnp.float32))) for g in leaves])
    scales = scale_from_amax(jax.lax.pmax(local, (axis_name, *every)), E4M3)
    out, hits = [], {}
    for i, (g, ax) in enumerate(zip(leaves, axes, strict=True)):
        total, h = _fp8_sum(g, mu * scales[i] / n, axis_name, n)
        out.append(total * n / (mu * scales[i]))
        hits[ax] = hits.get(ax, 0) + h
    # each tensor's count over the replicas' slices and the blocks that split it
    count = sum(jax.lax.psum(h, (axis_name, *ax)) for ax, h in hits.items())
    size = sum(g.size * math.prod(jax.lax.axis_size(a) for a in ax) for g, ax in zip(leaves, axes))
    return jax.tree.unflatten(treedef, out), count.astype(jnp.float32) / size


def _fp8_sum(g: jax.Array, scale: jax.Array, axis_name: str, n: int):
    """(Σ over `axis_name` of E4M3(g · scale), rounded to E4M3 and returned in float32 without
    the scale; the number of sums at fp8_max in this replica's slice)."""
    flat = jax.lax.bitcast_convert_type(to_fp8(g, E4M3, scale), jnp.uint8).reshape(-1)
    size, width = flat.size, -(-flat.size // n)
    # 0x00 is E4M3's +0: the padding adds nothing and never overflows
    rows = jnp.pad(flat, (0, n * width - size)).reshape(n, width)
    # reduce-scatter half: replica r receives row r of every replica's payload
    rows = jax.lax.all_to_all(rows, axis_name, 0, 0, tiled=True)
    total = jnp.sum(jax.lax.bitcast_convert_type(rows, E4M3).astype(jnp.float32), axis=0)
    hits = jnp.sum(jnp.abs(total) >= fp8_max(E4M3), dtype=jnp.int32)
    summed = jax.lax.bitcast_convert_type(to_fp8(total, E4M3, 1.0), jnp.uint8)
    # all-gather half: every replica gets every summed slice
    full = jax.lax.all_gather(summed, axis_name, tiled=True)[:size]
    return jax.lax.bitcast_convert_type(full, E4M3).astype(jnp.float32).reshape(g.shape), hits


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
    `shard_map` step, ``check_vma=False``, whose gradients are per replica); chain the optimizer
    after it, e.g. ``optax.chain(fp8_allreduce("data"), fp8_lm(adamw, "O1", grads_in_fp8=True))``.
    μ starts at 1."""

    def init(params):
        del params
        return FP8AllReduceState(jnp.float32(MU_INIT), jnp.zeros((), jnp.float32))

    def update(grads, state, params=None):
        del params
        summed, overflow = fp8_psum(grads, state.mu, axis_name)
        return summed, FP8AllReduceState(update_mu(state.mu, overflow), overflow)

    return optax.GradientTransformation(init, update)


def data_parallel_fp8(accumulate: Callable, mesh, param_shardings: Any) -> Callable:
    """`accumulate` run once per data-parallel replica, its gradients summed over `data` by
    `fp8_psum`: ``(params, fp8_state, batch, μ) -> (grads, sums, fp8_rec, layer_metrics,
    overflow fraction)``, the same as `accumulate`'s outputs for the whole batch up to the FP8
    rounding of the gradients. `accumulate(params, fp8_state, batch) -> (grads, sums, fp8_rec,
    layer_metrics)` is the train step's; `param_shardings` are the params' NamedShardings.

    A `shard_map` manual over `data` only: each replica differentiates the objective of its own
    rows of the batch, with the other mesh axes (fsdp, tensor) left to GSPMD inside it, placed
    by the logical-axis rules without `data`. Token sums are summed over the replicas, recorded
    amaxes maxed, the layers' metrics averaged: a replica counts as a micro-batch does, so
    batch-statistic auxiliary losses (MoE load balance) see a replica's rows, as they see a
    micro-batch's. The gradients then go through a nested `shard_map` manual over every other
    axis, in which each device reduces its own block of each gradient tensor.
    """
    specs = jax.tree.map(
        lambda s: s.spec, param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
    )
    # the mesh axes that split each gradient tensor into the blocks the devices hold
    block_axes = jax.tree.map(
        lambda sp: tuple(a for d in sp for a in ((d,) if isinstance(d, str) else d or ())),
        specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    rules = replica_rules(DEFAULT_RULES)

    def reduce(grads, mu):
        return fp8_psum(grads, mu, DATA, block_axes)

    def per_replica(params, fp8_state, batch, mu):
        abstract = jax.sharding.get_abstract_mesh()  # `data` manual here
        with use_rules(abstract, rules):
            grads, sums, fp8_rec, layer_metrics = accumulate(params, fp8_state, batch)
        # manual over every axis but `data` (the ones this map left automatic)
        blocks = per_device(abstract)
        grads, overflow = blocks(
            reduce, in_specs=(specs, PartitionSpec()), out_specs=(specs, PartitionSpec())
        )(grads, mu)
        sums = jax.lax.psum(sums, DATA)
        fp8_rec = jax.lax.pmax(fp8_rec, DATA)
        layer_metrics = jax.lax.pmean(layer_metrics, DATA)
        return grads, sums, fp8_rec, layer_metrics, overflow

    # check_vma=False (`per_device`): the gradients are taken per replica (no implicit psum
    # for the replicated params), and fp8_psum's all-gather leaves its (identical) result typed
    # as varying
    replicated, rows = PartitionSpec(), PartitionSpec(DATA)
    return per_device(mesh)(
        per_replica,
        in_specs=(replicated, replicated, rows, replicated),
        out_specs=replicated,
        manual={DATA},
    )
