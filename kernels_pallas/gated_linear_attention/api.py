"""`gated_linear_attention`: the Pallas kernels behind a `custom_vjp`, dispatched by platform.

S_t = diag(exp(g_t)) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t per batch element and head, g_t ≤ 0 a
log gate per key channel, no 1/√K scaling: the function of
`jaxllm.ops.gated_linear_attention` (its oracle) and of fla's `chunk_gla` with scale=1.

The kernel is chosen by the platform the computation is lowered for
(`kernels_pallas.dispatch`): Mosaic (tpu.py) on TPU, Triton (gpu.py) on CUDA, the TPU kernel
in interpret mode elsewhere (the CPU).

Here, outside the kernels: the chunk-local cumulative sums b of the log gates (chunk.py), and
the gates' gradient. Every factor of the forward is exp(B_t − B_s) for the sequence-wide
cumulative sum B (t reads, s writes; the initial state is written before the first token, the
final state read after the last), so

    dL/dB_t = q_t ⊙ dq_t − k_t ⊙ dk_t  (+ Σ_V dS_T ⊙ S_T for the last token),
    dL/dg_t = Σ_{t' ≥ t} dL/dB_{t'},

from the kernels' float32 dq and dk. The terms cancel (each pair of tokens adds +x at the
reader and −x at the writer), so a sum over the whole sequence carries an error that grows as
√T: as fla's backward does per chunk, the sum runs inside segments (a kernel block on TPU,
256 tokens on GPU) and the rest, Σ_{t' beyond the segment} dL/dB_{t'}, is Σ_V S ⊙ dS for the
state S leaving the segment (scaling every later B by e^δ scales S by e^δ), which the backward
kernels write. Measured in bfloat16 with HGRN2-like gates (f ≈ 0.98) at B1 T1000 H4 K128:
RMS ratio 8.4e-3 summed over the sequence, ≤ 4.0e-3 anchored. With packed rows the gate of a
document's first token is unused (the state it would decay is reset) and gets exactly zero.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.dispatch import (
    check_backend,
    check_inputs,
    dispatch,
    gpu_module,
    pad_T,
    round_up,
)
from kernels_pallas.gated_linear_attention import tpu
from kernels_pallas.gated_linear_attention.chunk import CHUNK

PACKAGE = "kernels_pallas.gated_linear_attention"


def gpu_available() -> bool:
    """Whether the GPU kernel (gpu.py) imports; without it CUDA falls back to interpret mode."""
    return gpu_module(PACKAGE) is not None


@dataclasses.dataclass(frozen=True)
class _Config:
    block_t: int | None
    block_v: int | None
    backend: str | None
    interpret: Any


def _head_size(n):
    """K and V are zero-padded to a power of two ≥ 64 (Triton's tiles are powers of two; zero
    channels of q, k, v and the state contribute nothing, their gates are 0)."""
    return max(64, 1 << (n - 1).bit_length())


def _pad_run(run_BT, T):
    # The padding repeats the last run: its (zero) tokens start no document.
    return None if run_BT is None else jnp.pad(run_BT, ((0, 0), (0, T - run_BT.shape[1])), "edge")


def _block_v(cfg, V, default):
    return cfg.block_v or (V if V <= default else default)


def _gate_grad(q, k, dq, dk, r_BHSK, segment, run):
    """dL/dg [B, H, T, K] float32 (the module docstring) from dq, dk [B, H, T, K] float32 and
    r = Σ_V S ⊙ dS for the state leaving each segment of `segment` tokens (the last one's is
    the final state's term): the reverse cumulative sum runs inside each segment, and r stands
    for all of the sum beyond it. Summing over the whole sequence instead gives the same value
    with an error that grows as √T: the terms cancel."""
    B, H, T, K = q.shape
    n = r_BHSK.shape[2]
    dB = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk
    dB = jnp.pad(dB, ((0, 0), (0, 0), (0, n * segment - T), (0, 0))).reshape(B, H, n, segment, K)
    dg = lax.cumsum(dB, axis=3, reverse=True) + r_BHSK[:, :, :, None]
    dg = dg.reshape(B, H, n * segment, K)[:, :, :T]
    if run is None:
        return dg
    # A document's first gate decays a state its reset discards: exactly zero.
    starts = jnp.pad(run[:, 1:] != run[:, :-1], ((0, 0), (1, 0)))
    return jnp.where(starts[:, None, :, None], 0.0, dg)


def _run(kernel, args, T_pad, segment=None, **kw):
    """args (q, k, v, b, s0, run[, do, dsT]) with T a multiple of CHUNK, padded to T_pad (whole
    chunks: b is 0 there) for the kernel, its token-shaped outputs cut back. The backward's
    outputs are (dq, dk, dv, ds0, dg), with the gates' gradient anchored every `segment`
    tokens."""
    T = args[0].shape[2]
    args = [pad_T(x, T_pad) if i in (0, 1, 2, 3, 6) else x for i, x in enumerate(args)]
    run = _pad_run(args.pop(5), T_pad)
    out = kernel(*args, run_BT=run, **kw)
    if len(args) == 5:  # forward: (o, final state)
        return out[0][:, :, :T], out[1]
    dq, dk, dv, ds0, r = out
    dg = _gate_grad(args[0], args[1], dq, dk, r, segment, run)
    return (*(x[:, :, :T] for x in (dq, dk, dv)), ds0, dg[:, :, :T])


def _run_tpu(cfg, fn, interpret, *args):
    T, V = args[0].shape[2], args[2].shape[-1]
    block_t = min(cfg.block_t or tpu.DEFAULT_BLOCK_T, T)
    block_v = _block_v(cfg, V, 256)
    return _run(getattr(tpu, fn), args, round_up(T, block_t), block_t, block_t=block_t,
                block_v=block_v, interpret=interpret)  # fmt: skip


def _run_gpu(cfg, fn, gpu, interpret, *args):
    block_v = _block_v(cfg, args[2].shape[-1], gpu.default_block_v(jax.devices()[0].device_kind))
    return _run(getattr(gpu, fn), args, args[0].shape[2], gpu.SEGMENT_CHUNKS * CHUNK,
                block_v=block_v, interpret=interpret)  # fmt: skip


def _dispatch(cfg, fn, *args):
    """fn ("forward" or "backward") of the kernel for the lowering platform."""
    run_tpu, run_gpu = (functools.partial(run, cfg, fn) for run in (_run_tpu, _run_gpu))
    return dispatch(PACKAGE, cfg.backend, cfg.interpret, run_tpu, run_gpu, *args)


def _chunk_cumsum(g_BHTK):
    """The chunk-local inclusive cumulative sums of the log gates, float32 (T a multiple of
    CHUNK)."""
    B, H, T, K = g_BHTK.shape
    g = g_BHTK.astype(jnp.float32).reshape(B, H, T // CHUNK, CHUNK, K)
    return jnp.cumsum(g, axis=3).reshape(B, H, T, K)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gla(q, k, v, g, s0, run, cfg):
    return _dispatch(cfg, "forward", q, k, v, _chunk_cumsum(g), s0, run)


def _gla_fwd(q, k, v, g, s0, run, cfg):
    b = _chunk_cumsum(g)
    return _dispatch(cfg, "forward", q, k, v, b, s0, run), (q, k, v, b, s0, run)


def _gla_bwd(cfg, res, cts):
    q, k, v, b, s0, run = res
    do, dsT = cts
    dq, dk, dv, ds0, dg = _dispatch(cfg, "backward", q, k, v, b, s0, run, do.astype(v.dtype),
                                    dsT)  # fmt: skip
    # The runs are integers: no cotangent.
    return dq.astype(q.dtype), dk.astype(k.dtype), dv, dg, ds0, None


_gla.defvjp(_gla_fwd, _gla_bwd)


def gated_linear_attention(
    q_BTHK,
    k_BTHK,
    v_BTHV,
    log_gate_BTHK,
    *,
    initial_state=None,
    return_final_state=False,
    segment_ids=None,
    block_t=None,
    block_v=None,
    backend=None,
    interpret=None,
):
    """Gated linear attention (per-key-channel, data-dependent decay) by the chunked kernels.

    Args:
      q_BTHK, k_BTHK: [B, T, H, K].  v_BTHV: [B, T, H, V] (bf16 or fp32; float32 accumulate).
      log_gate_BTHK: [B, T, H, K], log of the forget gate, ≤ 0 (e.g. logsigmoid), any float
        dtype (taken as float32); differentiable.
      initial_state: [B, H, K, V], the state before the first token (zeros when None).
      return_final_state: also return the float32 state after the last token.
      segment_ids: None, or [B, T] int document ids of packed rows: the state is reset exactly
        where the id changes (the initial state continues the row's first document).
      block_t: tokens per TPU grid step (a multiple of 64; default 256). block_v: V columns
        per program (default: all of V up to 256 on TPU, the GPU table's width on GPU).
      backend: None (by the platform the computation is lowered for), "tpu" or "gpu".
      interpret: None (interpret mode only where no kernel applies, e.g. on the CPU), or True
        / a `pltpu.InterpretParams` to interpret the chosen kernel.

    Returns:
      o [B, T, H, V] in q's dtype, or (o, final_state [B, H, K, V] float32).
    """
    check_backend(backend)
    if q_BTHK.ndim != 4 or not q_BTHK.shape == k_BTHK.shape == log_gate_BTHK.shape:
        raise ValueError(
            "q, k and log_gate must all be [B, T, H, K], got "
            f"{q_BTHK.shape}, {k_BTHK.shape}, {log_gate_BTHK.shape}"
        )
    run = check_inputs("gated_linear_attention", q_BTHK, v_BTHV, initial_state, segment_ids)
    if block_t is not None and (block_t < CHUNK or block_t % CHUNK):
        raise ValueError(f"block_t must be a positive multiple of {CHUNK}, got {block_t}")
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    Tp, Kp, Vp = round_up(T, CHUNK), _head_size(K), _head_size(V)

    def head_major(x, X, dtype):
        x = jnp.swapaxes(x.astype(dtype), 1, 2)
        return jnp.pad(x, ((0, 0), (0, 0), (0, Tp - T), (0, X - x.shape[-1])))

    # One dtype for the MMA operands: q's (the output's).
    q = head_major(q_BTHK, Kp, q_BTHK.dtype)
    k = head_major(k_BTHK, Kp, q.dtype)
    v = head_major(v_BTHV, Vp, q.dtype)
    g = head_major(log_gate_BTHK, Kp, jnp.float32)
    s0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state
    s0 = jnp.pad(jnp.swapaxes(s0.astype(jnp.float32), 2, 3), ((0, 0), (0, 0), (0, Vp - V),
                                                              (0, Kp - K)))  # fmt: skip
    cfg = _Config(block_t, block_v, backend, interpret)
    o_BHTV, sT_BHVK = _gla(q, k, v, g, s0, _pad_run(run, Tp), cfg)
    o_BTHV = jnp.swapaxes(o_BHTV[:, :, :T, :V], 1, 2)
    if not return_final_state:
        return o_BTHV
    return o_BTHV, jnp.swapaxes(sT_BHVK[:, :, :V, :K], 2, 3)
