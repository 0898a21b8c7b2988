"""`lightning_attention`: the Pallas kernels behind a `custom_vjp`, dispatched by platform.

S_t = λ S_{t−1} + k_tᵀ v_t, o_t = q_t S_t per batch element and head, λ = exp(log_decay_h),
no 1/√K scaling; the same function as `jaxllm.ops.lightning_attention` (its oracle).

The kernel is chosen by the platform the computation is lowered for
(`kernels_pallas.dispatch`): Mosaic (tpu.py) on TPU, Triton (gpu.py) on CUDA, the TPU kernel
in interpret mode elsewhere.

With `segment_ids` (packed documents) the state is reset at each document start, as
`jaxllm.ops.lightning_attention_packed`; both kernels take the resets (`kernels_pallas.documents`).

The log decay is differentiable: when it depends on what is being differentiated (a learned
decay; the custom_vjp's `symbolic_zeros` primals say so) the backward kernels' reverse sweep
also returns dL/dg (tpu.py's docstring has the terms); a fixed decay skips that work.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from kernels_pallas.dispatch import (
    check_backend,
    check_inputs,
    dispatch,
    gpu_module,
    pad_T,
    round_up,
)
from kernels_pallas.lightning_attention import tpu

PACKAGE = "kernels_pallas.lightning_attention"
# K and V are zero-padded to a multiple of this (exact: zero columns of q, k and v and zero
# rows/columns of the state contribute nothing).
HEAD_DIM_MULTIPLE = 64


def gpu_available() -> bool:
    """Whether the GPU kernel (gpu.py) imports; without it CUDA falls back to interpret mode."""
    return gpu_module(PACKAGE) is not None


@dataclasses.dataclass(frozen=True)
class _Config:
    seq_len: int
    block_t: int | None
    block_v: int | None
    backend: str | None
    interpret: Any
    # Set by the backward rule: whether the log decay needs its gradient.
    decay_grad: bool = False


def _device_kind() -> str:
    return jax.devices()[0].device_kind


def _tpu_sizes(cfg, V):
    """(block_t, block_v, chunk) for the TPU kernel. The table is keyed by the local device's
    kind when it is a TPU; a compile for TPU from a CPU host gets sizes valid on every chip."""
    bt, chunk = tpu.default_block_sizes(_device_kind())
    bt = cfg.block_t or bt
    chunk = min(chunk, bt)
    # A short sequence needs no block longer than itself (rounded to whole chunks).
    bt = min(bt, round_up(cfg.seq_len, chunk))
    block_v = cfg.block_v or (256 if V > 256 and V % 256 == 0 else V)
    return bt, block_v, chunk


def _gpu_sizes(cfg, gpu):
    bt, block_v = gpu.default_block_sizes(_device_kind())
    bt = cfg.block_t or bt
    bt = min(bt, max(16, 1 << (cfg.seq_len - 1).bit_length()))
    return bt, cfg.block_v or block_v


def _run_tpu(cfg, fn, interpret, *args):
    """fn is "forward" or "backward"; args (q, k, v, g, s0, run[, do, dsT]) head-major with T
    unpadded, run [B, T] int32 or None."""
    V = args[2].shape[-1]
    bt, block_v, chunk = _tpu_sizes(cfg, V)
    return _call(getattr(tpu, fn), args, bt, block_v, cfg, interpret, chunk=chunk)


def _run_gpu(cfg, fn, gpu, interpret, *args):
    bt, block_v = _gpu_sizes(cfg, gpu)
    return _call(getattr(gpu, fn), args, bt, block_v, cfg, interpret)


def _call(kernel, args, bt, block_v, cfg, interpret, **extra):
    """Pads T to a multiple of bt (q, k, v, the runs and, in the backward, do), runs, unpads."""
    seq_len = cfg.seq_len
    T_pad = round_up(seq_len, bt)
    backward = len(args) > 6
    if backward:
        extra["decay_grad"] = cfg.decay_grad
    args = [pad_T(x, T_pad) if i in (0, 1, 2, 6) else x for i, x in enumerate(args)]
    run = args.pop(5)
    if run is not None:
        # The padding repeats the last run: its (zero) tokens start no document.
        extra["run_BT"] = jnp.pad(run, ((0, 0), (0, T_pad - seq_len)), mode="edge")
    out = kernel(*args, seq_len=seq_len, block_t=bt, block_v=block_v, interpret=interpret, **extra)
    # forward: (o, sT); backward: (dq, dk, dv, ds0, dg). o, dq, dk, dv are [B, H, T_pad, ·].
    n_tokens = 3 if backward else 1
    return (*(x[:, :, :seq_len] for x in out[:n_tokens]), *out[n_tokens:])


def _dispatch(cfg, fn, *args):
    """fn ("forward" or "backward") of the kernel for the lowering platform."""
    run_tpu, run_gpu = (functools.partial(run, cfg, fn) for run in (_run_tpu, _run_gpu))
    return dispatch(PACKAGE, cfg.backend, cfg.interpret, run_tpu, run_gpu, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _lightning(q, k, v, g, s0, run, cfg):
    return _dispatch(cfg, "forward", q, k, v, g, s0, run)


def _lightning_fwd(q, k, v, g, s0, run, cfg):
    # symbolic_zeros: the primals say whether they depend on what is differentiated. A fixed
    # decay (TNL's schedule) is not, and its backward skips the decay gradient's extra work.
    primals = [None if x is None else x.value for x in (q, k, v, g, s0, run)]
    return _dispatch(cfg, "forward", *primals), (*primals, g.perturbed)


def _lightning_bwd(cfg, res, cts):
    *primals, decay_grad = res
    v, g = primals[2], primals[3]
    do, dsT = (jnp.zeros(c.shape, c.dtype) if isinstance(c, SymbolicZero) else c for c in cts)
    dq, dk, dv, ds0, dg = _dispatch(
        dataclasses.replace(cfg, decay_grad=decay_grad), "backward", *primals,
        do.astype(v.dtype), dsT,
    )  # fmt: skip
    dg = jnp.zeros_like(g) if dg is None else dg.astype(g.dtype)
    # The runs are integers: no cotangent.
    return dq, dk, dv, dg, ds0, None


_lightning.defvjp(_lightning_fwd, _lightning_bwd, symbolic_zeros=True)


def lightning_attention(
    q_BTHK,
    k_BTHK,
    v_BTHV,
    log_decay_H=None,
    *,
    initial_state=None,
    return_final_state=False,
    segment_ids=None,
    block_t=None,
    block_v=None,
    backend=None,
    interpret=None,
):
    """Causal linear attention with a per-head decay, by the Lightning Attention-2 kernels.

    Args:
      q_BTHK, k_BTHK: [B, T, H, K].  v_BTHV: [B, T, H, V] (bf16 or fp32; float32 accumulate).
      log_decay_H: [H] float, log λ ≤ 0 per head; None for no decay. Differentiable (a learned
        decay trains through the kernel; the official kernels treat it as a buffer).
      initial_state: [B, H, K, V], the state before the first token (zeros when None).
      return_final_state: also return the float32 state after the last token.
      segment_ids: None, or [B, T] int document ids of packed rows: the state is reset
        wherever the id changes (any values; the initial state continues into the row's first
        document), as `jaxllm.ops.lightning_attention_packed`.
      block_t, block_v: tokens per grid block and V columns per program (default: the
        backend's table for the local chip; K, V are padded to multiples of 64 first).
      backend: None (by the platform the computation is lowered for), "tpu" or "gpu".
      interpret: None (interpret mode only where no kernel applies, e.g. on the CPU), or True
        / a `pltpu.InterpretParams` to interpret the chosen kernel (TPU's unless backend="gpu";
        the GPU kernel takes any of them as True).

    Returns:
      o [B, T, H, V] in q's dtype, or (o, final_state [B, H, K, V] float32).
    """
    check_backend(backend)
    if q_BTHK.ndim != 4 or q_BTHK.shape != k_BTHK.shape:
        raise ValueError(f"q and k must both be [B, T, H, K], got {q_BTHK.shape}, {k_BTHK.shape}")
    run = check_inputs("lightning_attention", q_BTHK, v_BTHV, initial_state, segment_ids)
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    g_H = jnp.zeros((H,), jnp.float32) if log_decay_H is None else log_decay_H
    g_H = jnp.asarray(g_H, jnp.float32)
    if g_H.shape != (H,):
        raise ValueError(f"log_decay_H must have shape [H] = ({H},), got {g_H.shape}")
    s0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state
    Kp, Vp = round_up(K, HEAD_DIM_MULTIPLE), round_up(V, HEAD_DIM_MULTIPLE)
    s0 = jnp.pad(s0.astype(jnp.float32), ((0, 0), (0, 0), (0, Kp - K), (0, Vp - V)))

    def head_major(x, X):
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0),) * 3 + ((0, X - x.shape[-1]),))

    cfg = _Config(T, block_t, block_v, backend, interpret)
    # One dtype for the MXU operands: q's (the output's).
    q = head_major(q_BTHK, Kp)
    k = head_major(k_BTHK.astype(q.dtype), Kp)
    v = head_major(v_BTHV.astype(q.dtype), Vp)
    o_BHTV, sT = _lightning(q, k, v, g_H, s0, run, cfg)
    o_BTHV = jnp.swapaxes(o_BHTV[..., :V], 1, 2)
    return (o_BTHV, sT[:, :, :K, :V]) if return_final_state else o_BTHV
