"""CO2: local steps with an outer step whose all-reduce overlaps the next round.

Sun et al., "CO2: Efficient Distributed Training with Full Communication-Computation Overlap",
ICLR 2024 (arXiv 2401.16265; code weigao266/fairscale-CO2 ``gossip/co2.py``, used through
weigao266/fairseq-CO2). Every data-parallel replica r runs τ steps of the inner optimizer on its
own shard of the batch; then the outer step (SlowMo-style) moves the outer parameters θ with a
momentum of pseudo-gradients.

The outer step, equation by equation against the official ``_perform_local_optimization``
(co2.py L624–630; ``p`` is the replica mean after the ``gather`` reduce of L553–575, ``old`` the
outer parameters, initialised to θ_0 at L535, ``gmb`` the outer momentum):

    gmb.mul_(β).sub_(p, 1/gap)        Δ = (θ − mean_r θ_local^r) / staleness_penalty
       .add_(old, 1/gap)              m ← β·m + Δ           (`pseudo_gradient`, `outer_update`)
    if co2_clip:                      m ← clip(m, −c, c); theirs is a no-op (the result of the
        torch.clamp(gmb, ±thr)        non-in-place clamp is discarded), ours really clips
    old.add_(gmb, alpha=−outer_lr)    θ ← θ − outer_lr·m
    p.copy_(old)                      every replica restarts at θ (``carry_local=False``)

So Δ is minus the replicas' mean progress (θ − outer_lr·Δ moves θ along with them), and the
"staleness gap penalty" is, in the official code, that constant divisor
``co2_gap_penalty`` (default 1, i.e. off) of the pseudo-gradient, applied before the momentum;
`staleness_penalty` is exactly it. The paper's own definition of the penalty could not be read
here (its body text was not available; reviewers describe a staleness-gap metric that scales
the update), so no adaptive form is implemented.

The stale average. The paper's point is that the all-reduce of round t's parameters is launched
asynchronously and overlaps round t+1's τ local steps, so each outer step consumes the average
of the previous round. The official code does not realise this cleanly: with its default
``outer_momentum_memory_efficient=True`` the outer step's gather/scatter is a blocking
``dist.reduce``/``broadcast`` of the *current* parameters; the background thread
(``_CO2_AAR``, L675), woken only after an outer step, all-reduces the live parameters in place
only if ``_should_allreduce_params()`` holds when it runs (a local-SGD step that is not a
memory-efficient outer step; it reads ``num_updates`` while the main thread increments it).
With ``outer_lr=1, outer_momentum=0`` (fairseq-CO2's pick for ≤ 16 workers) ``self.co2`` is
False (L122) and no outer step or averaging happens at all. Here:

- ``stale=False``: Δ uses this round's average (SlowMo / local SGD; what the shipped code runs).
- ``stale=True`` (CO2): the all-reduce is issued at the start of round t, runs while its τ
  local steps compute, and is consumed by the outer step at the end of round t: Δ is
  mean_r(start_r − end_r) of round t−1. In round 0 there is no previous round: the stored
  previous replicas equal θ_0, Δ = 0 and only the (zero) momentum moves θ.
- Where each replica restarts when the average is stale. ``carry_local=False`` copies the
  official reset (``p.copy_(old)``): the replicas restart at θ_{t+1}, which does not yet hold
  round t's progress, so each round's local work is redone from a point one round behind and
  lands one round late: delayed-gradient dynamics, whose stable step is about half the
  undelayed one (x ← x − a·x_{t−1} oscillates for a > 1), so it is unstable at large τ.
  ``carry_local=True`` restarts replica r at θ_{t+1} + (its own round-t progress, not yet in any
  average): no local step is delayed, only the consensus is; with β = 0 and outer lr 1 the
  replicas' mean at the start of a round is θ_0 plus all the progress so far, as without
  staleness. The all-reduce is the same.
  With a stale average the outer θ lags the finished local steps by a round; `flush` applies
  the pending average (what a final blocking all-reduce gives) and is what the trainer
  evaluates.

Defaults (config ``optim.co2``, the evidence is in ``benchmarks/co2.py``'s docstring): stale with
``carry_local=True``, outer momentum 0, outer lr 1, penalty 1, no clip. The official defaults are
β = 0.5 (fairscale) or β by worker count, 0/0.2/0.5/0.6 for ≤ 16/≤ 32/≤ 64/> 64 workers
(fairseq-CO2 ``distributed_fairseq_model.py`` L140–148; its 4-GPU example uses β = 0.2 with clip
1.0), τ = 48 (fairscale) or 20 (fairseq), outer lr 1, gap penalty 1, clip off.

Layout (our choice): one jitted call runs a whole round. The train state keeps the outer
parameters θ in their usual shardings; the inner optimizer state and the previous round's
replicas carry a leading replica axis R (= the `data` mesh size) sharded over `data`, with
each replica's own dims sharded like its parameter (fsdp / tensor). The local steps are a
`lax.scan` over τ batches of a `jax.vmap` over R with ``spmd_axis_name="data"``, so no
replica communicates with another during them; inside a replica the batch is sharded over
`fsdp` only (`jaxllm.parallel.core.rules.replica_rules`). The inner optimizer state is never
reset at an outer step (the official code leaves the torch optimizer's state alone too).

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

from jaxllm.parallel.core.axes import DATA

REPLICA_AXIS = DATA

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
