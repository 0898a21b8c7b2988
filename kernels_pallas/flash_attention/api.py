"""`flash_attention`: causal softmax self-attention with packed documents and GQA, the Triton
kernels of gpu.py behind a `custom_vjp`.

The function of `jaxllm.ops.attention_reference(q, k, v, causal=..., segment_ids_BT=...)` (its
oracle) for self-attention (T = S, positions 0..T-1): what a packed train batch needs on GPU,
where cuDNN through jax takes no segment ids (`jaxllm.ops.attention.cudnn_unsupported`). On TPU
that role is splash attention's (`jaxllm.ops.attention_splash`), so there is no Mosaic kernel
here: lowered for CUDA the Triton kernels run, anywhere else the same kernels in Pallas
interpret mode (the CPU tests).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.dispatch import gpu_module, round_up

PACKAGE = "kernels_pallas.flash_attention"
MIN_DIM = 16  # the smallest Triton dot tile
MAX_HEAD_DIM = 256  # register / shared-memory budget of one [block, head dim] tile pair


def gpu_available() -> bool:
    """Whether the GPU kernels (gpu.py, the Triton lowering) import."""
    return gpu_module(PACKAGE) is not None


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    causal: bool
    block_q: int
    block_k: int
    interpret: bool


def _run(cfg, fn, *args):
    """gpu.<fn>(*args): compiled where lowered for CUDA, interpreted elsewhere (or always,
    with cfg.interpret)."""
    gpu = gpu_module(PACKAGE)
    kw = dict(scale=cfg.scale, causal=cfg.causal, block_q=cfg.block_q, block_k=cfg.block_k)
    call = lambda interpret, *a: getattr(gpu, fn)(*a, interpret=interpret, **kw)
    if cfg.interpret:
        return call(True, *args)
    return lax.platform_dependent(
        *args, cuda=functools.partial(call, False), default=functools.partial(call, True)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, qcol, krow, cfg):
    return _run(cfg, "forward", q, k, v, qcol, krow)[0]


def _flash_fwd(q, k, v, qcol, krow, cfg):
    o, lse = _run(cfg, "forward", q, k, v, qcol, krow)
    return o, (q, k, v, qcol, krow, o, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, qcol, krow, o, lse = res
    delta = jnp.einsum("BTHV,BTHV->BHT", o.astype(jnp.float32), do.astype(jnp.float32))
    dq, dk, dv = _run(cfg, "backward", q, k, v, qcol, krow, do, lse, delta)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def unsupported(q_BTHK, k_BSGK, v_BSGV) -> str | None:
    """Why these shapes cannot run here, or None."""
    b, t, h, kd = q_BTHK.shape
    if k_BSGK.shape[:2] != (b, t) or v_BSGV.shape[:3] != k_BSGK.shape[:3]:
        return "self-attention only (k, v [B, T, G, ·] with q's B and T)"
    if h % k_BSGK.shape[2]:
        return f"{h} query heads over {k_BSGK.shape[2]} kv heads"
    if k_BSGK.shape[3] != kd or max(kd, v_BSGV.shape[3]) > MAX_HEAD_DIM:
        return f"head dims {kd} / {v_BSGV.shape[3]} (K's equal, both <= {MAX_HEAD_DIM})"
    return None


def _document_bounds(seg_BT):
    """(first_BT, end_BT): the first key position each query may attend to and the end
    (exclusive) of the query positions each key may be attended by, i.e. the bounds of the
    token's run of equal ids, where every id of the row forms one run (packed documents);
    else the whole row (0, T), for ids that come back after another."""
    b, t = seg_BT.shape
    pos = jnp.arange(t, dtype=jnp.int32)
    change = seg_BT[:, 1:] != seg_BT[:, :-1]
    starts = jnp.concatenate([jnp.ones((b, 1), bool), change], axis=1)
    ends = jnp.concatenate([change, jnp.ones((b, 1), bool)], axis=1)
    first = lax.cummax(jnp.where(starts, pos, 0), axis=1)
    end = lax.cummin(jnp.where(ends, pos + 1, t), axis=1, reverse=True)
    # one run per id ⇔ as many runs as distinct ids
    ordered = jnp.sort(seg_BT, axis=1)
    distinct = 1 + jnp.sum(ordered[:, 1:] != ordered[:, :-1], axis=1)
    one_run = (jnp.sum(starts, axis=1) == distinct)[:, None]
    return jnp.where(one_run, first, 0), jnp.where(one_run, end, t)


def _pow2(n: int) -> int:
    return max(MIN_DIM, 1 << (n - 1).bit_length())


def flash_attention(
    q_BTHK,
    k_BTGK,
    v_BTGV,
    *,
    segment_ids=None,
    causal=True,
    scale=None,
    block_q=None,
    block_k=None,
    interpret=None,
):
    """softmax(q·kᵀ · scale, causal and within documents) · v by the Triton kernels.

    Args:
      q_BTHK: [B, T, H, K]; k_BTGK: [B, T, G, K]; v_BTGV: [B, T, G, V], G dividing H (query
        head h reads kv head h // (H / G)); bf16, fp16 or fp32 (float32 accumulation).
      segment_ids: None or [B, T] int document ids: a query attends to keys of its own id.
      causal: mask later keys.  scale: default K^-1/2.
      block_q, block_k: query / key rows per tile (powers of two; default gpu.BLOCK_Q/K).
      interpret: None (the kernels where lowered for CUDA, interpret mode elsewhere) or True.

    Returns:
      [B, T, H, V] in q's dtype.
    """
    if why := unsupported(q_BTHK, k_BTGK, v_BTGV):
        raise ValueError(f"flash_attention: {why}")
    gpu = gpu_module(PACKAGE)
    if gpu is None:
        raise RuntimeError("flash_attention: the GPU kernels do not import (kernels_pallas)")
    b, t, _, kd = q_BTHK.shape
    vd = v_BTGV.shape[3]
    block_q, block_k = block_q or gpu.BLOCK_Q, block_k or gpu.BLOCK_K
    for name, n in (("block_q", block_q), ("block_k", block_k)):
        if n < MIN_DIM or n & (n - 1):
            raise ValueError(f"{name} must be a power of two >= {MIN_DIM}, got {n}")
    # tiles no longer than the (padded) row
    row = _pow2(t)
    block_q, block_k = min(block_q, row), min(block_k, row)
    t_pad = round_up(t, max(block_q, block_k))
    kp, vp = _pow2(kd), _pow2(vd)
    dt = q_BTHK.dtype

    def pad(x, d):
        return jnp.pad(x.astype(dt), ((0, 0), (0, t_pad - t), (0, 0), (0, d - x.shape[3])))

    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    # padded tokens: an id no real token has (they see only each other; causal masking
    # hides them from every real query anyway)
    seg = jnp.pad(seg, ((0, 0), (0, t_pad - t)), constant_values=jnp.max(seg, initial=0) + 1)
    first, end = _document_bounds(seg)
    qcol = jnp.stack([seg, first], axis=2)  # [B, T, 2]
    krow = jnp.stack([seg, end], axis=1)  # [B, 2, T]
    cfg = _Config(kd**-0.5 if scale is None else float(scale), bool(causal), block_q, block_k,
                  bool(interpret))  # fmt: skip
    o = _flash(pad(q_BTHK, kp), pad(k_BTGK, kp), pad(v_BTGV, vp), qcol, krow, cfg)
    return o[:, :t, :, :vd]
