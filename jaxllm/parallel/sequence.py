"""Sequence parallelism over the mesh axis `sequence`: the token axis T is split into P
contiguous shards, one per device of that axis, and each mixer exchanges only what it must.

Linear mixers (state S_t = diag(a_t) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t; lightning attention
has a_t = λ per head, gated linear attention a_t = exp(g_t) per channel). Shard r computes,
from a zero state, its local output o⁰ and its state contribution M_r [B, H, K, V] float32
plus its total decay A_r = Π_t a_t [B, H, K]. The state entering shard r is

    S_r = Σ_{j<r} (Π_{j<i<r} A_i) ⊙ M_j,

and its output is o_t = o⁰_t + (q_t ⊙ Π_{s≤t} a_s) S_r (the state's contribution is linear).
- `lasp2`: one all-gather of every (M_j, A_j), each shard combines the earlier ones itself.
- `lasp1`: the ring: P−1 rounds of `ppermute` pass S_{r+1} = A_r ⊙ S_r + M_r to shard r+1.
Either way a hop carries one [B, H, K, V] state, whatever T is. The backward is autodiff's:
it transposes the all-gather into a reduce-scatter and the ring into the reverse ring, which
is LASP's backward (states dM flowing from later shards to earlier ones).

Softmax attention:
- `allgather`: every shard gathers K and V of the whole sequence (GQA: only the G kv heads)
  and attends with its local queries; causality and packing come from global token indices
  and the segment ids. `zigzag=True` orders the 2P chunks so shard r holds chunks r and
  2P−1−r, which balances the causal work (it permutes T, a resharding, unless the data is
  fed in that order already: `zigzag_order`).
- `ulysses`: two all-to-alls swap the sequence split for a head split, full attention on
  H/P heads, and back (H and G divisible by P; kv heads are repeated up to H otherwise).

Every function takes global arrays (inside `jit`) and the mesh; the batch dim is split over
`batch_axes` present in the mesh, heads over `tensor`, in a `shard_map` built by
`jaxllm.parallel.core.per_device` (``check_vma=False``: the splash kernel inside softmax's
cannot type its outputs' variance).
Inside a shard_map already manual over some batch axes (the train step's per-replica one, over
`data`) the arrays are that slice's rows and only the remaining axes split them; the exchanges
run over `sequence` alone either way, so each row's shards see the same states and keys.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxllm.ops.attention import attention
from jaxllm.ops.gated_linear_attention import gated_linear_attention
from jaxllm.ops.lightning_attention import lightning_attention
from jaxllm.ops.lightning_attention_packed import lightning_attention_packed
from jaxllm.parallel.core.axes import BATCH_AXES, HEAD_AXES, SEQUENCE
from jaxllm.parallel.core.per_device import DeviceMap, per_device
from jaxllm.parallel.core.rules import active_mesh

AXIS = SEQUENCE
LINEAR_IMPLS = ("lasp2", "lasp1")
SOFTMAX_IMPLS = ("allgather", "ulysses")


_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("jaxllm_sequence_impl", default="auto")


def default_impl(kind: str) -> str:
    """`parallel.sequence_impl=auto`: LASP-2 for linear mixers, all-gather for softmax."""
    return "lasp2" if kind == "linear" else "allgather"


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Trace with `parallel.sequence_impl` = impl (the train / eval steps set it)."""
    token = _IMPL.set(impl)
    try:
        yield
    finally:
        _IMPL.reset(token)


def active(kind: str) -> tuple[Mesh, str] | None:
    """(mesh, impl) for a mixer of `kind` ("linear" | "softmax") traced under `use_rules` on a
    mesh whose `sequence` axis is > 1; None otherwise (the mixer runs its plain op). An impl
    of the other kind (lasp1 for a softmax layer) falls back to that kind's default."""
    mesh = active_mesh()
    if mesh is None or mesh.shape.get(AXIS, 1) == 1:
        return None
    impl = _IMPL.get()
    valid = LINEAR_IMPLS if kind == "linear" else SOFTMAX_IMPLS
    return mesh, impl if impl in valid else default_impl(kind)


