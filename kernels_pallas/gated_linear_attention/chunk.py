"""Gated linear attention one chunk at a time: the math both kernels (tpu.py, gpu.py) run.

Per batch element and head, S_t = diag(exp(g_t)) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t. The kernels
keep the state transposed, P = Sᵀ [V, K], so that every per-key-channel scaling is of a row
vector against rows ([1, K] against [·, K]): neither Mosaic nor Triton transposes a vector.

A chunk holds C tokens; b [C, K] is the chunk-local inclusive cumulative sum of the log gates
(float32, formed outside the kernels), b_l its last row. For t, s in the chunk, every factor
is exp(b_t − b_s) with t ≥ s, so ≤ 1:

    o_t  = Σ_{s≤t} (Σ_K q_t k_s exp(b_t − b_s)) v_s  +  (q_t ⊙ exp(b_t)) Pᵀ
    P   ← P ⊙ exp(b_l) + vᵀ (k ⊙ exp(b_l − b))

The intra-chunk scores A [C, C] are built per sub-chunk of c tokens as fla's `chunk_gla`:
queries of sub-chunk i against keys of earlier sub-chunks split exp(b_t − b_s) at r, the
sub-chunk's first row, into exp(b_t − b_r) · exp(b_r − b_s), both ≤ 1, one matmul; pairs inside
a sub-chunk take exp(b_t − b_s) elementwise, one key (or query) at a time. Nothing overflows
however strong the gates.

Backward, with dA = (dO Vᵀ) ⊙ mask and dP the cotangent of the state leaving the chunk:

    dq_t = Σ_{s≤t} dA_ts k_s ⊙ exp(b_t − b_s)  +  exp(b_t) ⊙ (dO_t P)
    dk_s = Σ_{t≥s} dA_ts q_t ⊙ exp(b_t − b_s)  +  exp(b_l − b_s) ⊙ (v_s dP)
    dv_s = Σ_{t≥s} A_ts dO_t                   +  (k_s ⊙ exp(b_l − b_s)) dPᵀ
    dP  ← dP ⊙ exp(b_l) + dOᵀ (q ⊙ exp(b))

where the key-side split uses r = the last row of the key's sub-chunk. The gates' gradient is
not formed here but in api.py, from dq, dk and `state_product` at anchors.

Packed documents (`doc`, the masks of `kernels_pallas.documents`): pairs of different
documents are masked on A and dA, the incoming state reaches only the chunk's first document
(keep_in), the outgoing state takes only its last document's keys (keep_out), and carries the
incoming state on only when no document starts inside the chunk (keep_state). b runs across the
resets: every factor used spans one document, and the resets' gates drop out.

Precision: the intra-chunk matmuls (A, dA and their products) take the inputs' dtype, as
fla's; those of the state path (the state update, and in the backward every product with P or
dP) take float32 operands. The gates' gradient is a difference of q ⊙ dq and k ⊙ dk summed over
tokens (api.py), whose terms cancel: measured in bfloat16 (B2 T100 H2, random gates, h0 and final
cotangent) its error against the float32 reference went from 1.0e-2 to 3.0e-3 (RMS ratio), the
final state's from 1.2e-3 to 6e-7. The forward reads the state in the inputs' dtype.

A kernel hands these functions `load(name, r, n)`, the rows r..r+n of the chunk of one of
"q", "k", "v", "b", "do" (r a multiple of c), and `store(name, r, x)`.
"""

import jax.numpy as jnp
from jax import lax

CHUNK = 64  # C: tokens per chunk, the [C, C] score tile
SUB_CHUNK = 16  # c: the sub-chunk, the smallest MMA tile
F32 = jnp.float32


