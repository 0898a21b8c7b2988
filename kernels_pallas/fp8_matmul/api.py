"""`fp8_matmul`: a scaled FP8 GEMM dispatched to the TPU (Mosaic) or GPU (Triton) kernel.

Scales are dequantization multipliers, as in `jax.nn.scaled_matmul`:

    out[m, n] = Σ_k a[m, k] · b[k, n] · sa(m, k) · sb(k, n)

- per-tensor: `a_scale` and `b_scale` scalars (shape () or (1,));
- fine-grained (DeepSeek-V3): `a_scale` [M, ⌈K/128⌉] — one per token per 128 inner elements
  — and `b_scale` [⌈K/128⌉, ⌈N/128⌉] (128×128 weight blocks) or [⌈K/128⌉, N] (128×1 groups,
  e.g. an output gradient as the right operand of a weight-gradient GEMM). A scalar beside a
  fine-grained partner is broadcast to the fine-grained layout.

Shapes that are not multiples of the blocks are zero-padded here (scales padded with zeros)
and the result sliced back. The padding copies the operands; default TPU blocks are chosen
to divide the shape rounded up to the FP8 tile (32 rows, 128 columns) where that keeps them
at least half the default, so aligned shapes (e.g. N = 11008 = 43·256) are not copied.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from kernels_pallas.fp8_matmul import gpu, tpu

GROUP = 128
FP8_DTYPES = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))
BACKENDS = ("tpu", "gpu")


def _is_scalar(s) -> bool:
    return jnp.ndim(s) == 0 or (jnp.ndim(s) == 1 and jnp.shape(s)[0] == 1)


def _fine_scales(a_scale, b_scale, m, k, n):
    """Both scales in the kernels' layout: sa [M, G], sb [G, N] (G = ⌈K/128⌉), float32."""
    g, gn = -(-k // GROUP), -(-n // GROUP)
    sa = jnp.asarray(a_scale, jnp.float32)
    sb = jnp.asarray(b_scale, jnp.float32)
    if _is_scalar(sa):
        sa = jnp.broadcast_to(sa.reshape(()), (m, g))
    if _is_scalar(sb):
        sb = jnp.broadcast_to(sb.reshape(()), (g, n))
    if sa.shape != (m, g):
        raise ValueError(f"a_scale must be a scalar or [M, ceil(K/128)] = {(m, g)}, not {sa.shape}")
    if sb.shape == (g, gn):
        sb = jnp.repeat(sb, GROUP, axis=1)[:, :n]
    elif sb.shape != (g, n):
        raise ValueError(
            f"b_scale must be a scalar, [ceil(K/128), ceil(N/128)] = {(g, gn)} or "
            f"[ceil(K/128), N] = {(g, n)}, not {sb.shape}"
        )
    return sa, sb


def _expand(sa_MG, sb_GN, k):
    """Per-element scales [M, K] and [K, N] (for the reference)."""
    return (
        jnp.repeat(sa_MG, GROUP, axis=1)[:, :k],
        jnp.repeat(sb_GN, GROUP, axis=0)[:k],
    )


def fp8_matmul_reference(a_MK, b_KN, a_scale, b_scale, *, out_dtype=jnp.bfloat16):
    """The oracle: operands upcast to float32, scales applied elementwise, float32 matmul."""
    (m, k), n = a_MK.shape, b_KN.shape[1]
    a, b = a_MK.astype(jnp.float32), b_KN.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    if _is_scalar(a_scale) and _is_scalar(b_scale):
        s = jnp.reshape(a_scale, ()).astype(jnp.float32) * jnp.reshape(b_scale, ())
        return (jnp.dot(a, b, precision=hi) * s).astype(out_dtype)
    sa, sb = _expand(*_fine_scales(a_scale, b_scale, m, k, n), k)
    return jnp.dot(a * sa, b * sb, precision=hi).astype(out_dtype)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _tpu_block(size: int, default: int, align: int) -> int:
    """The largest multiple of `align` up to `default` that divides `size` rounded up to
    `align` (so only alignment padding is needed), unless that is under half the default:
    then the default, and the padding."""
    need = _round_up(size, align)
    if need <= default:
        return need
    best = max(b for b in range(align, default + 1, align) if need % b == 0)
    return best if 2 * best >= default else default


def _blocks(backend, m, n, k, block_m, block_n, block_k, grouped):
    """Block sizes: the caller's, else the backend's defaults fitted to the problem — TPU
    blocks are multiples of the FP8 tile (32, 128), Triton's powers of two."""
    mod = tpu if backend == "tpu" else gpu
    defaults = tpu.default_blocks() if backend == "tpu" else gpu.DEFAULT_BLOCKS
    out = []
    for size, given, default, align in zip((m, n, k), (block_m, block_n, block_k), defaults,
                                           mod.ALIGN, strict=True):  # fmt: skip
        if given is None and backend == "tpu":
            given = _tpu_block(size, default, align)
        elif given is None:
            given = max(align, min(default, 1 << (size - 1).bit_length()))
        out.append(given)
    bm, bn, bk = out
    if grouped and backend == "gpu":
        bk = GROUP  # one scale column per K step
    if grouped and bk % GROUP:
        raise ValueError(f"fine-grained scales need block_k a multiple of {GROUP}, got {bk}")
    return bm, bn, bk


def _pad2(x, rows: int, cols: int):
    return jnp.pad(x, [(0, rows - x.shape[0]), (0, cols - x.shape[1])])


def _run(backend, interpret, a_MK, b_KN, a_scale, b_scale, *, out_dtype, block_m, block_n,
         block_k):  # fmt: skip
    (m, k), n = a_MK.shape, b_KN.shape[1]
    grouped = not (_is_scalar(a_scale) and _is_scalar(b_scale))
    bm, bn, bk = _blocks(backend, m, n, k, block_m, block_n, block_k, grouped)
    mp, np_, kp = _round_up(m, bm), _round_up(n, bn), _round_up(k, bk)
    a, b = _pad2(a_MK, mp, kp), _pad2(b_KN, kp, np_)
    mod = tpu if backend == "tpu" else gpu
    if backend == "gpu":
        interpret = bool(interpret)  # `pltpu.InterpretParams` are the TPU interpreter's
    kw = dict(out_dtype=out_dtype, blocks=(bm, bn, bk), interpret=interpret)
    if grouped:
        sa, sb = _fine_scales(a_scale, b_scale, m, k, n)
        sa, sb = _pad2(sa, mp, kp // GROUP), _pad2(sb, kp // GROUP, np_)
        out = mod.matmul_group_scale(a, b, sa, sb, **kw)
    else:
        s = (jnp.reshape(a_scale, (1,)) * jnp.reshape(b_scale, (1,))).astype(jnp.float32)
        out = mod.matmul_tensor_scale(a, b, s, **kw)
    return out[:m, :n]


def fp8_matmul(
    a_MK: jax.Array,
    b_KN: jax.Array,
    a_scale: jax.Array,
    b_scale: jax.Array,
    *,
    out_dtype=jnp.bfloat16,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    backend: str | None = None,
    interpret=None,
) -> jax.Array:
    """``a @ b`` on FP8 operands with dequantization scales; float32 accumulation.

    a_MK: [M, K] float8_e4m3fn or float8_e5m2; b_KN: [K, N] (formats may differ);
    a_scale, b_scale: per-tensor or fine-grained (module docstring); out_dtype: bfloat16 or
    float32. Returns [M, N] in out_dtype.

    backend: None picks by the lowering platform — the Mosaic kernel for TPU, the Triton
    kernel for CUDA, and the TPU kernel in Pallas interpret mode anywhere else (the CPU) — so
    a function traced on the CPU and lowered for TPU gets the TPU kernel. "tpu" / "gpu" force
    one. interpret: True or a `pltpu.InterpretParams` (TPU kernel) runs the chosen kernel in
    interpret mode; None means compiled, except the CPU fallback above.
    """
    if a_MK.ndim != 2 or b_KN.ndim != 2 or a_MK.shape[1] != b_KN.shape[0]:
        raise ValueError(f"need a [M, K] and b [K, N], got {a_MK.shape} and {b_KN.shape}")
    for name, x in (("a", a_MK), ("b", b_KN)):
        if x.dtype not in FP8_DTYPES:
            raise ValueError(f"{name} must be float8_e4m3fn or float8_e5m2, not {x.dtype}")
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"out_dtype must be bfloat16 or float32, not {out_dtype}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, not {backend!r}")
    if math.prod(a_MK.shape) == 0 or b_KN.shape[1] == 0:
        return jnp.zeros((a_MK.shape[0], b_KN.shape[1]), out_dtype)
    run = functools.partial(_run, out_dtype=jnp.dtype(out_dtype), block_m=block_m,
                            block_n=block_n, block_k=block_k)  # fmt: skip
    args = (a_MK, b_KN, a_scale, b_scale)
    if backend is None and interpret is None:
        return jax.lax.platform_dependent(
            *args,
            tpu=functools.partial(run, "tpu", False),
            cuda=functools.partial(run, "gpu", False),
            default=functools.partial(run, "tpu", True),
        )
    return run(backend or "tpu", interpret or False, *args)