def _specs(
    mesh: Mesh, B: int, H: int, batch_axes: Sequence[str]
) -> tuple[DeviceMap, tuple[str, ...] | None, tuple[str, ...] | None]:
    """(the map traced here, batch axes, head axes): only axes an outer shard_map left
    automatic split B and H."""
    dm = per_device(mesh)
    if AXIS not in dm.free:
        raise ValueError("sequence parallelism cannot run in a shard_map manual over `sequence`")
    return dm, dm.axes(batch_axes, B), dm.axes(HEAD_AXES, H)


def _shards(mesh: Mesh, T: int) -> int:
    n = mesh.shape.get(AXIS, 1)
    if T % n:
        raise ValueError(f"sequence length {T} is not divisible by the {n} sequence shards")
    return n


# ----------------------------------------------------------------------------- linear


def _zero_state(q, v):
    """A zero [B, H, K, V] float32 state typed as varying over the same manual axes as `q`
    (check_vma: a scan carry must keep its type; `zeros_like` keeps q's, plain zeros do not)."""
    B, _, H, K = q.shape
    return jnp.zeros_like(q, shape=(B, H, K, v.shape[-1]), dtype=jnp.float32)


def _incoming_state(M_BHKV, logA_BHK, impl: str, n: int):
    """S_r, the state entering this shard, from every shard's (M_j, log A_j)."""
    r = lax.axis_index(AXIS)
    if impl == "lasp2":
        M_PBHKV = lax.all_gather(M_BHKV, AXIS)
        logA_PBHK = lax.all_gather(logA_BHK, AXIS)
        j = jnp.arange(n)
        # decay from the end of shard j to the start of shard r: Σ_{j<i<r} log A_i, summed
        # term by term (no differences of cumulative sums, which lose precision)
        between_JI = (j[None, :] > j[:, None]) & (j[None, :] < r)
        log_w_PBHK = jnp.einsum("ji,ibhk->jbhk", between_JI.astype(jnp.float32), logA_PBHK)
        w_PBHK = jnp.where((j < r)[:, None, None, None], jnp.exp(log_w_PBHK), 0.0)
        return jnp.einsum("pbhk,pbhkv->bhkv", w_PBHK, M_PBHKV)
    # lasp1: after round m, shards r ≤ m hold their final incoming state.
    A_BHK1 = jnp.exp(logA_BHK)[..., None]
    S = jnp.zeros_like(M_BHKV)
    ring = [(i, i + 1) for i in range(n - 1)]
    for _ in range(n - 1):
        S = lax.ppermute(A_BHK1 * S + M_BHKV, AXIS, ring)
    return S


# log of a decay that is exactly zero (a document start cuts the state); finite, so the
# masked sums in `_incoming_state` never form 0·(−inf)
_CUT = -1e30


def _packing(seg_BT):
    """For packed rows (state reset where the segment id changes): which local tokens belong
    to the shard's first document [B, T], whether the shard holds a reset [B], and whether
    it starts a new document, i.e. its first id differs from the previous shard's last [B]."""
    change_BT = seg_BT[:, 1:] != seg_BT[:, :-1]
    first_BT = jnp.concatenate(
        [jnp.ones_like(seg_BT[:, :1], bool), jnp.cumsum(change_BT, axis=1) == 0], axis=1
    )
    last_PB = lax.all_gather(seg_BT[:, -1], AXIS)
    r = lax.axis_index(AXIS)
    starts_B = (r > 0) & (seg_BT[:, 0] != last_PB[jnp.maximum(r - 1, 0)])
    return first_BT, jnp.any(change_BT, axis=1), starts_B


