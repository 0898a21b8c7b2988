"""CO2: local steps with an outer step whose all-reduce overlaps the next round.

Sun et al., "CO2: Efficient Distributed Training with Full Communication-Computation Overlap",
ICLR 2024 (arXiv 2401.16265; code weigao266/fairscale-CO2). Every data-parallel replica r runs
τ steps of the inner optimizer on its own shard of the batch, from the outer parameters θ_t;
then the outer step (SlowMo-style) moves θ with a momentum of pseudo-gradients:

    Δ     = (θ_start − mean_r θ_local^r) / staleness_penalty     pseudo-gradient
    m     ← β·m + Δ
    m     ← clip(m, −c, c)                                         (optional; really clips)
    θ_t+1 = θ_t − outer_lr·m                                       the replicas restart here

With ``stale=True`` (CO2) the average is the *previous* round's: its all-reduce is issued at
the start of round t, runs while the τ local steps of round t compute, and is consumed by the
outer step at the end of round t, so θ_start is where round t−1 started (the mean over the
replicas) and the pseudo-gradient is one round late. In round 0 there is no
previous round: the stored previous replicas equal θ_0, Δ = 0 and only the momentum (zero)
moves θ. ``stale=False`` averages the current round instead (local SGD / SlowMo, no overlap).

Where each replica restarts: the official code resets every replica to θ_{t+1} (its
``current_p.copy_(current_p_old)``); with a stale average that discards nothing but delays every
local step's effect by a whole round (delayed-gradient dynamics, unstable for large τ with outer
momentum). ``carry_local=True`` (stale only) restarts replica r at θ_{t+1} + (its own round-t
progress, not yet in any average): the local work counts at once and only the consensus is a
round late; Δ is then mean_r(start_r − end_r) of the previous round, the same all-reduce.
Reading the official code further: with its defaults (``outer_momentum_memory_efficient=True``)
the outer step's gather/scatter is a blocking ``dist.reduce``/``broadcast`` of the *current*
parameters, and the background all-reduce thread is skipped at outer steps, so the code as
shipped runs the non-stale variant. With a stale average the outer θ lags the finished local
steps by a round; `flush` applies the pending average (what a final blocking all-reduce gives)
and is what the trainer evaluates.

The official code divides the pseudo-gradient by a constant ``co2_gap_penalty``; that is what
`staleness_penalty` is here (the paper's adaptive form could not be checked). Its clip calls a
non-in-place ``torch.clamp`` and so never clips; this one does.

Layout (our choice): one jitted call runs a whole round. The train state keeps the outer
parameters θ in their usual shardings; the inner optimizer state and the previous round's
replicas carry a leading replica axis R (= the `data` mesh size) sharded over `data`, with
each replica's own dims sharded like its parameter (fsdp / tensor). The local steps are a
`lax.scan` over τ batches of a `jax.vmap` over R with ``spmd_axis_name="data"``, so no
replica communicates with another during them; inside a replica the batch is sharded over
`fsdp` only (`replica_rules`).

With τ = 1, β = 0, outer_lr = 1, no penalty, no clip and ``stale=False`` the round is one step
of synchronous data parallelism for any inner optimizer that is linear in the gradient (SGD
with momentum and decoupled decay, no global-norm clip): the mean of the replicas' updates is
the update of the mean gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

REPLICA_AXIS = "data"

# {"momentum": like params, "prev_start": [R, ...], "prev_local": [R, ...] like params}: every
# replica's start and end point of the previous round.
Co2State = dict[str, Any]


def init_co2_state(params: Any, replicas: int) -> Co2State:
    """Zero outer momentum; the "previous round" started and ended at θ_0 on every replica."""
    rep = lambda p: jnp.broadcast_to(jnp.asarray(p, jnp.float32), (replicas, *p.shape))
    return {
        "momentum": jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        "prev_start": jax.tree.map(rep, params),
        "prev_local": jax.tree.map(rep, params),
    }


def pseudo_gradient(start: Any, average: Any, staleness_penalty: float = 1.0) -> Any:
    """``(start − average) / staleness_penalty``, in float32."""
    return jax.tree.map(
        lambda s, a: (s.astype(jnp.float32) - a.astype(jnp.float32)) / staleness_penalty,
        start,
        average,
    )


def outer_update(
    params: Any,
    momentum: Any,
    pseudo_grad: Any,
    *,
    outer_lr: float,
    outer_momentum: float,
    clip: float | None = None,
) -> tuple[Any, Any]:
    """(new params, new momentum): ``m ← clip(β·m + Δ)``, ``θ ← θ − outer_lr·m``."""

    def leaf(p, m, g):
        m = outer_momentum * m + g
        if clip is not None:
            m = jnp.clip(m, -clip, clip)
        return (p.astype(jnp.float32) - outer_lr * m).astype(p.dtype), m

    out = jax.tree.map(leaf, params, momentum, pseudo_grad)
    is_pair = lambda x: isinstance(x, tuple)
    new_params = jax.tree.map(lambda o: o[0], out, is_leaf=is_pair)
    new_momentum = jax.tree.map(lambda o: o[1], out, is_leaf=is_pair)
    return new_params, new_momentum


def flush(co2_cfg, params: Any, co2: Co2State) -> Any:
    """The outer parameters once the pending (stale) average is consumed: what a final blocking
    all-reduce gives, with every finished local step in it. Identity when ``stale=False``."""
    c = co2_cfg
    if not c.stale:
        return params
    progress = jax.tree.map(lambda e, s: e - s, co2["prev_local"], co2["prev_start"])
    delta = jax.tree.map(lambda g: -g / c.staleness_penalty, replica_mean(progress))
    new_params, _ = outer_update(
        params, co2["momentum"], delta,
        outer_lr=c.outer_lr, outer_momentum=c.outer_momentum, clip=c.clip,
    )  # fmt: skip
    return new_params


def replica_mean(tree_R: Any) -> Any:
    """Mean over the leading replica axis: the all-reduce over `data`."""
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree_R)


def replica_rules(rules):
    """The logical-axis rules inside one replica: every mapping to `data` dropped (the vmap's
    ``spmd_axis_name`` owns that axis)."""
    out = []
    for name, target in rules:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        kept = tuple(a for a in axes if a != REPLICA_AXIS)
        out.append((name, None if not kept else kept[0] if len(kept) == 1 else kept))
    return tuple(out)


def per_replica_shardings(shardings: Any, mesh: Mesh) -> Any:
    """Each NamedSharding with a leading replica dim sharded over `data` prepended."""
    return jax.tree.map(
        lambda s: NamedSharding(mesh, PartitionSpec(REPLICA_AXIS, *s.spec)),
        shardings,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def co2_round(
    local_grad: Callable[[Any, Any, jax.Array], tuple[Any, dict]],
    tx: optax.GradientTransformation,
    co2_cfg,
    state: dict,
    batches: Any,
    replicas: int,
    local_shardings: Any | None = None,
) -> tuple[dict, dict]:
    """One outer round: τ local steps on every replica, then the outer step.

    Args:
      local_grad: ``(params, batch, norm) -> (grads, sums)`` for one replica: gradients of the
        token-summed objective divided by `norm`; `sums` holds token sums (``"nll"`` ...) and
        per-layer metrics under ``"layer"``.
      tx: the inner optimizer, applied per replica (its state carries the replica axis).
      co2_cfg: an `optim.co2` section.
      state: ``{"step", "params", "opt_state" [R, ...], "co2"}``.
      batches: pytree of ``[τ, B, ...]`` arrays (``loss_mask`` among them); each step's batch
        is split ``[R, B/R, ...]`` over the replicas.
      replicas: R.
      local_shardings: shardings of one ``[R, ...]`` copy of the params, to pin the replicas.

    Returns:
      (new state, per-step metric arrays ``[τ]``: loss sums, tokens, mean grad norm, layers).
    """
    c = co2_cfg
    params = state["params"]
    co2 = state["co2"]
    pin = (
        (lambda t: jax.lax.with_sharding_constraint(t, local_shardings))
        if local_shardings is not None
        else (lambda t: t)
    )
    # Issued first and needed only by the outer step: XLA may overlap this all-reduce with the
    # local steps (the asynchronous all-reduce of CO2).
    prev_progress = jax.tree.map(lambda e, s: e - s, co2["prev_local"], co2["prev_start"])
    # Δ = mean_r(start_r − end_r): one all-reduce, of the previous round's progress.
    stale_delta = (
        jax.tree.map(lambda g: -g / c.staleness_penalty, replica_mean(prev_progress))
        if c.stale
        else None
    )

    def split(x):
        return x.reshape(replicas, x.shape[0] // replicas, *x.shape[1:])

    def body(carry, batch):
        local, opt_state = carry
        # Each replica's gradient is divided by the global token count / R, so the replicas'
        # mean is the synchronous gradient (token-weighted mean over the whole batch).
        norm = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0) / replicas
        grads, sums = jax.vmap(local_grad, in_axes=(0, 0, None), spmd_axis_name=REPLICA_AXIS)(
            local, jax.tree.map(split, batch), norm
        )
        grad_norm = jnp.mean(jax.vmap(optax.tree.norm)(grads))
        updates, opt_state = jax.vmap(tx.update, spmd_axis_name=REPLICA_AXIS)(
            grads, opt_state, local
        )
        local = optax.apply_updates(local, updates)
        metrics = {
            "sums": jax.tree.map(lambda x: jnp.sum(x, axis=0), sums["sums"]),
            "layer": jax.tree.map(lambda x: jnp.mean(x, axis=0), sums["layer"]),
            "tokens": jnp.sum(batch["loss_mask"]),
            "grad_norm": grad_norm,
        }
        return (pin(local), opt_state), metrics

    if c.stale and c.carry_local:
        # Each replica keeps its own (not yet averaged) progress of the previous round on top of
        # θ_t, so no local step is applied one round late; only the consensus is.
        local0 = jax.tree.map(
            lambda p, g: (p.astype(jnp.float32) + g).astype(p.dtype), params, prev_progress
        )
    else:
        local0 = jax.tree.map(lambda p: jnp.broadcast_to(p, (replicas, *p.shape)), params)
    local0 = pin(local0)
    (local, opt_state), metrics = jax.lax.scan(body, (local0, state["opt_state"]), batches)

    if c.stale:
        delta = stale_delta
    else:
        delta = pseudo_gradient(params, replica_mean(local), c.staleness_penalty)
    new_params, momentum = outer_update(
        params, co2["momentum"], delta,
        outer_lr=c.outer_lr, outer_momentum=c.outer_momentum, clip=c.clip,
    )  # fmt: skip
    new_state = {
        "step": state["step"] + batches["loss_mask"].shape[0],
        "params": new_params,
        "opt_state": opt_state,
        "co2": {
            "momentum": momentum,
            "prev_start": jax.tree.map(lambda x: x.astype(jnp.float32), local0),
            "prev_local": jax.tree.map(lambda x: x.astype(jnp.float32), local),
        },
    }
    metrics["outer_norm"] = optax.tree.norm(delta)
    return new_state, metrics
