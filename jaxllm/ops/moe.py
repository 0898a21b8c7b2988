"""Computing the routed experts of a mixture of experts: y_t = Σ_k w_tk · FFN_{e_tk}(x_t).

Experts are SwiGLU FFNs held in *size groups*: a list of `(w_gate_EDF, w_up_EDF, w_down_EFD)`
stacks, expert ids numbered group after group. Every expert of one group has the same width
F; HMoE's heterogeneous experts are several groups, so no expert is padded to the largest.

Three ways to compute the same thing:
  reference  every expert on every token, combined with a dense [T, E] weight matrix (float32,
             for tests; cost E/K times the routed FLOPs).
  dropless   sort token copies by expert, one grouped matmul (`jax.lax.ragged_dot`) per size
             group, unsort — nothing is dropped and no slot is padded.
  blocked    dropless too, each expert's rows padded to whole blocks, one batched matmul over
             the blocks with gathered weights (fast where ragged_dot lowers to dense).
  capacity   a fixed [E, C, D] buffer (C slots per expert, from `moe_routing.apply_capacity`),
             dense batched matmuls, gather back: static shapes, choices over capacity dropped.

Each fast path is three stages, exposed on their own (`benchmarks/moe.py` times each):
dispatch (`dispatch_dropless` / `dispatch_blocked` / `dispatch_capacity`), the expert GEMMs
(`grouped_swiglu` / `blocked_swiglu` / `capacity_swiglu`) and combine (`combine_*`).

The expert GEMMs of the fast paths go through `jaxllm.precision` (`project_ragged` for
`ragged_dot`, `project` for the batched einsums), so the train step can run them in FP8 or
ExMy; outside a `use_precision` block they are the plain ops. The reference stays float32.

Shape legend: T tokens, D model width, E experts, F expert width, K choices, C slots.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.ops.activations import swiglu
from jaxllm.ops.moe_routing import Routing
from jaxllm.precision import project, project_ragged

ExpertGroup = tuple[jax.Array, jax.Array, jax.Array]  # w_gate [E,D,F], w_up [E,D,F], w_down [E,F,D]


def group_bounds(groups: list[ExpertGroup]) -> list[tuple[int, int]]:
    """[(first, end)) expert ids of each size group."""
    out, start = [], 0
    for w_gate, _, _ in groups:
        out.append((start, start + w_gate.shape[0]))
        start += w_gate.shape[0]
    return out


def combine_matrix(routing: Routing, n_experts: int) -> jax.Array:
    """[T, E] float32: the weight of each expert in each token's output (0 where unrouted)."""
    onehot_TKE = jax.nn.one_hot(routing.experts_TK, n_experts, dtype=jnp.float32)
    w_TK = jnp.where(routing.valid_TK, routing.weights_TK, 0.0).astype(jnp.float32)
    return jnp.einsum("TKE,TK->TE", onehot_TKE, w_TK)


def experts_reference(x_TD: jax.Array, routing: Routing, groups: list[ExpertGroup]) -> jax.Array:
    """[T, D] float32: every expert on every token, weighted by the routing."""
    x = x_TD.astype(jnp.float32)
    outs = []
    for w_gate, w_up, w_down in groups:
        g_TEF = jnp.einsum("TD,EDF->TEF", x, w_gate.astype(jnp.float32))
        u_TEF = jnp.einsum("TD,EDF->TEF", x, w_up.astype(jnp.float32))
        outs.append(jnp.einsum("TEF,EFD->TED", jax.nn.silu(g_TEF) * u_TEF, w_down.astype(x.dtype)))
    y_TED = jnp.concatenate(outs, axis=1)
    return jnp.einsum("TED,TE->TD", y_TED, combine_matrix(routing, y_TED.shape[1]))


