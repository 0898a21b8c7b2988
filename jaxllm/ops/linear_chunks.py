"""The chunk machinery shared by the linear recurrences S_t = a_t ⊙ S_{t−1} + k_tᵀ v_t,
o_t = q_t S_t (`lightning_attention`: a_t = λ per head; `gated_linear_attention`:
a_t = exp(g_t) per key channel; both with packed rows).

The chunked forms cut T into chunks of C tokens (the tail zero-padded), group the chunks into
segments scanned with remat (`scan_segments`), and inside a segment do every chunk's
intra-chunk part at once; only the inter-chunk state S_{n+1} = a_n S_n + M_n is sequential
(`inter_chunk`). Shapes: q, k [B, T, H, K], v [B, T, H, V], states [B, H, K, V] float32.
Beside it, what both ops do around their Pallas kernels: the choice by impl and platform
(`run_impl`) and the per-device `shard_map` on a mesh (`kernel_per_device`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxllm.parallel.core.axes import BATCH_AXES, HEAD_AXES
from jaxllm.parallel.core.per_device import per_device


def check_values_and_state(q, v, initial_state):
    """v must be [B, T, H, V] on q's [B, T, H]; initial_state [B, H, K, V] or None."""
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, V] matching q's [B, T, H], got {v.shape}")
    B, _, H, K = q.shape
    V = v.shape[-1]
    if initial_state is not None and initial_state.shape != (B, H, K, V):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = {(B, H, K, V)}, got {initial_state.shape}"
        )


def initial_state_BHKV(initial_state, B, H, K, V):
    """The state before the first token as float32 [B, H, K, V] (zeros when None)."""
    if initial_state is None:
        return jnp.zeros((B, H, K, V), jnp.float32)
    return initial_state.astype(jnp.float32)


def finish(o_BTHV, dtype, state_BHKV, return_final_state):
    """o in the inputs' dtype, with the final state when asked for."""
    o_BTHV = o_BTHV.astype(dtype)
    return (o_BTHV, state_BHKV) if return_final_state else o_BTHV


def chunk_tokens(chunk_size, default, T):
    """Tokens per chunk: chunk_size (default when None), at most T (a longer chunk is only
    padding), at least 1."""
    C = default if chunk_size is None else int(chunk_size)
    if C < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    return max(1, min(C, T))


def document_starts(segment_ids_BT):
    """[B, T] ids → [B, T] bool: token t starts a new document (t > 0 and the id changes)."""
    return jnp.pad(segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1], ((0, 0), (1, 0)))


def _chunks(x, n_seg, G, C):
    """[B, T, H, X] → [n_seg, B, G, C, H, X] float32, zero-padding the tail."""
    B, T = x.shape[:2]
    x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n_seg * G * C - T), (0, 0), (0, 0)))
    return jnp.moveaxis(x.reshape(B, n_seg, G, C, *x.shape[2:]), 1, 0)


