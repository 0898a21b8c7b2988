"""Lightning attention: causal linear attention with a constant per-head decay (TNL's core).

Per batch element and head, with λ = exp(log_decay) and no 1/√K scaling:

    S_t = λ S_{t−1} + k_tᵀ v_t,    o_t = q_t S_t,    S_{−1} = initial_state (zeros when None),

so from a zero state o_t = Σ_{s≤t} λ^{t−s} (q_t·k_s) v_s; the current token enters undecayed.
Shapes: q, k [B, T, H, K], v [B, T, H, V], log_decay [H] (≤ 0, finite), states [B, H, K, V]
float32.

Three ways to compute it, equal in exact arithmetic:
- `lightning_attention_reference`: the quadratic masked form O = [(QKᵀ) ⊙ M] V, M_ts = λ^{t−s}.
- `lightning_attention_recurrent`: a `lax.scan` of `lightning_attention_step` over tokens.
- the chunked form of Lightning Attention-2 (`impl="xla"`): quadratic inside chunks of C
  tokens, a float32 state carried from chunk to chunk, so time and memory are linear in T.
- the same algorithm as Pallas kernels (`impl="pallas"`, `kernels_pallas.lightning_attention`):
  Mosaic on TPU, Triton on GPU, interpret mode on the CPU. `impl="auto"` takes the kernel where
  the computation is lowered for TPU (or for CUDA when the GPU kernel imports) and the XLA form
  otherwise; the choice follows the lowering platform, so an ahead-of-time compile for TPU
  from a CPU host gets the kernel. Every path differentiates log_decay (a learned decay, as
  LCSM's, trains the same on every platform).
  On a mesh (under `jaxllm.parallel.core.rules.use_rules`) the kernel runs inside a `shard_map`
  (`linear_chunks.kernel_per_device`: XLA cannot partition a Mosaic or Triton call), batch
  rows split over the token axes and heads over `tensor`; `lightning_attention_packed` shares
  it.

Every decay factor is λ^j with j ≥ 0, computed as exp(j·log λ); nothing is ever factored as
k·λ^{−j}, which overflows for strong decay. The official TNL slopes give λ_h = exp(−s_h);
fla's `chunk_lightning_attn` uses another per-layer schedule, so callers pass log_decay.
"""

import jax.numpy as jnp
from jax import lax

import kernels_pallas.lightning_attention as kernel
from jaxllm.ops.linear_chunks import (
    causal_decay_HCS,
    check_values_and_state,
    chunk_tokens,
    finish,
    initial_state_BHKV,
    inter_chunk,
    kernel_per_device,
    key_decay_NCH,
    query_decay_CH,
    run_impl,
    scan_segments,
)

IMPLS = ("reference", "xla", "pallas", "auto")
# Measured fwd+bwd on an H100 (B2 H16 K=V=128, bf16 in, T 8K/32K): C=128 is 1.3x faster than
# C=64 at equal memory. Segments of 2048 tokens with remat use 0.55x the memory of one
# unsegmented pass without remat (3.4 vs 6.1 GiB at 32K) for 1.6x the time.
DEFAULT_CHUNK_SIZE = 128
# Tokens per step of the scan over segments (rounded down to a multiple of the chunk size).
SEGMENT_TOKENS = 2048


def _log_decay_H(log_decay, H):
    """The per-head log decay as float32 [H]; None means no decay (λ = 1)."""
    if log_decay is None:
        return jnp.zeros((H,), jnp.float32)
    log_decay = jnp.asarray(log_decay, jnp.float32)
    if log_decay.shape != (H,):
        raise ValueError(f"log_decay must have shape [H] = ({H},), got {log_decay.shape}")
    return log_decay


def _check_shapes(q, k, v, initial_state):
    if q.ndim != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {q.shape} and {k.shape}")
    check_values_and_state(q, v, initial_state)