def sort_by_expert(routing: Routing, n_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(order, token_of_row, counts_E): the token copies (flattened [T·K]) ordered by expert;
    invalid copies sort last and belong to no group."""
    k = routing.experts_TK.shape[1]
    flat = jnp.where(routing.valid_TK, routing.experts_TK, n_experts).reshape(-1)
    order = jnp.argsort(flat, stable=True)
    counts_E = jnp.zeros((n_experts,), jnp.int32).at[flat].add(1, mode="drop")
    return order, order // k, counts_E


def inverse_permutation(order: jax.Array) -> jax.Array:
    """inv with inv[order[i]] = i: undoes a sort by one int scatter, not a second argsort."""
    return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def grouped_swiglu(
    xs_ND: jax.Array, counts_E: jax.Array, groups: list[ExpertGroup], dtype
) -> jax.Array:
    """[N, D]: rows sorted by expert (counts_E of each, the rest zero) through their experts.

    One `ragged_dot` chain per size group. A group's rows start where the earlier groups'
    rows end, so the rows are rolled to put them first (ragged_dot's groups start at row 0)
    and its output rolled back; rows outside the group come out as zeros, so groups add up.
    """
    out = None
    for (first, end), (w_gate, w_up, w_down) in zip(group_bounds(groups), groups, strict=True):
        sizes = counts_E[first:end]
        offset = jnp.sum(counts_E[:first])
        rows = xs_ND if first == 0 else jnp.roll(xs_ND, -offset, axis=0)
        g = project_ragged(rows, w_gate.astype(dtype), sizes, name="expert_gate")
        u = project_ragged(rows, w_up.astype(dtype), sizes, name="expert_up")
        y = project_ragged(swiglu(g, u), w_down.astype(dtype), sizes, name="expert_down")
        y = y if first == 0 else jnp.roll(y, offset, axis=0)
        out = y if out is None else out + y
    return out


def dispatch_dropless(
    x_TD: jax.Array, routing: Routing, n_experts: int, dtype=jnp.float32
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(xs_ND, order, counts_E): the token copies gathered into expert order (N = T·K)."""
    order, token_of_row, counts_E = sort_by_expert(routing, n_experts)
    return x_TD.astype(dtype)[token_of_row], order, counts_E


def combine_dropless(ys_ND: jax.Array, order: jax.Array, weights_TK: jax.Array) -> jax.Array:
    """[T, D] float32: the expert-ordered rows unsorted and summed over the K copies."""
    t, k = weights_TK.shape
    y_TKD = ys_ND[inverse_permutation(order)].reshape(t, k, -1)
    return jnp.einsum("TKD,TK->TD", y_TKD.astype(jnp.float32), weights_TK)


def experts_dropless(
    x_TD: jax.Array, routing: Routing, groups: list[ExpertGroup], dtype=jnp.float32
) -> jax.Array:
    """[T, D] float32: sort → grouped matmul → unsort → weighted sum over the K copies."""
    n_experts = group_bounds(groups)[-1][1]
    xs_ND, order, counts_E = dispatch_dropless(x_TD, routing, n_experts, dtype)
    ys_ND = grouped_swiglu(xs_ND, counts_E, groups, dtype)
    return combine_dropless(ys_ND, order, routing.weights_TK)


class BlockPlan(NamedTuple):
    """Where one size group's token copies sit in its padded blocks (P = n_blocks · block)."""

    src_P: jax.Array  # int32 token held by each padded row (T: none, a zero row)
    row_TK: jax.Array  # int32 [T·K] padded row of each copy, in [T·K] order (P: none)
    block_expert: jax.Array  # int32 [n_blocks] expert of each block, local to the group


def dispatch_blocked(
    x_TD: jax.Array,
    routing: Routing,
    groups: list[ExpertGroup],
    block: int = 512,
    dtype=jnp.float32,
) -> tuple[list[jax.Array], list[BlockPlan]]:
    """([xb_NBD per size group], [BlockPlan per size group]): each expert's copies padded to
    a multiple of `block` rows, gathered straight from x into [n_blocks, block, D]."""
    t, k = routing.experts_TK.shape
    n_experts = group_bounds(groups)[-1][1]
    d = x_TD.shape[-1]
    order, token_of_row, counts_E = sort_by_expert(routing, n_experts)
    inv = inverse_permutation(order)
    expert_of_row = jnp.where(routing.valid_TK, routing.experts_TK, n_experts).reshape(-1)[order]
    rank = (
        jnp.arange(t * k)
        - (jnp.cumsum(counts_E) - counts_E)[jnp.minimum(expert_of_row, n_experts - 1)]
    )
    xbs, plans = [], []
    for first, end in group_bounds(groups):
        e_g = end - first
        n_blocks = -(-t * k // block) + e_g
        padded = -(-counts_E[first:end] // block) * block
        pad_start = jnp.cumsum(padded) - padded
        local = expert_of_row - first
        mine = (local >= 0) & (local < e_g)
        dest = jnp.where(mine, pad_start[jnp.clip(local, 0, e_g - 1)] + rank, n_blocks * block)
        # The token each padded row holds (t: none, a zero row), gathered straight from x
        # rather than sorted first and then scattered into the blocks.
        src = jnp.full((n_blocks * block,), t, jnp.int32).at[dest].set(token_of_row, mode="drop")
        xb = jnp.take(x_TD.astype(dtype), src, axis=0, mode="fill", fill_value=0)
        block_expert = jnp.searchsorted(jnp.cumsum(padded), jnp.arange(n_blocks) * block, "right")
        block_expert = jnp.minimum(block_expert, e_g - 1)
        xbs.append(xb.reshape(n_blocks, block, d))
        plans.append(BlockPlan(src, dest[inv], block_expert))
    return xbs, plans


def blocked_swiglu(
    xbs: list[jax.Array], plans: list[BlockPlan], groups: list[ExpertGroup], dtype
) -> list[jax.Array]:
    """[yb_NBD per size group]: one batched matmul chain over the blocks, each block with its
    expert's gathered weights."""
    out = []
    for xb_NBD, plan, (w_gate, w_up, w_down) in zip(xbs, plans, groups, strict=True):
        be = plan.block_expert
        g = project(xb_NBD, w_gate.astype(dtype)[be], "NBD,NDF->NBF", name="expert_gate")
        u = project(xb_NBD, w_up.astype(dtype)[be], "NBD,NDF->NBF", name="expert_up")
        h_NBF = swiglu(g, u)
        out.append(project(h_NBF, w_down.astype(dtype)[be], "NBF,NFD->NBD", name="expert_down"))
    return out


def combine_blocked(
    ybs: list[jax.Array], plans: list[BlockPlan], weights_TK: jax.Array
) -> jax.Array:
    """[T, D] float32: each copy's row taken back from its group's blocks, weighted sum over K."""
    t, k = weights_TK.shape
    d = ybs[0].shape[-1]
    ys_ND = jnp.zeros((t * k, d), jnp.float32)  # per copy, in [T·K] order
    for yb_NBD, plan in zip(ybs, plans, strict=True):
        yb_ND = yb_NBD.reshape(-1, d)
        rows = jnp.take(yb_ND, plan.row_TK, axis=0, mode="fill", fill_value=0)
        ys_ND = ys_ND + rows.astype(jnp.float32)
    return jnp.einsum("TKD,TK->TD", ys_ND.reshape(t, k, d), weights_TK)


def experts_blocked(
    x_TD: jax.Array,
    routing: Routing,
    groups: list[ExpertGroup],
    block: int = 512,
    dtype=jnp.float32,
) -> jax.Array:
    """[T, D] float32, dropless, as dense batched matmuls over blocks of `block` rows.

    Each expert's copies are padded to a multiple of `block` rows, so every block belongs to
    one expert; the block's weights are gathered ([N_blocks, D, F]) and one batched matmul
    does all blocks. Padding costs at most one block per expert (N_blocks ≤ T·K/block + E).
    For GPUs where `ragged_dot` lowers to a dense product over every group.
    """
    xbs, plans = dispatch_blocked(x_TD, routing, groups, block, dtype)
    ybs = blocked_swiglu(xbs, plans, groups, dtype)
    return combine_blocked(ybs, plans, routing.weights_TK)


def dispatch_capacity(
    x_TD: jax.Array, slot_TK: jax.Array, n_experts: int, capacity: int, dtype=jnp.float32
) -> jax.Array:
    """[E·C, D]: the kept choices scattered into their slots (`slot_TK`, E·C = dropped)."""
    t, k = slot_TK.shape
    token_TK = jnp.broadcast_to(jnp.arange(t)[:, None], (t, k))
    buf_SD = jnp.zeros((n_experts * capacity, x_TD.shape[-1]), dtype)
    return buf_SD.at[slot_TK.reshape(-1)].set(x_TD.astype(dtype)[token_TK.reshape(-1)], mode="drop")


def capacity_swiglu(
    buf_SD: jax.Array, groups: list[ExpertGroup], capacity: int, dtype
) -> jax.Array:
    """[E·C, D]: one batched matmul chain per size group over its [E_g, C, D] rows."""
    c, d = capacity, buf_SD.shape[-1]
    outs = []
    for (first, end), (w_gate, w_up, w_down) in zip(group_bounds(groups), groups, strict=True):
        xb_ECD = buf_SD[first * c : end * c].reshape(end - first, c, d)
        g = project(xb_ECD, w_gate.astype(dtype), "ECD,EDF->ECF", name="expert_gate")
        u = project(xb_ECD, w_up.astype(dtype), "ECD,EDF->ECF", name="expert_up")
        h_ECF = swiglu(g, u)
        outs.append(project(h_ECF, w_down.astype(dtype), "ECF,EFD->ECD", name="expert_down"))
    return jnp.concatenate(outs, axis=0).reshape(-1, d)


def combine_capacity(out_SD: jax.Array, slot_TK: jax.Array, weights_TK: jax.Array) -> jax.Array:
    """[T, D] float32: each kept choice's slot gathered back, weighted sum over K."""
    y_TKD = jnp.take(out_SD, slot_TK, axis=0, mode="fill", fill_value=0)
    return jnp.einsum("TKD,TK->TD", y_TKD.astype(jnp.float32), weights_TK)


def experts_capacity(
    x_TD: jax.Array,
    routing: Routing,
    slot_TK: jax.Array,
    groups: list[ExpertGroup],
    capacity: int,
    dtype=jnp.float32,
) -> jax.Array:
    """[T, D] float32: kept choices scattered into an [E·C, D] buffer at `slot_TK` (E·C =
    dropped), one batched matmul per size group over its [E_g, C, D] rows, gathered back."""
    n_experts = group_bounds(groups)[-1][1]
    buf_SD = dispatch_capacity(x_TD, slot_TK, n_experts, capacity, dtype)
    out_SD = capacity_swiglu(buf_SD, groups, capacity, dtype)
    return combine_capacity(out_SD, slot_TK, routing.weights_TK)


def moe_experts(
    x_TD: jax.Array,
    routing: Routing,
    groups: list[ExpertGroup],
    *,
    impl: Literal["auto", "reference", "dropless", "blocked", "capacity"] = "dropless",
    slot_TK: jax.Array | None = None,
    capacity: int | None = None,
    dtype=jnp.float32,
) -> jax.Array:
    """Dispatcher: [T, D] float32 routed-expert output. `capacity` needs `slot_TK` and
    `capacity` from `apply_capacity` (whose routing also masks the dropped choices, so the
    reference and dropless paths give the capacity path's result on the same routing).
    "auto" is dropless, and blocked where the code is lowered for a GPU: XLA:GPU lowers
    ragged_dot to a dense product over every group. Chosen by the lowering platform, so an
    ahead-of-time compile for a device traced on a CPU host gets that device's path."""
    if impl == "auto":
        return jax.lax.platform_dependent(
            x_TD,
            routing,
            groups,
            default=lambda x, r, g: experts_dropless(x, r, g, dtype),
            cuda=lambda x, r, g: experts_blocked(x, r, g, dtype=dtype),
            rocm=lambda x, r, g: experts_blocked(x, r, g, dtype=dtype),
        )
    if impl == "reference":
        return experts_reference(x_TD, routing, groups)
    if impl == "dropless":
        return experts_dropless(x_TD, routing, groups, dtype)
    if impl == "blocked":
        return experts_blocked(x_TD, routing, groups, dtype=dtype)
    if impl == "capacity":
        assert slot_TK is not None and capacity is not None
        return experts_capacity(x_TD, routing, slot_TK, groups, capacity, dtype)
    raise ValueError(f"unknown MoE impl {impl!r}")
