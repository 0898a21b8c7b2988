"""Causal softmax attention with packed documents on GPU (FlashAttention-2): Pallas kernels
through the Triton lowering.

Per (batch, query head h, block of `block_q` queries) the forward walks the key blocks from
the first one holding a key of the block's documents up to the diagonal with the online
softmax (running max m, sum l, float32 accumulator), in base 2: s = (q·kᵀ)·scale·log₂e,
masked where the key is later (causal) or in another document (segment ids differ), and stores
o and lse = m + log₂ l [B, H, T]. No [T, S] score tensor exists outside the registers of
one block pair.

The backward (Dao 2023, Algorithm 2) recomputes p = 2^(s − lse) per block pair, with
δ = rowsum(dO ⊙ O) computed by XLA beforehand:
- dq kernel, per (batch, query head, query block): dq = scale · Σ_j [p ⊙ (dO·vᵀ − δ)] · k;
- dk/dv kernel, per (batch, kv head g, key block): the same block pairs from the diagonal on,
  for each of the R = H/G query heads that share g: dv = Σ pᵀ·dO, dk = scale · Σ dsᵀ·q.
GQA is read from the shared K/V directly (the query head's block index picks kv head h // R),
never repeated in memory.

Tiles are powers of two (Triton): head dims are zero-padded to one (≥ 16) by the caller, T to
a multiple of the blocks with a segment id of their own (padded keys are later than every real
query, so causal masking hides them as well). Segment ids arrive twice, as column 0 of a
[T, 2] array (queries) and row 0 of a [2, T] array (keys), so masks are built without
transposes; column 1 holds the first key position each query may see and row 1 the end of the
queries each key may be seen by (the caller's document bounds, `api._document_bounds`): a
block visits only the blocks its documents reach, so packed rows skip cross-document blocks
(the dk/dv kernel likewise stops after the last query block of its keys' documents).
Block sizes are untuned (no GPU was at hand when this was written): 64 × 64 tiles, as jax's
Pallas example kernel (`jax.experimental.pallas.ops.gpu.attention`) and the Triton tutorial.
"""

import functools
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.vma import out_shape

LOG2E = math.log2(math.e)
MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
BLOCK_Q = BLOCK_K = 64