def lightning_attention_step(q_t, k_t, v_t, state, log_decay=None):
    """One decoding step: S ← λ S + k_tᵀ v_t, then o_t = q_t S.

    Args:
      q_t, k_t: [B, H, K].  v_t: [B, H, V].  state: [B, H, K, V] float32.
      log_decay: [H] (≤ 0), or None for no decay.

    Returns:
      (o_t [B, H, V] in q_t's dtype, new_state [B, H, K, V] float32).
    """
    lam_H = jnp.exp(_log_decay_H(log_decay, q_t.shape[1]))
    q, k, v = (x.astype(jnp.float32) for x in (q_t, k_t, v_t))
    state_BHKV = lam_H[None, :, None, None] * state.astype(jnp.float32)
    state_BHKV = state_BHKV + jnp.einsum("BHK,BHV->BHKV", k, v)
    o_BHV = jnp.einsum("BHK,BHKV->BHV", q, state_BHKV)
    return o_BHV.astype(q_t.dtype), state_BHKV


def lightning_attention_reference(
    q, k, v, log_decay=None, *, initial_state=None, return_final_state=False
):
    """The quadratic masked form in float32: o_t = Σ_{s≤t} λ^{t−s}(q_t·k_s) v_s + λ^{t+1} q_t S₀.

    Arguments and return value as `lightning_attention`. O(T²) time and memory: for tests.
    """
    _check_shapes(q, k, v, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    g_H = _log_decay_H(log_decay, H)
    q32, k32, v32 = (x.astype(jnp.float32) for x in (q, k, v))
    t = jnp.arange(T)
    dist_TS = t[:, None] - t[None, :]
    # Clamp before exp: the masked upper triangle would otherwise be exp(positive).
    mask_HTS = jnp.where(dist_TS >= 0, jnp.exp(g_H[:, None, None] * jnp.maximum(dist_TS, 0)), 0.0)
    scores_BHTS = jnp.einsum("BTHK,BSHK->BHTS", q32, k32) * mask_HTS
    o_BTHV = jnp.einsum("BHTS,BSHV->BTHV", scores_BHTS, v32)
    S0_BHKV = initial_state_BHKV(initial_state, B, H, K, V)
    q_decay_TH = jnp.exp(g_H[None, :] * (t[:, None] + 1))
    o_BTHV += jnp.einsum("BTHK,BHKV->BTHV", q32 * q_decay_TH[None, :, :, None], S0_BHKV)
    k_decay_TH = jnp.exp(g_H[None, :] * (T - 1 - t[:, None]))
    state_BHKV = jnp.exp(g_H * T)[None, :, None, None] * S0_BHKV
    state_BHKV += jnp.einsum("BTHK,BTHV->BHKV", k32 * k_decay_TH[None, :, :, None], v32)
    return finish(o_BTHV, q.dtype, state_BHKV, return_final_state)


def lightning_attention_recurrent(
    q, k, v, log_decay=None, *, initial_state=None, return_final_state=False
):
    """The token-by-token recurrence (`lax.scan` of `lightning_attention_step`), in float32.

    Arguments and return value as `lightning_attention`.
    """
    _check_shapes(q, k, v, initial_state)
    B, _, H, K = q.shape
    V = v.shape[-1]
    g_H = _log_decay_H(log_decay, H)

    def step(state_BHKV, qkv_t):
        o_BHV, state_BHKV = lightning_attention_step(*qkv_t, state_BHKV, g_H)
        return state_BHKV, o_BHV

    qkv_T = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v))
    state_BHKV, o_TBHV = lax.scan(step, initial_state_BHKV(initial_state, B, H, K, V), qkv_T)
    return finish(jnp.moveaxis(o_TBHV, 0, 1), q.dtype, state_BHKV, return_final_state)