def _linear_sp(local_fn, q, k, v, decay, seg, *, mesh, impl, batch_axes, decay_spec):
    """Shared driver: `local_fn(q, k, v, decay, seg) -> (o⁰, M, log A, log cumulative decay)`.

    seg [B, T] or None: packed documents. A shard's state leaves it only if it holds no reset
    and does not itself start a document; the incoming state reaches only its first document.
    """
    if impl not in LINEAR_IMPLS:
        raise ValueError(f"impl must be one of {LINEAR_IMPLS}, got {impl!r}")
    B, T, H, _ = q.shape
    n = _shards(mesh, T)
    dm, b, h = _specs(mesh, B, H, batch_axes)
    x_spec = P(b, AXIS, h, None)

    def body(q, k, v, decay, seg):
        o0, M, logA, logcum_BTHK = local_fn(q, k, v, decay, seg)
        qd = q.astype(jnp.float32) * jnp.exp(logcum_BTHK)
        if seg is None:
            S = _incoming_state(M, logA, impl, n)
        else:
            first_BT, reset_B, starts_B = _packing(seg)
            logA = jnp.where((reset_B | starts_B)[:, None, None], _CUT, logA)
            S = _incoming_state(M, logA, impl, n) * (~starts_B)[:, None, None, None]
            qd = qd * first_BT[:, :, None, None]
        o = o0.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", qd, S)
        return o.astype(q.dtype)

    seg_spec = None if seg is None else P(b, AXIS)
    in_specs = (x_spec, x_spec, x_spec, decay_spec(b, h), seg_spec)
    return dm(body, in_specs=in_specs, out_specs=x_spec)(q, k, v, decay, seg)


def lightning_attention_sp(
    q, k, v, log_decay=None, *, mesh: Mesh, impl: str = "lasp2", chunk_size=None,
    segment_ids_BT=None, batch_axes: Sequence[str] = BATCH_AXES, op_impl: str = "auto",
):  # fmt: skip
    """`jaxllm.ops.lightning_attention` with T split over the mesh axis `sequence`.

    q, k [B, T, H, K], v [B, T, H, V], log_decay [H] or None → o [B, T, H, V] (q's dtype).
    segment_ids_BT [B, T]: packed documents, as `lightning_attention_packed` (state reset
    where the id changes). impl: "lasp2" (one all-gather of states) or "lasp1" (ring).
    """
    H = q.shape[2]
    g_H = jnp.zeros((H,), jnp.float32) if log_decay is None else jnp.asarray(log_decay, jnp.float32)

    def local(q, k, v, g_H, seg):
        if seg is None:
            o0, M = lightning_attention(
                q, k, v, g_H, initial_state=_zero_state(q, v), return_final_state=True,
                chunk_size=chunk_size, impl=op_impl,
            )  # fmt: skip
        else:
            o0, M = lightning_attention_packed(
                q, k, v, g_H, seg, initial_state=_zero_state(q, v), return_final_state=True,
                chunk_size=chunk_size, impl=op_impl,
            )  # fmt: skip
        Tl = q.shape[1]
        logA = jnp.broadcast_to((Tl * g_H)[None, :, None], (q.shape[0], g_H.shape[0], q.shape[3]))
        t = jnp.arange(1, Tl + 1, dtype=jnp.float32)
        logcum = (t[:, None] * g_H[None, :])[None, :, :, None]  # a_s = λ for s ≤ t: (t+1)·log λ
        return o0, M, logA, logcum

    return _linear_sp(
        local, q, k, v, g_H, segment_ids_BT, mesh=mesh, impl=impl, batch_axes=batch_axes,
        decay_spec=lambda b, h: P(h),
    )  # fmt: skip


def gated_linear_attention_sp(
    q, k, v, log_gate, *, mesh: Mesh, impl: str = "lasp2", chunk_size=None,
    segment_ids_BT=None, batch_axes: Sequence[str] = BATCH_AXES, op_impl: str = "auto",
):  # fmt: skip
    """`jaxllm.ops.gated_linear_attention` with T split over the mesh axis `sequence`.

    q, k [B, T, H, K], v [B, T, H, V], log_gate [B, T, H, K] (≤ 0) → o [B, T, H, V].
    segment_ids_BT [B, T]: packed documents, the state reset exactly where the id changes:
    inside a shard by the op (its `segment_ids_BT`), across shards by cutting the shards'
    states (`_linear_sp`, which also confines the incoming state to the first document, so
    `logcum` needs no reset).
    """

    def local(q, k, v, g, seg):
        o0, M = gated_linear_attention(
            q, k, v, g, segment_ids_BT=seg, initial_state=_zero_state(q, v),
            return_final_state=True, chunk_size=chunk_size, impl=op_impl,
        )  # fmt: skip
        logcum = jnp.cumsum(g.astype(jnp.float32), axis=1)
        return o0, M, logcum[:, -1], logcum

    return _linear_sp(
        local, q, k, v, log_gate, segment_ids_BT, mesh=mesh, impl=impl, batch_axes=batch_axes,
        decay_spec=lambda b, h: P(b, AXIS, h, None),
    )  # fmt: skip


