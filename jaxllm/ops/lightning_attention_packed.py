"""Lightning attention over packed rows: the state is reset wherever the segment id changes.

Per batch row and head, with λ = exp(log_decay), no 1/√K scaling, and r_t = 1 when token t
starts a new document (t > 0 and seg_t ≠ seg_{t−1}):

    S_t = (1 − r_t) λ S_{t−1} + k_tᵀ v_t,    o_t = q_t S_t,    S_{−1} = initial_state,

so no document sees the state of the one before it. The initial state continues into the
row's first document (a decode prefix continues the same document).

- `lightning_attention_packed_reference`: the token-by-token recurrence (`lax.scan`), float32.
- the chunked form (`impl="xla"`): Lightning Attention-2's blocks, with the intra-chunk decay
  matrix multiplied by a same-document mask, a chunk's incoming state read only by the tokens
  of the document it belongs to, and the carried state dropped when a chunk contains a reset.
  Documents are told apart by the count of resets so far (`run_BT`), never by raw ids, so
  rows like 1 1 2 2 0 0 (padding after the last document) are handled. Every decay factor is
  λ^j with j ≥ 0.
- the Pallas kernels with the same masks (`impl="pallas"`, `kernels_pallas.lightning_attention`
  given `segment_ids`: Mosaic on TPU, Triton on GPU, interpret mode on the CPU). `impl="auto"`
  takes the kernel where the computation is lowered for TPU (an ahead-of-time compile for TPU
  from a CPU host included) or for CUDA (when the GPU kernel imports) and the chunked form
  elsewhere. Every path differentiates log_decay. On a mesh (under
  `jaxllm.parallel.core.rules.use_rules`) it runs inside a `shard_map`, as the unpacked op's kernel
  (`jaxllm.ops.linear_chunks.kernel_per_device`).
"""

import jax.numpy as jnp
import numpy as np
from jax import lax

import kernels_pallas.lightning_attention as kernel
from jaxllm.ops.linear_chunks import (
    causal_decay_HCS,
    chunk_tokens,
    finish,
    initial_state_BHKV,
    inter_chunk,
    kernel_per_device,
    key_decay_NCH,
    query_decay_CH,
    run_impl,
)
from kernels_pallas.documents import document_runs

IMPLS = ("reference", "xla", "pallas", "auto")
DEFAULT_CHUNK_SIZE = 64


def _log_decay_H(log_decay, H):
    if log_decay is None:
        return jnp.zeros((H,), jnp.float32)
    return jnp.broadcast_to(jnp.asarray(log_decay, jnp.float32), (H,))


def lightning_attention_packed_reference(
    q, k, v, log_decay, segment_ids, *, initial_state=None, return_final_state=False
):
    """The recurrence with resets, token by token in float32. Arguments as
    `lightning_attention_packed`."""
    B, _T, H, K = q.shape
    V = v.shape[-1]
    lam_H = jnp.exp(_log_decay_H(log_decay, H))
    run_BT = document_runs(segment_ids)
    keep_BT = jnp.concatenate(
        [jnp.ones((B, 1), jnp.float32), (run_BT[:, 1:] == run_BT[:, :-1]).astype(jnp.float32)],
        axis=1,
    )

    def step(S_BHKV, xs):
        q_BHK, k_BHK, v_BHV, keep_B = xs
        S_BHKV = keep_B[:, None, None, None] * lam_H[None, :, None, None] * S_BHKV
        S_BHKV = S_BHKV + jnp.einsum("BHK,BHV->BHKV", k_BHK, v_BHV)
        return S_BHKV, jnp.einsum("BHK,BHKV->BHV", q_BHK, S_BHKV)

    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, keep_BT))
    S_BHKV, o_TBHV = lax.scan(step, initial_state_BHKV(initial_state, B, H, K, V), xs)
    return finish(jnp.moveaxis(o_TBHV, 0, 1), q.dtype, S_BHKV, return_final_state)