def _segment(S_BHKV, q_BNCHK, k_BNCHK, v_BNCHV, L_N, g_H):
    """N consecutive chunks of C tokens from state S: returns (S after them, o [B, N, C, H, V]).

    With j the index inside chunk n, S_n its incoming state and L_n its count of real tokens
    (C, except in a padded tail, whose state must not decay over the padding):
      o_j = Σ_{i≤j} λ^{j−i}(q_j·k_i) v_i  +  λ^{j+1} q_j S_n,
      S_{n+1} = λ^{L_n} S_n + Σ_i λ^{L_n−1−i} k_iᵀ v_i.
    The quadratic parts and the per-chunk sums run for all N chunks at once; only
    S_{n+1} = a_n S_n + M_n is sequential, a scan of N small steps.
    """
    C = q_BNCHK.shape[2]
    scores_BNHCS = jnp.einsum("BNCHK,BNSHK->BNHCS", q_BNCHK, k_BNCHK) * causal_decay_HCS(g_H, C)
    o_BNCHV = jnp.einsum("BNHCS,BNSHV->BNCHV", scores_BNHCS, v_BNCHV)
    k_out_BNCHK = k_BNCHK * key_decay_NCH(g_H, L_N, C)[..., None]
    M_BNHKV = jnp.einsum("BNCHK,BNCHV->BNHKV", k_out_BNCHK, v_BNCHV)
    a_NBHKV = jnp.exp(g_H * L_N[:, None])[:, None, :, None, None]
    q_in_BNCHK = q_BNCHK * query_decay_CH(g_H, C)[..., None]
    S_BHKV, o_in_BNCHV = inter_chunk(S_BHKV, a_NBHKV, M_BNHKV, q_in_BNCHK)
    return S_BHKV, o_BNCHV + o_in_BNCHV


def _chunked(q, k, v, g_H, S0_BHKV, C):
    """Lightning Attention-2 in XLA, float32. Returns (o [B, T, H, V], final state): chunks of
    C tokens, SEGMENT_TOKENS at a time (`linear_chunks.scan_segments`)."""

    def body(S_BHKV, xs, L_G):
        return _segment(S_BHKV, *xs, L_G, g_H)

    S_BHKV, o_BTHV = scan_segments(body, S0_BHKV, (q, k, v), C, SEGMENT_TOKENS)
    return o_BTHV, S_BHKV


def lightning_attention(
    q,
    k,
    v,
    log_decay=None,
    *,
    initial_state=None,
    return_final_state=False,
    chunk_size=None,
    impl="auto",
):
    """Causal linear attention with a per-head decay: S_t = λ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t.

    No 1/√K scaling is applied (scale q yourself if you want it).

    Args:
      q, k: [B, T, H, K].  v: [B, T, H, V].
      log_decay: [H], log λ ≤ 0 per head; None for no decay (plain causal linear attention).
      initial_state: [B, H, K, V], the state before the first token (zeros when None).
      return_final_state: also return the state after the last token.
      chunk_size: tokens per chunk for impl="xla" (default 128); any T works. The kernel
        takes its block sizes from its per-chip table instead.
      impl: "reference" (quadratic, O(T²)), "xla" (chunked, O(T)), "pallas" (the Pallas
        kernel; interpreted on the CPU), or "auto" (the kernel on TPU and GPU, else "xla").

    Returns:
      o [B, T, H, V] in q's dtype, or (o, final_state [B, H, K, V] float32) when
      return_final_state.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return lightning_attention_reference(
            q,
            k,
            v,
            log_decay,
            initial_state=initial_state,
            return_final_state=return_final_state,
        )
    _check_shapes(q, k, v, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_tokens(chunk_size, DEFAULT_CHUNK_SIZE, T)
    g_H = _log_decay_H(log_decay, H)

    def xla(q, k, v, g_H, S0_BHKV):
        o_BTHV, state_BHKV = _chunked(q, k, v, g_H, S0_BHKV, C)
        return o_BTHV.astype(q.dtype), state_BHKV

    def pallas(*args):
        def run(q, k, v, g_H, S0_BHKV):
            return kernel.lightning_attention(
                q, k, v, g_H, initial_state=S0_BHKV, return_final_state=True
            )

        return kernel_per_device(run, *args)

    args = (q, k, v, g_H, initial_state_BHKV(initial_state, B, H, K, V))
    o_BTHV, state_BHKV = run_impl(impl, xla, pallas, args, kernel.gpu_available)
    return finish(o_BTHV, q.dtype, state_BHKV, return_final_state)