def _dot(a, b, contract=(1, 1)):
    """a·b contracting a's dim contract[0] with b's dim contract[1], in float32."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _params(block_q, block_k, head_dim):
    num_warps = 4 if max(block_q, block_k) * head_dim <= 64 * 64 else 8
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=2)


def _scores(q, k, qseg_col_ref, kseg_row_ref, i, j, block_q, block_k, scale, causal):
    """Base-2 logits [bq, bk] of query block i against key block j, masked."""
    s = _dot(q, k) * (scale * LOG2E)
    rows = pl.ds(i * block_q, block_q)
    cols = pl.ds(j * block_k, block_k)
    keep = qseg_col_ref[rows, pl.ds(0, 1)] == kseg_row_ref[pl.ds(0, 1), cols]
    if causal:
        qi = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        kj = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        keep = keep & (qi >= kj)
    return jnp.where(keep, s, MASKED)


def _key_blocks(qcol_ref, i, block_q, block_k, n_k, causal):
    """[first, end) of the key blocks query block i visits: from the one holding the first key
    its documents reach to the last one starting at or before its last query (causal)."""
    first = jnp.min(qcol_ref[pl.ds(i * block_q, block_q), pl.ds(1, 1)]) // block_k
    end = lax.div((i + 1) * block_q + block_k - 1, block_k) if causal else n_k
    return first, jnp.minimum(end, n_k)


def _fwd_kernel(q_ref, k_ref, v_ref, qcol_ref, krow_ref, o_ref, lse_ref, *, scale, causal,
                block_q, block_k):  # fmt: skip
    """q, o [bq, Kq|Kv] of one (batch, head, query block); k, v [S, ·] of its kv head."""
    i = pl.program_id(2)
    q = q_ref[...]
    bq = q.shape[0]
    n_k = k_ref.shape[0] // block_k

    def body(j, carry):
        acc, m, l = carry
        keys = pl.ds(j * block_k, block_k)
        s = _scores(q, k_ref[keys, :], qcol_ref, krow_ref, i, j, block_q, block_k, scale, causal)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.exp2(s - m_new[:, None])
        corr = jnp.exp2(m - m_new)
        acc = acc * corr[:, None] + _dot(p.astype(v_ref.dtype), v_ref[keys, :], (1, 0))
        return acc, m_new, l * corr + jnp.sum(p, axis=1)

    acc = jnp.zeros((bq, v_ref.shape[1]), jnp.float32)
    m = jnp.full((bq,), -jnp.inf, jnp.float32)
    l = jnp.zeros((bq,), jnp.float32)
    first, end = _key_blocks(qcol_ref, i, block_q, block_k, n_k, causal)
    acc, m, l = lax.fori_loop(first, end, body, (acc, m, l))
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _dq_kernel(q_ref, k_ref, v_ref, qcol_ref, krow_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, causal, block_q, block_k):  # fmt: skip
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    n_k = k_ref.shape[0] // block_k

    def body(j, dq):
        keys = pl.ds(j * block_k, block_k)
        k = k_ref[keys, :]
        s = _scores(q, k, qcol_ref, krow_ref, i, j, block_q, block_k, scale, causal)
        p = jnp.exp2(s - lse[:, None])
        ds = p * (_dot(do, v_ref[keys, :]) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = jnp.zeros(q.shape, jnp.float32)
    first, end = _key_blocks(qcol_ref, i, block_q, block_k, n_k, causal)
    dq = lax.fori_loop(first, end, body, dq)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(q_ref, k_ref, v_ref, qcol_ref, krow_ref, do_ref, lse_ref, delta_ref, dk_ref,
                 dv_ref, *, scale, causal, block_q, block_k, group, kq, kv):  # fmt: skip
    """One (batch, kv head, key block): q, dO [T, R·K] hold the R query heads sharing the kv
    head side by side; lse, δ [R·T] likewise."""
    j = pl.program_id(2)
    keys = pl.ds(j * block_k, block_k)
    k, v = k_ref[keys, :], v_ref[keys, :]
    t = q_ref.shape[0]
    n_q = t // block_q
    first = lax.div(j * block_k, block_q) if causal else 0
    # past the last query of the documents of the block's keys nothing attends to them
    end = jnp.max(krow_ref[pl.ds(1, 1), keys])
    end = jnp.minimum(lax.div(end + block_q - 1, block_q), n_q)

    def body(r, i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q = q_ref[rows, pl.ds(r * kq, kq)]
        do = do_ref[rows, pl.ds(r * kv, kv)]
        lse = lse_ref[pl.ds(r * t + i * block_q, block_q)]
        delta = delta_ref[pl.ds(r * t + i * block_q, block_q)]
        s = _scores(q, k, qcol_ref, krow_ref, i, j, block_q, block_k, scale, causal)
        p = jnp.exp2(s - lse[:, None])
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        ds = p * (_dot(do, v) - delta[:, None])
        return dk + _dot(ds.astype(q.dtype), q, (0, 0)), dv

    carry = (jnp.zeros((block_k, kq), jnp.float32), jnp.zeros((block_k, kv), jnp.float32))
    for r in range(group):  # static: R query heads per kv head
        carry = lax.fori_loop(first, end, functools.partial(body, r), carry)
    dk, dv = carry
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def forward(q, k, v, qcol, krow, *, scale, causal, block_q, block_k, interpret):
    """q [B, T, H, Kq], k [B, T, G, Kq], v [B, T, G, Kv] (T a multiple of both blocks, dims
    powers of two), qcol [B, T, 2], krow [B, 2, T] int32 (segment ids; document bounds)
    → o [B, T, H, Kv], lse [B, H, T]."""
    b, t, h, kq = q.shape
    g, kv = k.shape[2], v.shape[3]
    r = h // g
    kernel = functools.partial(_fwd_kernel, scale=scale, causal=causal, block_q=block_q,
                               block_k=block_k)  # fmt: skip
    return pl.pallas_call(
        kernel,
        grid=(b, h, t // block_q),
        in_specs=[
            pl.BlockSpec((None, block_q, None, kq), lambda b_, h_, i: (b_, i, h_, 0)),
            pl.BlockSpec((None, t, None, kq), lambda b_, h_, i: (b_, 0, h_ // r, 0)),
            pl.BlockSpec((None, t, None, kv), lambda b_, h_, i: (b_, 0, h_ // r, 0)),
            pl.BlockSpec((None, t, 2), lambda b_, h_, i: (b_, 0, 0)),
            pl.BlockSpec((None, 2, t), lambda b_, h_, i: (b_, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_q, None, kv), lambda b_, h_, i: (b_, i, h_, 0)),
            pl.BlockSpec((None, None, block_q), lambda b_, h_, i: (b_, h_, i)),
        ],
        out_shape=[
            out_shape((b, t, h, kv), q.dtype, q, k, v),
            out_shape((b, h, t), jnp.float32, q, k, v),
        ],
        compiler_params=_params(block_q, block_k, max(kq, kv)),
        interpret=interpret,
        name="flash_attention_forward",
    )(q, k, v, qcol, krow)


def backward(q, k, v, qcol, krow, do, lse, delta, *, scale, causal, block_q, block_k, interpret):
    """(dq, dk, dv) in q's, k's and v's shapes and dtypes; lse, δ [B, H, T] float32."""
    b, t, h, kq = q.shape
    g, kv = k.shape[2], v.shape[3]
    r = h // g
    kw = dict(scale=scale, causal=causal, block_q=block_q, block_k=block_k)
    seg_specs = [pl.BlockSpec((None, t, 2), lambda b_, x, i: (b_, 0, 0)),
                 pl.BlockSpec((None, 2, t), lambda b_, x, i: (b_, 0, 0))]  # fmt: skip
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid=(b, h, t // block_q),
        in_specs=[
            pl.BlockSpec((None, block_q, None, kq), lambda b_, h_, i: (b_, i, h_, 0)),
            pl.BlockSpec((None, t, None, kq), lambda b_, h_, i: (b_, 0, h_ // r, 0)),
            pl.BlockSpec((None, t, None, kv), lambda b_, h_, i: (b_, 0, h_ // r, 0)),
            *seg_specs,
            pl.BlockSpec((None, block_q, None, kv), lambda b_, h_, i: (b_, i, h_, 0)),
            pl.BlockSpec((None, None, block_q), lambda b_, h_, i: (b_, h_, i)),
            pl.BlockSpec((None, None, block_q), lambda b_, h_, i: (b_, h_, i)),
        ],
        out_specs=pl.BlockSpec((None, block_q, None, kq), lambda b_, h_, i: (b_, i, h_, 0)),
        out_shape=out_shape(q.shape, q.dtype, q, k, v, do),
        compiler_params=_params(block_q, block_k, max(kq, kv)),
        interpret=interpret,
        name="flash_attention_dq",
    )(q, k, v, qcol, krow, do, lse, delta)
    # the R query heads of each kv head side by side: free reshapes (h = g·R + r)
    q_grouped = q.reshape(b, t, g, r * kq)
    do_grouped = do.reshape(b, t, g, r * kv)
    lse_grouped, delta_grouped = (x.reshape(b, g, r * t) for x in (lse, delta))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, group=r, kq=kq, kv=kv, **kw),
        grid=(b, g, t // block_k),
        in_specs=[
            pl.BlockSpec((None, t, None, r * kq), lambda b_, g_, j: (b_, 0, g_, 0)),
            pl.BlockSpec((None, t, None, kq), lambda b_, g_, j: (b_, 0, g_, 0)),
            pl.BlockSpec((None, t, None, kv), lambda b_, g_, j: (b_, 0, g_, 0)),
            *seg_specs,
            pl.BlockSpec((None, t, None, r * kv), lambda b_, g_, j: (b_, 0, g_, 0)),
            pl.BlockSpec((None, None, r * t), lambda b_, g_, j: (b_, g_, 0)),
            pl.BlockSpec((None, None, r * t), lambda b_, g_, j: (b_, g_, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, block_k, None, kq), lambda b_, g_, j: (b_, j, g_, 0)),
            pl.BlockSpec((None, block_k, None, kv), lambda b_, g_, j: (b_, j, g_, 0)),
        ],
        out_shape=[
            out_shape(k.shape, k.dtype, q, k, v, do),
            out_shape(v.shape, v.dtype, q, k, v, do),
        ],
        compiler_params=_params(block_q, block_k, max(kq, kv)),
        interpret=interpret,
        name="flash_attention_dkdv",
    )(q_grouped, k, v, qcol, krow, do_grouped, lse_grouped, delta_grouped)
    return dq, dk, dv