def _chunked(q, k, v, g_H, run_BT, S0_BHKV, C):
    """Chunks of C tokens; returns (o [B, T, H, V] float32, final state)."""
    B, T, H, _K = q.shape
    V = v.shape[-1]
    N = -(-T // C)
    pad = N * C - T

    def chunk(x):
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x.reshape(B, N, C, *x.shape[2:])

    q_BNCHK, k_BNCHK, v_BNCHV = chunk(q), chunk(k), chunk(v)
    # Padding repeats the last token's run, so the tail's (zero) keys never cause a reset.
    run_BNC = jnp.pad(run_BT, ((0, 0), (0, pad)), mode="edge").reshape(B, N, C)
    prev_BN = jnp.concatenate([run_BNC[:, :1, 0], run_BNC[:, :-1, -1]], axis=1)
    last_BN = run_BNC[:, :, -1]
    L_N = np.clip(T - C * np.arange(N), 0, C)

    same_BNCS = run_BNC[..., :, None] == run_BNC[..., None, :]
    scores_BNHCS = jnp.einsum("BNCHK,BNSHK->BNHCS", q_BNCHK, k_BNCHK)
    scores_BNHCS = scores_BNHCS * causal_decay_HCS(g_H, C) * same_BNCS[:, :, None]
    o_BNCHV = jnp.einsum("BNHCS,BNSHV->BNCHV", scores_BNHCS, v_BNCHV)

    # What chunk n adds to the state: keys of the chunk's last document, decayed to its end.
    k_keep_BNC = (run_BNC == last_BN[..., None]).astype(jnp.float32)
    k_BNCHK = k_BNCHK * key_decay_NCH(g_H, L_N, C)[None, ..., None] * k_keep_BNC[..., None, None]
    M_BNHKV = jnp.einsum("BNCHK,BNCHV->BNHKV", k_BNCHK, v_BNCHV)
    # The incoming state survives the chunk only if no document starts inside it.
    a_BNH = jnp.exp(g_H * L_N[:, None])[None] * (prev_BN == last_BN)[..., None]
    # Only the tokens of the incoming state's document read it.
    q_keep_BNC = (run_BNC == prev_BN[..., None]).astype(jnp.float32)
    q_BNCHK = q_BNCHK * query_decay_CH(g_H, C)[..., None] * q_keep_BNC[..., None, None]
    a_NBHKV = jnp.moveaxis(a_BNH, 1, 0)[..., None, None]
    S_BHKV, o_in_BNCHV = inter_chunk(S0_BHKV, a_NBHKV, M_BNHKV, q_BNCHK)
    return (o_BNCHV + o_in_BNCHV).reshape(B, N * C, H, V)[:, :T], S_BHKV


def lightning_attention_packed(
    q,
    k,
    v,
    log_decay,
    segment_ids,
    *,
    initial_state=None,
    return_final_state=False,
    chunk_size=None,
    impl="auto",
):
    """Lightning attention whose state is reset at every change of `segment_ids`.

    Args:
      q, k: [B, T, H, K].  v: [B, T, H, V].
      log_decay: [H], log λ ≤ 0 per head; None for no decay.
      segment_ids: [B, T] int, a document id per token (any values; a change = a new document).
      initial_state: [B, H, K, V], the state before the row's first document continues.
      return_final_state: also return the state after the last token.
      chunk_size: tokens per chunk for impl="xla" (default 64); any T works. The kernel takes
        its block sizes from its per-chip table instead.
      impl: "reference" (scan), "xla" (chunked), "pallas" (the kernel; interpreted on the CPU)
        or "auto" (the kernel when lowered for TPU or CUDA, else "xla").

    Returns:
      o [B, T, H, V] in q's dtype, or (o, final_state [B, H, K, V] float32).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [B, T] = {q.shape[:2]}, got {segment_ids.shape}")
    if impl == "reference":
        return lightning_attention_packed_reference(
            q, k, v, log_decay, segment_ids, initial_state=initial_state,
            return_final_state=return_final_state,
        )  # fmt: skip
    B, T, H, K = q.shape
    C = chunk_tokens(chunk_size, DEFAULT_CHUNK_SIZE, T)

    def xla(q, k, v, g_H, S0_BHKV, segment_ids):
        o_BTHV, S_BHKV = _chunked(q, k, v, g_H, document_runs(segment_ids), S0_BHKV, C)
        return o_BTHV.astype(q.dtype), S_BHKV

    def pallas(*args):
        def run(q, k, v, g_H, S0_BHKV, segment_ids):
            return kernel.lightning_attention(
                q, k, v, g_H, initial_state=S0_BHKV, return_final_state=True,
                segment_ids=segment_ids,
            )  # fmt: skip

        return kernel_per_device(run, *args)

    S0_BHKV = initial_state_BHKV(initial_state, B, H, K, v.shape[-1])
    args = (q, k, v, _log_decay_H(log_decay, H), S0_BHKV, segment_ids)
    o_BTHV, S_BHKV = run_impl(impl, xla, pallas, args, kernel.gpu_available)
    return finish(o_BTHV, q.dtype, S_BHKV, return_final_state)