def _dot(a, b, contract=(1, 0)):
    """a·b contracting a's dim contract[0] with b's dim contract[1], accumulated in float32."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=F32)


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _row(x, r):
    """Row r of x as [1, ·] (a masked sum: r may be traced, and no kernel slices a value)."""
    return jnp.sum(jnp.where(_iota(x.shape, 0) == r, x, 0.0), axis=0, keepdims=True)


def _col(x, s):
    """Column s of x as [·, 1]."""
    return jnp.sum(jnp.where(_iota(x.shape, 1) == s, x, 0.0), axis=1, keepdims=True)


def _gate(b_later, b_earlier, keep):
    """exp(b_later − b_earlier) where keep (the pair is ordered), else 0: the exponent is
    clamped at 0 first, so the pairs left out cannot overflow."""
    return jnp.where(keep, jnp.exp(jnp.minimum(b_later - b_earlier, 0.0)), 0.0)


def state_product(S_VK, dS_VK):
    """Σ_V S ⊙ dS [1, K]: the gradient of the log gates summed over every token after the
    state S (api.py's anchors)."""
    return jnp.sum(S_VK * dS_VK, axis=0, keepdims=True)


class Documents:
    """A packed chunk's masks from loaders: same(r, n) [n, C] (the rows' tokens against every
    token of the chunk: same document), keep_in(r, n) and keep_out(r, n) [n, 1], all float32."""

    def __init__(self, same, keep_in, keep_out, C):
        self.same, self.keep_in, self.keep_out, self.C = same, keep_in, keep_out, C

    def keep_state(self):
        """[1, 1]: 1 when no document starts inside the chunk (every token reads the state)."""
        return jnp.min(self.keep_in(0, self.C), axis=0, keepdims=True)


def _masked(x, doc, mask, r, n):
    return x if doc is None else x * getattr(doc, mask)(r, n)


def _state_decay(b_last_1K, doc):
    decay_1K = jnp.exp(b_last_1K)
    return decay_1K if doc is None else decay_1K * doc.keep_state()


def _key_decay(b_last_1K, b_nK, doc, r):
    """k's factor into the outgoing state, exp(b_l − b_s) [n, K] (masked to the last doc)."""
    return _masked(jnp.exp(b_last_1K - b_nK), doc, "keep_out", r, b_nK.shape[0])


def _query_decay(b_nK, doc, r):
    """q's factor for the incoming state, exp(b_t) [n, K] (masked to the first document)."""
    return _masked(jnp.exp(b_nK), doc, "keep_in", r, b_nK.shape[0])


def _earlier_keys(k_CK, b_CK, b_ref_1K, before):
    """k_s exp(b_r − b_s) for the chunk's keys s < before, 0 for the others: [C, K] float32."""
    keep = _iota((k_CK.shape[0], 1), 0) < before
    return k_CK.astype(F32) * _gate(b_ref_1K, b_CK, keep)


def _later_queries(q_CK, b_CK, b_ref_1K, after):
    """q_t exp(b_t − b_r) for the chunk's queries t ≥ after, 0 for the others: [C, K] float32."""
    keep = _iota((q_CK.shape[0], 1), 0) >= after
    return q_CK.astype(F32) * _gate(b_CK, b_ref_1K, keep)


def _query_block(load, k_CK, b_CK, i, c):
    """The keys' side of sub-chunk i's queries: (b_cK, k_sub_cK, k_in_CK, b_ref_1K), the
    sub-chunk's b and keys, the chunk's earlier keys scaled to the reference row r = i·c
    (None for the first sub-chunk, which has none), and b_r."""
    b_cK, k_sub_cK = load("b", i * c, c), load("k", i * c, c)
    b_ref_1K = _row(b_cK, 0)
    k_in_CK = _earlier_keys(k_CK, b_CK, b_ref_1K, i * c) if i else None
    return b_cK, k_sub_cK, k_in_CK, b_ref_1K


def _scores(q_cK, b_cK, k_sub_cK, k_in_CK, b_ref_1K, i, c, C, doc):
    """A [c, C] float32 for the queries of sub-chunk i: Σ_K q_t k_s exp(b_t − b_s), s ≤ t,
    same document."""
    dtype = q_cK.dtype
    A_cC = jnp.zeros((c, C), F32)
    if k_in_CK is not None:
        q_out_cK = q_cK.astype(F32) * jnp.exp(b_cK - b_ref_1K)
        A_cC = _dot(q_out_cK.astype(dtype), k_in_CK.astype(dtype), (1, 1))
    q32_cK, k32_cK = q_cK.astype(F32), k_sub_cK.astype(F32)
    t_c1, cols_cC = _iota((c, 1), 0), _iota((c, C), 1)

    def diagonal(s, A_cC):
        gate_cK = _gate(b_cK, _row(b_cK, s), t_c1 >= s)
        a_c1 = jnp.sum(q32_cK * _row(k32_cK, s) * gate_cK, axis=1, keepdims=True)
        return jnp.where(cols_cC == i * c + s, a_c1, A_cC)

    A_cC = lax.fori_loop(0, c, diagonal, A_cC)
    return _masked(A_cC, doc, "same", i * c, c)


def _next_state(P_VK, v_CV, k_CK, b_CK, doc):
    """P ⊙ exp(b_l) + vᵀ (k ⊙ exp(b_l − b)), masked by the documents (float32 operands)."""
    b_last_1K = _row(b_CK, k_CK.shape[0] - 1)
    k_out_CK = k_CK.astype(F32) * _key_decay(b_last_1K, b_CK, doc, 0)
    return P_VK * _state_decay(b_last_1K, doc) + _dot(v_CV.astype(F32), k_out_CK, (0, 0))


def forward_chunk(load, store, P_VK, doc=None, *, C=CHUNK, c=SUB_CHUNK):
    """Store o for the chunk's C tokens; return the state P [V, K] float32 after it."""
    v_CV, k_CK, b_CK = load("v", 0, C), load("k", 0, C), load("b", 0, C)
    dtype = v_CV.dtype
    P_in = P_VK.astype(dtype)
    for i in range(C // c):
        b_cK, k_sub_cK, k_in_CK, b_ref_1K = _query_block(load, k_CK, b_CK, i, c)
        q_cK = load("q", i * c, c)
        A_cC = _scores(q_cK, b_cK, k_sub_cK, k_in_CK, b_ref_1K, i, c, C, doc)
        q_in_cK = q_cK.astype(F32) * _query_decay(b_cK, doc, i * c)
        o_cV = _dot(A_cC.astype(dtype), v_CV) + _dot(q_in_cK.astype(dtype), P_in, (1, 1))
        store("o", i * c, o_cV)
    return _next_state(P_VK, v_CV, k_CK, b_CK, doc)


def dq_chunk(load, store, P_VK, doc=None, *, C=CHUNK, c=SUB_CHUNK):
    """The forward sweep of the backward pass: store dq (float32) for the chunk; return the
    rebuilt state P after it."""
    v_CV, k_CK, b_CK = load("v", 0, C), load("k", 0, C), load("b", 0, C)
    dtype = v_CV.dtype
    t_c1 = _iota((c, 1), 0)
    for i in range(C // c):
        b_cK, k_sub_cK, k_in_CK, b_ref_1K = _query_block(load, k_CK, b_CK, i, c)
        do_cV = load("do", i * c, c)
        dA_cC = _masked(_dot(do_cV, v_CV, (1, 1)), doc, "same", i * c, c)
        dq_cK = jnp.zeros(b_cK.shape, F32)
        if k_in_CK is not None:
            dA_k_cK = _dot(dA_cC.astype(dtype), k_in_CK.astype(dtype))
            dq_cK = jnp.exp(b_cK - b_ref_1K) * dA_k_cK
        k32_cK = k_sub_cK.astype(F32)

        def diagonal(s, dq_cK, b_cK=b_cK, k32_cK=k32_cK, dA_cC=dA_cC, i=i):
            gate_cK = _gate(b_cK, _row(b_cK, s), t_c1 >= s)
            return dq_cK + _col(dA_cC, i * c + s) * _row(k32_cK, s) * gate_cK

        dq_cK = lax.fori_loop(0, c, diagonal, dq_cK)
        dq_cK += _query_decay(b_cK, doc, i * c) * _dot(do_cV.astype(F32), P_VK)
        store("dq", i * c, dq_cK)
    return _next_state(P_VK, v_CV, k_CK, b_CK, doc)


def dkv_chunk(load, store, dP_VK, doc=None, *, C=CHUNK, c=SUB_CHUNK):
    """The reverse sweep: store dk (float32) and dv for the chunk given dP, the cotangent of
    the state leaving it; return the cotangent of the state entering it."""
    q_CK, b_CK, do_CV = load("q", 0, C), load("b", 0, C), load("do", 0, C)
    dtype = do_CV.dtype
    b_last_1K = _row(b_CK, C - 1)
    cols_cC, s_c1 = _iota((c, C), 1), _iota((c, 1), 0)
    for j in range(C // c):
        k_cK, v_cV, b_cK = load("k", j * c, c), load("v", j * c, c), load("b", j * c, c)
        q32_cK = load("q", j * c, c).astype(F32)
        k32_cK = k_cK.astype(F32)
        # Queries after the sub-chunk, split at its last row r.
        dAt_cC = _masked(_dot(v_cV, do_CV, (1, 1)), doc, "same", j * c, c)
        At_cC, dk_cK = jnp.zeros((c, C), F32), jnp.zeros(k_cK.shape, F32)
        if j < C // c - 1:
            b_ref_1K = _row(b_cK, c - 1)
            q_out_CK = _later_queries(q_CK, b_CK, b_ref_1K, (j + 1) * c).astype(dtype)
            k_ref_cK = jnp.exp(b_ref_1K - b_cK)
            At_cC = _dot((k32_cK * k_ref_cK).astype(dtype), q_out_CK, (1, 1))
            dk_cK = k_ref_cK * _dot(dAt_cC.astype(dtype), q_out_CK)

        def diagonal(t, carry, b_cK=b_cK, q32_cK=q32_cK, k32_cK=k32_cK, dAt_cC=dAt_cC, j=j):
            At_cC, dk_cK = carry
            b_t_1K, q_t_1K = _row(b_cK, t), _row(q32_cK, t)
            gate_cK = _gate(b_t_1K, b_cK, s_c1 <= t)
            a_c1 = jnp.sum(k32_cK * q_t_1K * gate_cK, axis=1, keepdims=True)
            At_cC = jnp.where(cols_cC == j * c + t, a_c1, At_cC)
            return At_cC, dk_cK + _col(dAt_cC, j * c + t) * q_t_1K * gate_cK

        At_cC, dk_cK = lax.fori_loop(0, c, diagonal, (At_cC, dk_cK))
        At_cC = _masked(At_cC, doc, "same", j * c, c)
        k_decay_cK = _key_decay(b_last_1K, b_cK, doc, j * c)
        dv_cV = _dot(At_cC.astype(dtype), do_CV) + _dot(k32_cK * k_decay_cK, dP_VK, (1, 1))
        dk_cK += k_decay_cK * _dot(v_cV.astype(F32), dP_VK)
        store("dk", j * c, dk_cK)
        store("dv", j * c, dv_cV)
    q_in_CK = q_CK.astype(F32) * _query_decay(b_CK, doc, 0)
    return dP_VK * _state_decay(b_last_1K, doc) + _dot(do_CV.astype(F32), q_in_CK, (0, 0))
