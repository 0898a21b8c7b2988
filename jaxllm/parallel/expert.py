"""Expert parallelism: routed experts split over the mesh axis `expert`, token copies exchanged
with all-to-all inside `jax.shard_map`.

The router runs outside (GSPMD, batch-sharded, so each device routes its own tokens and the
balancing losses see the global batch). Inside the shard_map, per device:
  1. capacity (if any) is applied to the device's own tokens: C = ceil(cf · T_dev · K / E)
     slots per expert *per device*, top-1-first priority among that device's tokens, so an
     expert receives at most n_expert · C rows. Dropless and "no choice dropped" runs equal the
     single-device layer exactly; with drops they differ from a single device's global count.
  2. the kept copies are sorted by (owner device, local expert) and exchanged: `dense` pads
     each device pair to the worst case (T_dev · K rows) and uses `all_to_all`; `ragged` sends
     only the real rows with `lax.ragged_all_to_all` (GPU/TPU; XLA:CPU lacks the op).
  3. the owner sorts what it received by local expert and runs the grouped matmul
     (`jaxllm.ops.moe.grouped_swiglu`), then the rows go back the same way and are combined.

The token axes (`BATCH_AXES`: data, fsdp, expert) are manual in the shard_map; "tensor" stays
automatic when it splits (size > 1), so the experts' F dim may be tensor-sharded by the
partitioner around it, and the local experts then keep `ragged_dot`. At size 1 it is manual
too, so the local experts take the grouped TPU kernels (`precision.grouped_matmul`). Nested in
a shard_map that has made some token axes manual already (the train step's per-replica one,
over `data`), it splits over the remaining ones: the exchange and the capacity statistics then
see one replica's tokens, exactly as the model alone on that replica's devices would.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxllm.ops.moe import ExpertGroup, group_bounds, grouped_swiglu, inverse_permutation
from jaxllm.ops.moe_routing import CapacityStats, Routing, apply_capacity, capacity_for
from jaxllm.parallel.core.axes import BATCH_AXES, EXPERT
from jaxllm.parallel.core.per_device import per_device
from jaxllm.parallel.core.rules import active_mesh

AXIS = EXPERT


def active(mesh: Mesh | None = None) -> bool:
    """Is expert parallelism on: a mesh (default: the active rules') with `expert` > 1."""
    mesh = mesh if mesh is not None else active_mesh()
    return mesh is not None and mesh.shape.get(AXIS, 1) > 1


def expert_tables(groups: list[ExpertGroup], n_dev: int) -> tuple[np.ndarray, np.ndarray]:
    """(owner[E+1], local_id[E+1]) for experts numbered group after group; each group's experts
    are split into n_dev equal consecutive blocks. Entry E (an invalid choice) maps to owner
    n_dev and local id E_local (both out of range, so its rows are dropped)."""
    owner, local = [], []
    base = 0
    for first, end in group_bounds(groups):
        n = end - first
        if n % n_dev:
            raise ValueError(f"parallel.mesh.expert={n_dev} must divide each group's {n} experts")
        per = n // n_dev
        for i in range(n):
            owner.append(i // per)
            local.append(base + i % per)
        base += per
    owner.append(n_dev)
    local.append(base)
    return np.asarray(owner, np.int32), np.asarray(local, np.int32)


def expert_parallel_ffn(
    x_TD: jax.Array,
    routing: Routing,
    scores_TE: jax.Array,
    groups: list[ExpertGroup],
    *,
    capacity_factor: float | None,
    drop_policy: Literal["residual", "recycle"] = "residual",
    key: jax.Array | None = None,
    a2a: Literal["auto", "ragged", "dense"] = "auto",
    dtype=jnp.float32,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, CapacityStats | None]:
    """[T, D] float32 routed output and capacity stats (None when dropless), the same contract
    as the single-device path. `scores_TE` give a recycled choice its new weight."""
    mesh = mesh if mesh is not None else active_mesh()
    n_dev = mesh.shape[AXIS]
    n_experts = group_bounds(groups)[-1][1]
    owner_np, local_np = expert_tables(groups, n_dev)
    # inside an outer shard_map (the FP8 all-reduce's, manual over `data`) x_TD holds one
    # replica's tokens: split over the other token axes, capacity stats psum'd within it
    dm = per_device(mesh)
    if AXIS not in dm.free:
        raise ValueError("expert parallelism cannot run inside a shard_map manual over `expert`")
    tok_axes = tuple(a for a in BATCH_AXES if a in dm.free)
    n_tok_dev = int(np.prod([dm.mesh.shape[a] for a in tok_axes]))
    if x_TD.shape[0] % n_tok_dev:
        raise ValueError(f"{x_TD.shape[0]} tokens do not split over the {n_tok_dev} devices")
    if key is None:
        key = jax.random.key(0)
    n_local = [(end - first) // n_dev for first, end in group_bounds(groups)]

    def body(x_TD, experts_TK, weights_TK, valid_TK, scores_TE, key, *flat_ws):
        local_groups = [tuple(flat_ws[3 * i : 3 * i + 3]) for i in range(len(groups))]
        routing = Routing(experts_TK, weights_TK, valid_TK)
        t, k = experts_TK.shape
        stats = None
        rows = t * k  # rows per device pair: the dropless worst case
        if capacity_factor is not None:
            n_valid = jnp.sum(valid_TK)
            cap = capacity_for(t, k, n_experts, capacity_factor)
            key = jax.random.fold_in(key, _flat_index(tok_axes))
            routing, _, st = apply_capacity(
                routing, scores_TE, n_experts=n_experts, capacity=cap, policy=drop_policy, key=key
            )
            # a device sends at most C copies to each expert of a peer
            rows = min(rows, cap * sum(n_local))
            total = jnp.maximum(jax.lax.psum(n_valid, tok_axes), 1)
            stats = CapacityStats(
                jax.lax.psum(st.dropped * n_valid, tok_axes) / total,
                jax.lax.psum(st.recycled * n_valid, tok_axes) / total,
            )
        static = (n_dev, sum(n_local), rows, dtype)
        dense = lambda *arrays: _exchange_dense(*arrays, *static)
        ragged = lambda *arrays: _exchange_ragged(*arrays, *static)
        arrays = (x_TD.astype(dtype), routing, local_groups, jnp.asarray(owner_np),
                  jnp.asarray(local_np))  # fmt: skip
        if a2a == "auto":
            # by the lowering platform (an AOT compile for TPU is traced on a CPU host)
            y_TKD = jax.lax.platform_dependent(*arrays, cpu=dense, default=ragged)
        else:
            y_TKD = (dense if a2a == "dense" else ragged)(*arrays)
        y_TD = jnp.einsum("TKD,TK->TD", y_TKD.astype(jnp.float32), routing.weights_TK)
        return y_TD, stats

    tok = P(tok_axes, None)
    w_spec = P(AXIS, None, None)
    flat_ws = [w for g in groups for w in g]
    stats_spec = None if capacity_factor is None else CapacityStats(P(), P())
    fn = dm(
        body,
        in_specs=(tok, tok, tok, tok, tok, P(), *([w_spec] * len(flat_ws))),
        out_specs=(tok, stats_spec),
        # free axes of size 1 split nothing, so they may be manual too: with every axis
        # manual the local experts can run Mosaic kernels (megablox on TPU), which jax
        # refuses in a partly automatic map
        manual=tuple(a for a in dm.free if a in tok_axes or dm.mesh.shape[a] == 1),
    )
    return fn(x_TD, *routing, scores_TE, key, *flat_ws)


def _flat_index(axes: tuple[str, ...]) -> jax.Array:
    idx = jnp.zeros((), jnp.int32)
    for a in axes:
        idx = idx * jax.lax.axis_size(a) + jax.lax.axis_index(a)
    return idx


def _sort_for_send(routing: Routing, owner, local, n_dev: int):
    """Copies ordered by (owner device, local expert): (order, dest, lid, rank, send_counts)."""
    flat = jnp.where(routing.valid_TK, routing.experts_TK, owner.shape[0] - 1).reshape(-1)
    dest, lid = owner[flat], local[flat]
    order = jnp.argsort(dest * (local.shape[0] + 1) + lid, stable=True)
    dest_s, lid_s = dest[order], lid[order]
    counts = jnp.zeros((n_dev,), jnp.int32).at[dest_s].add(1, mode="drop")
    start = jnp.cumsum(counts) - counts
    rank = jnp.arange(flat.shape[0]) - start[jnp.minimum(dest_s, n_dev - 1)]
    return order, dest_s, lid_s, rank, counts


def _local_experts(rows_ND, lid_N, local_groups, n_local: int, dtype):
    """Received rows through this device's experts (rows with lid = n_local give zeros)."""
    order = jnp.argsort(lid_N, stable=True)
    counts = jnp.zeros((n_local,), jnp.int32).at[lid_N].add(1, mode="drop")
    y = grouped_swiglu(rows_ND[order], counts, local_groups, dtype)
    return y[inverse_permutation(order)]


def _exchange_dense(x_TD, routing, local_groups, owner, local, n_dev, n_local, rows, dtype):
    """[T, K, D]: expert outputs per copy via padded all_to_all (`rows` per device pair)."""
    t, k = routing.experts_TK.shape
    d = x_TD.shape[-1]
    m = rows
    order, dest_s, lid_s, rank, _ = _sort_for_send(routing, owner, local, n_dev)
    # Row (dest, rank) of the send buffer; invalid copies (dest = n_dev) fall off the end.
    slot = jnp.where(dest_s < n_dev, dest_s * m + rank, n_dev * m)
    xs = x_TD[order // k]
    send = jnp.zeros((n_dev * m, d), dtype).at[slot].set(xs, mode="drop")
    send_lid = jnp.full((n_dev * m,), n_local, jnp.int32).at[slot].set(lid_s, mode="drop")
    recv = jax.lax.all_to_all(send.reshape(n_dev, m, d), AXIS, 0, 0)
    recv_lid = jax.lax.all_to_all(send_lid.reshape(n_dev, m), AXIS, 0, 0)
    out = _local_experts(recv.reshape(n_dev * m, d), recv_lid.reshape(-1), local_groups,
                         n_local, dtype)  # fmt: skip
    back = jax.lax.all_to_all(out.reshape(n_dev, m, d), AXIS, 0, 0).reshape(n_dev * m, d)
    # each copy's row of the returned buffer, in [T·K] order: one gather, no unsort copy
    slot_TK = slot[inverse_permutation(order)]
    return jnp.take(back, slot_TK, axis=0, mode="fill", fill_value=0).reshape(t, k, d)


def _exchange_ragged(x_TD, routing, local_groups, owner, local, n_dev, n_local, rows, dtype):
    """[T, K, D] via `lax.ragged_all_to_all`: only real rows travel; the receive buffer holds
    n_dev · `rows` (the worst case) since shapes are static."""
    t, k = routing.experts_TK.shape
    d = x_TD.shape[-1]
    m = rows
    order, dest_s, lid_s, _, counts = _sort_for_send(routing, owner, local, n_dev)
    me = jax.lax.axis_index(AXIS)
    all_counts = jax.lax.all_gather(counts, AXIS)  # [src, dst]
    send_off = jnp.cumsum(counts) - counts
    # Where my chunk lands at each receiver: after the chunks of lower-numbered senders.
    out_off = jnp.sum(jnp.where(jnp.arange(n_dev)[:, None] < me, all_counts, 0), axis=0)
    recv_sizes = all_counts[:, me]
    recv_off = jnp.cumsum(recv_sizes) - recv_sizes
    xs = x_TD[order // k]
    ra2a = jax.lax.ragged_all_to_all
    buf = jnp.zeros((n_dev * m, d), dtype)
    recv = ra2a(xs, buf, send_off, counts, out_off, recv_sizes, axis_name=AXIS)
    lid_buf = jnp.full((n_dev * m, 1), n_local, jnp.int32)
    recv_lid = ra2a(lid_s[:, None], lid_buf, send_off, counts, out_off, recv_sizes, axis_name=AXIS)
    n_recv = jnp.sum(recv_sizes)
    lid_N = jnp.where(jnp.arange(n_dev * m) < n_recv, recv_lid[:, 0], n_local)
    out = _local_experts(recv, lid_N, local_groups, n_local, dtype)
    # Return trip: the owner sends each source's rows back to where they came from.
    back_off = jnp.sum(jnp.where(jnp.arange(n_dev)[None, :] < me, all_counts, 0), axis=1)
    ys = ra2a(out, jnp.zeros((t * k, d), dtype), recv_off, recv_sizes, back_off, counts,
              axis_name=AXIS)  # fmt: skip
    ys = jnp.where((dest_s < n_dev)[:, None], ys, 0)
    return ys[inverse_permutation(order)].reshape(t, k, d)