# ---------------------------------------------------------------------------- softmax


def zigzag_order(T: int, n: int) -> np.ndarray:
    """Token order that puts chunks r and 2n−1−r (of 2n) on shard r: [T] indices."""
    if T % (2 * n):
        raise ValueError(f"zig-zag needs T={T} divisible by 2·{n}")
    c = T // (2 * n)
    chunks = np.arange(T).reshape(2 * n, c)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * n - 1 - r]]) for r in range(n)])


def attention_sp(
    q_BTHK, k_BTGK, v_BTGV, *, mesh: Mesh, impl: str = "allgather",
    segment_ids_BT=None, causal: bool = True, scale=None, zigzag: bool = False,
    batch_axes: Sequence[str] = BATCH_AXES, attn_impl: str = "auto",
):  # fmt: skip
    """Causal softmax attention (GQA) with T split over the mesh axis `sequence`.

    q [B, T, H, K], k [B, T, G, K], v [B, T, G, V], segment_ids [B, T] (packed documents; None
    = one document) → [B, T, H, V]. Causality is by token index within the packed row.
    """
    if impl not in SOFTMAX_IMPLS:
        raise ValueError(f"impl must be one of {SOFTMAX_IMPLS}, got {impl!r}")
    B, T, H, _ = q_BTHK.shape
    G = k_BTGK.shape[2]
    n = _shards(mesh, T)
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    order = None
    if zigzag and impl == "allgather":
        order = zigzag_order(T, n)
        q_BTHK, k_BTGK, v_BTGV = (x[:, order] for x in (q_BTHK, k_BTGK, v_BTGV))
        seg, idx = seg[:, order], idx[:, order]
    if impl == "ulysses":
        if H % n or G % n:
            # the kv heads must split as the query heads do
            k_BTGK, v_BTGV = (jnp.repeat(x, H // G, axis=2) for x in (k_BTGK, v_BTGV))
            G = H
        if H % n:
            raise ValueError(f"ulysses needs the {H} heads divisible by the {n} shards")
    dm, b, h = _specs(mesh, B, G, batch_axes)
    x_spec, t_spec = P(b, AXIS, h, None), P(b, AXIS)

    def gathered(q, k, v, seg, idx):
        k_all, v_all = (lax.all_gather(x, AXIS, axis=1, tiled=True) for x in (k, v))
        seg_all, idx_all = (lax.all_gather(x, AXIS, axis=1, tiled=True) for x in (seg, idx))
        return attention(
            q, k_all, v_all, causal=causal, segment_ids_BT=seg, kv_segment_ids_BS=seg_all,
            q_positions_BT=idx, kv_positions_BS=idx_all, scale=scale, impl=attn_impl,
        )  # fmt: skip

    def ulysses(q, k, v, seg, _idx):
        # [B, T/n, h, K] → [B, T, h/n, K]: split heads, concatenate the sequence
        swap = lambda x: lax.all_to_all(x, AXIS, 2, 1, tiled=True)
        # every device holds whole rows in token order: causal by index, no positions, so
        # `attention` may take its flash path (splash / cuDNN)
        seg_all = lax.all_gather(seg, AXIS, axis=1, tiled=True)
        o = attention(
            swap(q), swap(k), swap(v), causal=causal, segment_ids_BT=seg_all, scale=scale,
            impl=attn_impl,
        )  # fmt: skip
        return lax.all_to_all(o, AXIS, 1, 2, tiled=True)

    fn = dm(
        gathered if impl == "allgather" else ulysses,
        in_specs=(x_spec, x_spec, x_spec, t_spec, t_spec),
        out_specs=x_spec,
    )
    o = fn(q_BTHK, k_BTGK, v_BTGV, seg, idx)
    if order is not None:
        o = o[:, np.argsort(order)]
    return o