def scan_segments(body, S0_BHKV, xs_BTHX, C, segment_tokens):
    """Run `body` over chunks of C tokens, G chunks (a segment) at a time. Returns
    (final state, o [B, T, H, V] float32).

    body(S_BHKV, xs_BGCHX, L_G) → (S after the G chunks, o [B, G, C, H, V]), with xs_BGCHX
    the arrays of xs_BTHX cut into chunks (float32, zero-padded tail) and L_G each chunk's
    count of real tokens (C, except in the padded tail). G = segment_tokens // C. With more
    than one segment the scan body is rematerialized, so the backward keeps only each
    segment's inputs and incoming state and the memory stays linear in T.
    """
    B, T, H = xs_BTHX[0].shape[:3]
    N = -(-T // C)
    G = max(1, min(N, segment_tokens // C))
    n_seg = -(-N // G)
    L_SG = np.clip(T - C * np.arange(n_seg * G), 0, C).reshape(n_seg, G)

    def step(S_BHKV, xs):
        return body(S_BHKV, xs[:-1], xs[-1])

    xs = (*(_chunks(x, n_seg, G, C) for x in xs_BTHX), L_SG)
    if n_seg == 1:
        # One segment: remat would only recompute the forward without saving memory.
        S_BHKV, o_BGCHV = step(S0_BHKV, jax.tree.map(lambda x: x[0], xs))
        o_SBGCHV = o_BGCHV[None]
    else:
        S_BHKV, o_SBGCHV = lax.scan(jax.checkpoint(step), S0_BHKV, xs)
    o_BTHV = jnp.moveaxis(o_SBGCHV, 0, 1).reshape(B, n_seg * G * C, H, o_SBGCHV.shape[-1])
    return S_BHKV, o_BTHV[:, :T]


def causal_decay_HCS(g_H, C):
    """[H, C, C]: λ^{j−i} for i ≤ j inside a chunk, 0 above the diagonal (g_H = log λ)."""
    j = np.arange(C)
    dist_CS = j[:, None] - j[None, :]
    return jnp.where(dist_CS >= 0, jnp.exp(g_H[:, None, None] * np.maximum(dist_CS, 0)), 0.0)


def key_decay_NCH(g_H, L_N, C):
    """[N, C, H]: λ^{L_n−1−i}, key i's decay to the end of chunk n of L_n real tokens (padded
    keys are zero, so clamping their negative exponents to 0 changes nothing)."""
    k_power_NC = jnp.maximum(L_N[:, None] - 1 - np.arange(C)[None, :], 0)
    return jnp.exp(g_H * k_power_NC[..., None])


def query_decay_CH(g_H, C):
    """[C, H]: λ^{j+1}, the incoming state's decay to token j of a chunk."""
    return jnp.exp(g_H * (np.arange(C)[:, None] + 1))


def inter_chunk(S_BHKV, a_NBHKV, M_BNHKV, q_in_BNCHK):
    """S_{n+1} = a_n ⊙ S_n + M_n over N chunks, then every query's read of its chunk's
    incoming state. a_NBHKV broadcasts to [N, B, H, K, V]; q_in is q already decayed (and
    masked) for the state. Returns (S_N [B, H, K, V], Σ_K q_in S_n [B, N, C, H, V])."""

    def carry(S_BHKV, a_M):
        a_BHKV, M_BHKV = a_M
        return a_BHKV * S_BHKV + M_BHKV, S_BHKV

    S_BHKV, S_NBHKV = lax.scan(carry, S_BHKV, (a_NBHKV, jnp.moveaxis(M_BNHKV, 1, 0)))
    return S_BHKV, jnp.einsum("BNCHK,NBHKV->BNCHV", q_in_BNCHK, S_NBHKV)


def kernel_per_device(fn, q, k, v, decay, S0_BHKV, segment_ids=None):
    """fn(q, k, v, decay, S0[, segment_ids]) → (o, S), a Pallas call, once per device; decay is
    a per-head log decay [H] (lightning) or per-token log gates [B, T, H, K] (GLA).

    XLA cannot partition a Mosaic (or Triton) custom call, so when a mesh is active (under
    `use_rules`) fn runs inside a `shard_map` over the axes no enclosing one has made manual
    (`map_mesh`: all of them at the top level; inside the FP8 all-reduce's per-replica map,
    all but `data`): batch rows split over the token axes, heads over `tensor` (rows and heads
    are independent; each split only where it divides the dim). Where no axis of size > 1 is
    left automatic (no mesh, or inside sequence parallelism's map) fn is called as it is.
    """
    args = (q, k, v, decay, S0_BHKV) + (() if segment_ids is None else (segment_ids,))
    dm = per_device()
    if dm is None or not dm.kernel_needs_map:
        return fn(*args)
    b = dm.axes(BATCH_AXES, q.shape[0])
    h = dm.axes(HEAD_AXES, q.shape[2])
    x, s = P(b, None, h, None), P(b, h, None, None)
    decay_spec = P(h) if decay.ndim == 1 else x
    specs = (x, x, x, decay_spec, s, P(b, None))[: len(args)]
    return dm(fn, in_specs=specs, out_specs=(x, s))(*args)


def run_impl(impl, xla, pallas, args, gpu_available):
    """xla(*args) or pallas(*args) by impl; "auto" takes the kernel where the computation is
    lowered for TPU, or for CUDA when the op's GPU kernel imports (`gpu_available()`, its
    kernel package's, asked only for "auto"), and xla elsewhere."""
    if impl == "xla":
        return xla(*args)
    if impl == "pallas":
        return pallas(*args)
    # platform_dependent lowers only the branch of the platform being compiled for.
    gpu = pallas if gpu_available() else xla
    return lax.platform_dependent(*args, tpu=pallas, cuda=gpu, default=xla)
