"""Gated linear attention: a per-channel, data-dependent decay of the state (HGRN2's core).

Per batch element and head, with no 1/√K scaling:

    S_t = diag(exp(g_t)) S_{t−1} + k_tᵀ v_t,    o_t = q_t S_t,    S_{−1} = initial_state,

where g_t = log_gate[:, t] ∈ (−∞, 0]^K gates each key channel of the state. Shapes: q, k,
log_gate [B, T, H, K], v [B, T, H, V], states [B, H, K, V] float32. HGRN2 is this with
k = 1 − f, v = the input, log_gate = log f (fla's `chunk_gla` with scale=1).

- `gated_linear_attention_reference`: the token-by-token recurrence (`lax.scan`), float32.
- the chunked form (`impl="xla"`), after fla's chunk GLA: chunks of C tokens exchange a
  float32 state, and inside a chunk every decay factor is exp(Σ g_i) over a range of tokens
  i, the range's own sum: exponents are ≤ 0, so nothing overflows however strong the gates
  (fla #215 is the overflow of the k·exp(−b) factoring), and, unlike fla's exp(b_t − b_s)
  with b a running sum, no small sum is taken as the difference of two large ones, which
  keeps the forward and the gradient of the gates as accurate as the scan's.
- the Pallas kernels (`impl="pallas"`, `kernels_pallas.gated_linear_attention`: Mosaic on TPU,
  Triton on GPU, interpret mode on the CPU; chunks of 64 tokens, fixed). `impl="auto"` takes
  the kernel where the computation is lowered for TPU (an ahead-of-time compile for TPU from a
  CPU host included) or for CUDA (when the GPU kernel imports) and the chunked form elsewhere.
  Every path differentiates the gates and the initial state. On a mesh (under
  `jaxllm.parallel.core.rules.use_rules`) the kernel runs inside a `shard_map`
  (`linear_chunks.kernel_per_device`), batch rows over the token axes, heads over `tensor`.

Packed rows (`segment_ids_BT` [B, T]): the state is reset where the id changes, r_t = 1 when
t > 0 and seg_t ≠ seg_{t−1}, S_t = (1 − r_t) diag(exp(g_t)) S_{t−1} + k_tᵀ v_t, exactly (as
fla's varlen `cu_seqlens`): the scan zeroes the state, the kernel masks by document; the
chunked form multiplies each decay factor by "no reset in its range" — pairs (t, s) of
different documents are masked, the state entering a chunk reaches only the chunk's first
document, the state leaving it is built only from its last document, and a chunk holding a
reset passes no carried state on. The gates stay finite, so there is no ∞ − ∞ and the gate of
a document's first token gets no gradient. The initial state continues the row's first document
(a decode prefix continues its document).
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

import kernels_pallas.gated_linear_attention as kernel
from jaxllm.ops.linear_chunks import (
    check_values_and_state,
    chunk_tokens,
    document_starts,
    finish,
    initial_state_BHKV,
    inter_chunk,
    kernel_per_device,
    run_impl,
    scan_segments,
)

IMPLS = ("reference", "xla", "pallas", "auto")
# Tokens per chunk of impl="xla" (the kernel's chunk is its own, 64).
DEFAULT_CHUNK_SIZE = 64
# Inside a chunk, the pairs of tokens in the same sub-chunk need a [c, c, K] tensor of gate
# products (no matmul can factor them stably); pairs across sub-chunks are matmuls.
SUB_CHUNK_SIZE = 16
# Tokens per step of the scan over segments (rounded down to a multiple of the chunk size).
# Chosen on an H100 (fwd+bwd, B2 H16 K=V=128, bf16 in, T=32K): one unsegmented pass without
# remat took 23.7 GiB of XLA temp memory and 82 ms, segments of 1024 with remat ~4 GiB and
# ~115 ms. benchmarks/linear_attention.py: 1.45 µs/token from 4K to 64K tokens.
SEGMENT_TOKENS = 1024


def _check_shapes(q, k, v, log_gate, initial_state, segment_ids_BT=None):
    if q.ndim != 4 or q.shape != k.shape or q.shape != log_gate.shape:
        raise ValueError(
            "q, k and log_gate must all be [B, T, H, K], got "
            f"{q.shape}, {k.shape} and {log_gate.shape}"
        )
    check_values_and_state(q, v, initial_state)
    if segment_ids_BT is not None and segment_ids_BT.shape != q.shape[:2]:
        raise ValueError(
            f"segment_ids_BT must be [B, T] = {q.shape[:2]}, got {segment_ids_BT.shape}"
        )


def gated_linear_attention_step(q_t, k_t, v_t, g_t, state):
    """One decoding step: S ← diag(exp(g_t)) S + k_tᵀ v_t, then o_t = q_t S.

    Args:
      q_t, k_t, g_t: [B, H, K] (g_t = log gate ≤ 0).  v_t: [B, H, V].
      state: [B, H, K, V] float32.

    Returns:
      (o_t [B, H, V] in q_t's dtype, new_state [B, H, K, V] float32).
    """
    q, k, v, g = (x.astype(jnp.float32) for x in (q_t, k_t, v_t, g_t))
    state_BHKV = jnp.exp(g)[..., None] * state.astype(jnp.float32)
    state_BHKV = state_BHKV + jnp.einsum("BHK,BHV->BHKV", k, v)
    o_BHV = jnp.einsum("BHK,BHKV->BHV", q, state_BHKV)
    return o_BHV.astype(q_t.dtype), state_BHKV


def gated_linear_attention_reference(
    q, k, v, log_gate, *, segment_ids_BT=None, initial_state=None, return_final_state=False
):
    """The recurrence S_t = (1 − r_t) diag(exp(g_t)) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t as a
    float32 scan (r_t = 1 where a packed document starts, 0 without segment ids).

    Arguments and return value as `gated_linear_attention`.
    """
    _check_shapes(q, k, v, log_gate, initial_state, segment_ids_BT)
    B, T, H, K = q.shape
    V = v.shape[-1]

    def step(state_BHKV, xs):
        q_t, k_t, v_t, g_t, start_B = xs
        state_BHKV = jnp.where(start_B[:, None, None, None], 0.0, state_BHKV)
        o_BHV, state_BHKV = gated_linear_attention_step(q_t, k_t, v_t, g_t, state_BHKV)
        return state_BHKV, o_BHV

    qkvg_T = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, log_gate))
    if segment_ids_BT is None:
        start_TB = jnp.zeros((T, B), bool)
    else:
        start_TB = document_starts(segment_ids_BT).T
    state_BHKV, o_TBHV = lax.scan(
        step, initial_state_BHKV(initial_state, B, H, K, V), (*qkvg_T, start_TB)
    )
    return finish(jnp.moveaxis(o_TBHV, 0, 1), q.dtype, state_BHKV, return_final_state)


def _sum_after(g, axis):
    """Σ_{i > s} g_i along `axis` (exclusive suffix sums), for every s."""
    zero = jnp.zeros_like(lax.slice_in_dim(g, 0, 1, axis=axis))
    return lax.cumsum(
        jnp.concatenate([lax.slice_in_dim(g, 1, None, axis=axis), zero], axis), axis, reverse=True
    )


def _intra_chunk(q_XCHK, k_XCHK, v_XCHV, g_XCHK, c, doc_XC=None):
    """Σ_{s≤t in the chunk} (Σ_K q_t k_s exp(Σ_{s<i≤t} g_i)) v_s for chunks of C = I·c tokens;
    with doc_XC [X, C] (document index within the chunk), only pairs of the same document.

    X is any leading shape. For query sub-chunk i and s in an earlier sub-chunk j, the sum
    splits at the sub-chunk boundary into (gates from the start of sub-chunk i up to t) +
    (gates after s up to the end of sub-chunk i − 1), so exp factors into two terms ≤ 1 and
    the cross-sub-chunk pairs are one matmul. Pairs inside a sub-chunk take the gate sums
    elementwise ([c, c, K]). Every exponent is a sum of gates over its own range, never a
    difference of cumulative sums: that would lose the small sums next to large ones and
    leave +x − x cancellations in the gradient of the gates. Pairs of different documents
    are masked on the scores: their factors are finite (gates are never −∞), so the mask
    zeroes their value and gradient alike.
    """
    *X, C, H, K = q_XCHK.shape
    V = v_XCHV.shape[-1]
    n_I = C // c
    axis_c = len(X) + 1

    def sub(x):
        return x.reshape(*X, n_I, c, H, x.shape[-1])

    q_XICHK, k_XICHK, v_XICHV, g_XICHK = sub(q_XCHK), sub(k_XCHK), sub(v_XCHV), sub(g_XCHK)

    # Across sub-chunks: queries of sub-chunk i against keys of sub-chunks j < i.
    upto_XICHK = jnp.cumsum(g_XICHK, axis=axis_c)
    after_XJCHK = _sum_after(g_XICHK, axis_c)
    total_XJHK = upto_XICHK[..., -1, :, :]
    # between[i, j] = Σ_{j<m<i} total_m, an exclusive cumulative sum over m of the totals
    # with m > j (a 0/1 matmul would lose precision at default TPU/GPU matmul precision).
    later_IJ = np.arange(n_I)[:, None] > np.arange(n_I)[None, :]
    later_XMJHK = jnp.where(later_IJ[:, :, None, None], total_XJHK[..., :, None, :, :], 0.0)
    shifted_XMJHK = jnp.concatenate(
        [jnp.zeros_like(later_XMJHK[..., :1, :, :, :]), later_XMJHK[..., :-1, :, :, :]], axis=len(X)
    )
    between_XIJHK = jnp.cumsum(shifted_XMJHK, axis=len(X))
    exponent_XIJCHK = between_XIJHK[..., None, :, :] + after_XJCHK[..., None, :, :, :, :]
    k_off_XIJCHK = jnp.where(
        later_IJ[:, :, None, None, None],
        k_XICHK[..., None, :, :, :, :] * jnp.exp(exponent_XIJCHK),
        0.0,
    )
    k_off_XISHK = k_off_XIJCHK.reshape(*X, n_I, C, H, K)
    q_off_XICHK = q_XICHK * jnp.exp(upto_XICHK)
    scores_XHICS = jnp.einsum("...ICHK,...ISHK->...HICS", q_off_XICHK, k_off_XISHK)
    if doc_XC is not None:
        doc_XIC = doc_XC.reshape(*X, n_I, c)
        same_XICS = doc_XIC[..., :, :, None] == doc_XC[..., None, None, :]
        scores_XHICS = jnp.where(same_XICS[..., None, :, :, :], scores_XHICS, 0.0)
    o_XICHV = jnp.einsum("...HICS,...SHV->...ICHV", scores_XHICS, v_XCHV)

    # Inside a sub-chunk: sum_ts = Σ_{s<i≤t} g_i, a cumulative sum over i of g_i·[i > s].
    above_TS = np.arange(c)[:, None] > np.arange(c)[None, :]
    g_after_XITSHK = jnp.where(above_TS[:, :, None, None], g_XICHK[..., :, None, :, :], 0.0)
    sum_XITSHK = jnp.cumsum(g_after_XITSHK, axis=axis_c)
    causal_TS = np.tril(np.ones((c, c), bool))
    gates_XITSHK = jnp.where(causal_TS[:, :, None, None], jnp.exp(sum_XITSHK), 0.0)
    scores_XHITS = jnp.einsum("...ITHK,...ISHK,...ITSHK->...HITS", q_XICHK, k_XICHK, gates_XITSHK)
    if doc_XC is not None:
        same_XITS = doc_XIC[..., :, :, None] == doc_XIC[..., :, None, :]
        scores_XHITS = jnp.where(same_XITS[..., None, :, :, :], scores_XHITS, 0.0)
    o_XICHV += jnp.einsum("...HITS,...ISHV->...ITHV", scores_XHITS, v_XICHV)
    return o_XICHV.reshape(*X, C, H, V)


def _segment(S_BHKV, q_BNCHK, k_BNCHK, v_BNCHV, g_BNCHK, c, start_BNC=None):
    """N consecutive chunks from state S: returns (S after them, o [B, N, C, H, V]).

    With S_n the state entering chunk n and sums of gates inside the chunk:
      o_t = intra(t) + (q_t ⊙ exp(Σ_{i≤t} g_i)) S_n,
      S_{n+1} = diag(exp(Σ_i g_i)) S_n + Σ_s (k_s ⊙ exp(Σ_{i>s} g_i))ᵀ v_s,
    every exponent a sum of gates, so ≤ 0. The intra-chunk parts and the per-chunk sums run
    for all N chunks at once; only S_{n+1} = a_n S_n + M_n is sequential, N small steps.

    start_BNC (packed rows, float 0/1 document starts): each factor also needs no reset in its
    range, told by the count of resets so far in the chunk: S_n reaches the tokens before the
    first reset, M_n takes the keys after the last one, and a_n is 0 if the chunk has one.
    """
    upto_BNCHK = jnp.cumsum(g_BNCHK, axis=2)
    doc_BNC = None if start_BNC is None else jnp.cumsum(start_BNC, axis=2)
    o_BNCHV = _intra_chunk(q_BNCHK, k_BNCHK, v_BNCHV, g_BNCHK, c, doc_BNC)

    k_out_BNCHK = k_BNCHK * jnp.exp(_sum_after(g_BNCHK, 2))
    q_in_BNCHK = q_BNCHK * jnp.exp(upto_BNCHK)
    a_BNHK = jnp.exp(upto_BNCHK[:, :, -1])
    if doc_BNC is not None:
        last_BNC = doc_BNC == doc_BNC[:, :, -1:]
        k_out_BNCHK = jnp.where(last_BNC[..., None, None], k_out_BNCHK, 0.0)
        q_in_BNCHK = jnp.where((doc_BNC == 0)[..., None, None], q_in_BNCHK, 0.0)
        a_BNHK = jnp.where((doc_BNC[:, :, -1] == 0)[..., None, None], a_BNHK, 0.0)
    M_BNHKV = jnp.einsum("BNCHK,BNCHV->BNHKV", k_out_BNCHK, v_BNCHV)
    a_NBHKV = jnp.moveaxis(a_BNHK, 1, 0)[..., None]
    S_BHKV, o_in_BNCHV = inter_chunk(S_BHKV, a_NBHKV, M_BNHKV, q_in_BNCHK)
    return S_BHKV, o_BNCHV + o_in_BNCHV


def _chunked(q, k, v, g, S0_BHKV, C, c, start_BT=None):
    """Chunked GLA in XLA, float32. Returns (o [B, T, H, V], final state [B, H, K, V]).

    Chunks of C tokens, SEGMENT_TOKENS at a time (`linear_chunks.scan_segments`, whose remat
    keeps only each segment's inputs and incoming state, not its [c, c, K] gate products).
    The tail is padded with zero q, k, v, zero log gates (no decay) and no document start, so
    the final state is exact. start_BT [B, T] bool: packed rows' document starts.
    """

    def body(S_BHKV, xs, _L_G):
        return _segment(S_BHKV, *xs[:4], c, None if start_BT is None else xs[4][..., 0, 0])

    xs_BTHX = (q, k, v, g) if start_BT is None else (q, k, v, g, start_BT[:, :, None, None])
    S_BHKV, o_BTHV = scan_segments(body, S0_BHKV, xs_BTHX, C, SEGMENT_TOKENS)
    return o_BTHV, S_BHKV


def gated_linear_attention(
    q,
    k,
    v,
    log_gate,
    *,
    segment_ids_BT=None,
    initial_state=None,
    return_final_state=False,
    chunk_size=None,
    impl="auto",
):
    """Gated linear attention: S_t = diag(exp(g_t)) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t.

    No 1/√K scaling is applied (scale q yourself if you want it).

    Args:
      q, k: [B, T, H, K].  v: [B, T, H, V].
      log_gate: [B, T, H, K], the log of the per-channel forget gate, ≤ 0 (e.g. logsigmoid).
      segment_ids_BT: [B, T] or None, packed documents: the state is reset exactly where the
        id changes; the initial state continues the first document, the final state is the
        last document's.
      initial_state: [B, H, K, V], the state before the first token (zeros when None).
      return_final_state: also return the state after the last token.
      chunk_size: tokens per chunk for impl="xla" (default 64; above 16 it is rounded up to
        a multiple of 16, the sub-chunk); any T works. The kernel's chunk is fixed (64).
      impl: "reference" (token-by-token scan), "xla" (chunked), "pallas" (the Pallas kernel;
        interpreted on the CPU), or "auto" (the kernel on TPU and GPU, else "xla").

    Returns:
      o [B, T, H, V] in q's dtype, or (o, final_state [B, H, K, V] float32) when
      return_final_state.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return gated_linear_attention_reference(
            q,
            k,
            v,
            log_gate,
            segment_ids_BT=segment_ids_BT,
            initial_state=initial_state,
            return_final_state=return_final_state,
        )
    _check_shapes(q, k, v, log_gate, initial_state, segment_ids_BT)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_tokens(chunk_size, DEFAULT_CHUNK_SIZE, T)
    c = min(C, SUB_CHUNK_SIZE)
    C = -(-C // c) * c

    def xla(q, k, v, g, S0_BHKV, *segment_ids_BT):
        start_BT = document_starts(*segment_ids_BT) if segment_ids_BT else None
        o_BTHV, S_BHKV = _chunked(q, k, v, g, S0_BHKV, C, c, start_BT)
        return o_BTHV.astype(q.dtype), S_BHKV

    def pallas(*args):
        def run(q, k, v, g, S0_BHKV, segment_ids_BT=None):
            return kernel.gated_linear_attention(
                q, k, v, g, initial_state=S0_BHKV, return_final_state=True,
                segment_ids=segment_ids_BT,
            )  # fmt: skip

        return kernel_per_device(run, *args)

    args = (q, k, v, log_gate, initial_state_BHKV(initial_state, B, H, K, V))
    args += () if segment_ids_BT is None else (segment_ids_BT,)
    o_BTHV, S_BHKV = run_impl(impl, xla, pallas, args, kernel.gpu_available)
    return finish(o_BTHV, q.dtype, S_BHKV, return_final_state)
