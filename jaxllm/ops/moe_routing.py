"""Mixture-of-experts routing: which experts each token goes to, with what weight.

Every router returns a `Routing` of fixed shape: K choices per token (`experts_TK`,
`weights_TK`) and a `valid_TK` mask, so routers that pick a variable number of experts (top-p)
share the static shapes of top-k. Routing runs in float32. `capacity` then drops (or recycles)
choices over an expert's capacity; the executors in `jaxllm.ops.moe` compute the experts.

Shape legend: T tokens (flattened batch), E experts, K choices per token.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    experts_TK: jax.Array  # int32 expert ids (any value where not valid)
    weights_TK: jax.Array  # float32 combine weights (0 where not valid)
    valid_TK: jax.Array  # bool: this choice is computed


RouterKind = Literal["softmax", "sigmoid", "top_p", "hash"]


def route(
    logits_TE: jax.Array,
    *,
    kind: RouterKind,
    top_k: int,
    renormalize: bool = True,
    top_p: float = 0.6,
    bias_E: jax.Array | None = None,
    scale: float = 1.0,
) -> tuple[Routing, jax.Array]:
    """(routing, scores_TE) for router logits [T, E] (float32).

    softmax: p = softmax(logits); the top-k of p (+bias) with weights p (renormalized over the
      chosen k when `renormalize`; Hunyuan-Large's top-1 does not renormalize).
    sigmoid: s = sigmoid(logits) (DeepSeek-V3); top-k of s (+bias), weights s / Σ_topk s when
      `renormalize`.
    top_p: HMoE / "harder tasks need more experts": sort p descending, keep every expert up to
      and including the first whose cumulative p crosses `top_p`, at most `top_k`; weights are
      the raw p (not renormalized).
    `bias_E` (DeepSeek auxiliary-loss-free balancing) shifts only the *selection*; weights come
    from the unbiased scores. Weights are multiplied by `scale` (LLaMA-MoE's scale_factor).
    """
    logits_TE = logits_TE.astype(jnp.float32)
    if kind == "sigmoid":
        scores_TE = jax.nn.sigmoid(logits_TE)
    elif kind in ("softmax", "top_p"):
        scores_TE = jax.nn.softmax(logits_TE, axis=-1)
    else:
        raise ValueError(f"route() does not handle router kind {kind!r}")
    select_TE = scores_TE if bias_E is None else scores_TE + jax.lax.stop_gradient(bias_E)
    _, experts_TK = jax.lax.top_k(select_TE, top_k)
    weights_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
    valid_TK = jnp.ones(weights_TK.shape, bool)
    if kind == "top_p":
        # Choice j is kept while the mass *before* it is below the threshold, which keeps the
        # expert that crosses it (the sort is top_k's descending order).
        before_TK = jnp.cumsum(weights_TK, axis=-1) - weights_TK
        valid_TK = before_TK < top_p
    elif renormalize:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    weights_TK = jnp.where(valid_TK, weights_TK * scale, 0.0)
    return Routing(experts_TK.astype(jnp.int32), weights_TK, valid_TK), scores_TE


def _mix32(x: jax.Array) -> jax.Array:
    """A fixed integer hash (the murmur3 finalizer) on uint32."""
    x = x.astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_route(
    tokens_T: jax.Array,
    *,
    n_experts: int,
    n_domains: int,
    domain: int | jax.Array,
    seed: int | jax.Array,
) -> Routing:
    """PanGu-Σ random routed experts (RRE): the experts are split into `n_domains` equal
    groups; a token goes to its domain's group (`domain`: one for all tokens, or per token
    [T] from the data source), and inside it to a fixed random expert chosen by its token id
    (`hash(token_id, seed) mod group size`), set before training and never learned. Top-1 with
    weight 1; no gate, no balance loss."""
    group = n_experts // n_domains
    seed = jnp.asarray(seed).astype(jnp.uint32)
    h_T = _mix32(tokens_T.astype(jnp.uint32) * jnp.uint32(2654435761) + seed)
    domain_T = jnp.asarray(domain, jnp.int32)
    experts_T = domain_T * group + (h_T % jnp.uint32(group)).astype(jnp.int32)
    ones = jnp.ones((tokens_T.shape[0], 1), jnp.float32)
    return Routing(experts_T[:, None], ones, jnp.ones((tokens_T.shape[0], 1), bool))


def capacity_for(n_tokens: int, top_k: int, n_experts: int, factor: float) -> int:
    """Slots per expert: ceil(factor · T · K / E), T the tokens of this routing call (all of a
    device's tokens under expert parallelism)."""
    return max(1, math.ceil(factor * n_tokens * top_k / n_experts))


class CapacityStats(NamedTuple):
    dropped: jax.Array  # fraction of valid choices over capacity
    recycled: jax.Array  # fraction of valid choices re-assigned to an expert with room


def apply_capacity(
    routing: Routing,
    scores_TE: jax.Array,
    *,
    n_experts: int,
    capacity: int,
    policy: Literal["residual", "recycle"] = "residual",
    key: jax.Array | None = None,
) -> tuple[Routing, jax.Array, CapacityStats]:
    """Keep at most `capacity` choices per expert; (routing, slot_TK, stats).

    Priority is top-1 first (Switch / Hunyuan-Large / T5X): every token's first choice is
    placed, in token order, before any second choice. A dropped choice either contributes
    nothing (`residual`: the block's residual connection carries the token on) or is
    `recycle`d as Hunyuan-Large describes: the free slots of all experts are listed, shuffled
    with `key`, and the dropped choices take them in order, with the (usually small) score of
    their new expert as weight. `slot_TK` is each kept choice's row in an [E·C] buffer
    (E·C where dropped).
    """
    e, c = n_experts, capacity
    t, k = routing.experts_TK.shape
    # K-major order: all first choices, then all second choices.
    experts_KT = routing.experts_TK.T
    valid_KT = routing.valid_TK.T
    onehot_KTE = jax.nn.one_hot(experts_KT, e, dtype=jnp.int32) * valid_KT[..., None]
    pos_KTE = jnp.cumsum(onehot_KTE.reshape(k * t, e), axis=0).reshape(k, t, e) - 1
    pos_KT = jnp.sum(pos_KTE * onehot_KTE, axis=-1)
    keep_KT = valid_KT & (pos_KT < c)
    dropped_KT = valid_KT & ~keep_KT
    n_valid = jnp.maximum(jnp.sum(valid_KT), 1)
    experts_new_KT, pos_new_KT = experts_KT, pos_KT
    recycled = jnp.zeros((), jnp.float32)
    if policy == "recycle":
        kept_E = jnp.sum(onehot_KTE * keep_KT[..., None], axis=(0, 1))
        free_E = c - kept_E
        # slot list: expert ids repeated by their free room, then their position in the expert.
        slot_expert = jnp.repeat(jnp.arange(e), free_E, total_repeat_length=e * c)
        slot_start = jnp.cumsum(free_E) - free_E
        idx = jnp.arange(e * c)
        slot_pos = kept_E[slot_expert] + idx - slot_start[slot_expert]
        n_free = jnp.sum(free_E)
        perm = jax.random.permutation(key, e * c)
        # Shuffle only the first n_free (real) slots: sort a random key that puts fakes last.
        order = jnp.argsort(jnp.where(idx < n_free, perm, e * c + idx))
        slot_expert, slot_pos = slot_expert[order], slot_pos[order]
        rank_KT = jnp.cumsum(dropped_KT.reshape(-1)).reshape(k, t) - 1
        got_KT = dropped_KT & (rank_KT < n_free)
        r = jnp.clip(rank_KT, 0, e * c - 1)
        experts_new_KT = jnp.where(got_KT, slot_expert[r], experts_KT)
        pos_new_KT = jnp.where(got_KT, slot_pos[r], pos_KT)
        keep_KT = keep_KT | got_KT
        recycled = jnp.sum(got_KT) / n_valid
        w_new_KT = jnp.take_along_axis(scores_TE, experts_new_KT.T, axis=-1).T
        weights_KT = jnp.where(got_KT, w_new_KT, routing.weights_TK.T)
    else:
        weights_KT = routing.weights_TK.T
    slot_KT = jnp.where(keep_KT, experts_new_KT * c + pos_new_KT, e * c)
    out = Routing(
        experts_new_KT.T.astype(jnp.int32),
        jnp.where(keep_KT, weights_KT, 0.0).T,
        keep_KT.T,
    )
    dropped = jnp.sum(dropped_KT) / n_valid - recycled
    return out, slot_KT.T.astype(jnp.int32), CapacityStats(dropped, recycled)


def expert_load(routing: Routing, n_experts: int) -> jax.Array:
    """[E] float32: valid choices per expert."""
    onehot = jax.nn.one_hot(routing.experts_TK, n_experts) * routing.valid_TK[..., None]
    return jnp.sum(onehot, axis=(0, 1))


def load_balancing_loss(
    routing: Routing, scores_TE: jax.Array, size_weight_E: jax.Array | None = None
) -> jax.Array:
    """Switch / Mixtral load-balancing loss E·Σ_e f_e·P_e, 1 at perfect balance.

    f_e is the fraction of valid choices routed to e (counted before capacity, so the loss sees
    the router's wish), P_e the mean router score of e. With `size_weight_E` (d_e / mean d) it is
    HMoE's parameter penalty: f_e is weighted by expert size so that routing to small experts
    costs less.
    """
    e = scores_TE.shape[-1]
    load_E = jax.lax.stop_gradient(expert_load(routing, e))
    f_E = load_E / jnp.maximum(jnp.sum(load_E), 1.0)
    if size_weight_E is not None:
        f_E = f_E * size_weight_E
    p_E = jnp.mean(scores_TE.astype(jnp.float32), axis=0)
    return e * jnp.sum(f_E * p_E)


def router_z_loss(logits_TE: jax.Array) -> jax.Array:
    """mean_t logsumexp(logits_t)² (ST-MoE): keeps router logits small."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)))


def router_entropy(scores_TE: jax.Array) -> jax.Array:
    """mean_t −Σ_e p log p: the dynamic loss paired with top-p routing, so the router cannot
    spread p thin and switch on many experts."""
    p = scores_TE.astype(jnp.float32)
    return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1))


def aux_free_bias_update(load_E: jax.Array, rate: float) -> jax.Array:
    """DeepSeek-V3 auxiliary-loss-free balancing: Δb_e = γ·sign(mean load − load_e), centred so
    the bias stays zero-mean (only differences between experts matter to top-k)."""
    delta = rate * jnp.sign(jnp.mean(load_E) - load_E)
    return delta - jnp.mean(delta)
