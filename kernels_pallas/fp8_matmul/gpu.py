"""FP8 GEMM for NVIDIA GPUs through Pallas's Triton lowering: grid (M/bm, N/bn), a loop
over K blocks carrying a float32 accumulator in registers.

Why Triton and not Mosaic GPU: the Triton lowering of `pallas_call` takes a plain `jnp.dot`
of FP8 tiles to Triton's FP8 ``tl.dot`` (Hopper WGMMA, Ada MMA) and can be lowered (to Triton
IR) and interpreted on this CPU, so the kernel is tested here; a Mosaic GPU kernel needs
`plgpu.kernel` + `emit_pipeline` + WGMMA-specific layouts, which can neither run nor lower
without a Hopper GPU. (jax marks the Triton backend deprecated from 0.11; the installed
0.10.2 supports it.)

Accumulation: every ``jnp.dot`` covers at most 128 elements of K (`block_k` is 128 with
fine-grained scales) and its float32 result is scaled and added to the accumulator outside
the MMA, so partial sums are promoted to float32 at least every 128 elements — DeepSeek-V3's
fix for Hopper's ~14-bit FP8 accumulator (Triton's default FP8 dot also promotes).

Mixed formats (E5M2 × E4M3, the backward's dY·W and dYᵀ·X): both tiles are upcast to
bfloat16 (exact for every FP8 value) and run as a bfloat16 dot — correct, at the bf16 rate.
An FP8 dot of the two formats does not lower in jax 0.10.2 (checked on the CPU by lowering a
Pallas kernel with lowering_platforms=("cuda",);
tests/kernels_pallas/test_fp8_matmul.py::test_triton_lowering_rejects_mixed_fp8_dot):
- `jnp.dot(e5m2_tile, e4m3_tile, preferred_element_type=jnp.float32)` raises, from the dot rule
  of Pallas's Triton lowering (jax/_src/pallas/triton/lowering.py, `_dot_general_lowering`):
  `ValueError: a and b must have the same element type, but got: f8E5M2 and f8E4M3FN`;
- `precision=lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32` (or `..._FAST_ACCUM`), mixed or not,
  raises `NotImplementedError: Unsupported dot algorithm: ANY_F8_ANY_F8_F32.`
Casting one operand to the other's format instead would round (E4M3 has one more mantissa bit,
E5M2 a wider range), so bfloat16 it is until the lowering accepts the pair.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

GROUP = 128
DEFAULT_BLOCKS = (128, 128, 128)  # (bm, bn, bk): Hopper FP8 tiles; power-of-two for Triton
ALIGN = (16, 16, 32)
NUM_WARPS, NUM_STAGES = 8, 3


def _tile_dot(a, b, mixed_dtype):
    if a.dtype != b.dtype:
        a, b = a.astype(mixed_dtype), b.astype(mixed_dtype)
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _kernel(*refs, bk, n_k, grouped, mixed_dtype):
    if grouped:
        a_ref, b_ref, sa_ref, sb_ref, o_ref = refs
    else:
        s_ref, a_ref, b_ref, o_ref = refs

    def body(kk, acc):
        ks = pl.ds(pl.multiple_of(kk * bk, bk), bk)
        part = _tile_dot(a_ref[:, ks], b_ref[ks, :], mixed_dtype)
        if grouped:  # bk == GROUP: one scale column of a, one scale row of b
            part = part * sa_ref[:, pl.ds(kk, 1)] * sb_ref[pl.ds(kk, 1), :]
        return acc + part

    bm, bn = o_ref.shape
    acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros((bm, bn), jnp.float32))
    if not grouped:
        acc = acc * s_ref[0]
    o_ref[...] = acc.astype(o_ref.dtype)


def _call(kernel, ins, in_specs, m, n, out_dtype, bm, bn, interpret):
    # float32 when interpreted: the CPU has no bf16 x bf16 -> f32 dot (both are exact here)
    mixed_dtype = jnp.float32 if interpret else jnp.bfloat16
    return pl.pallas_call(
        functools.partial(kernel, mixed_dtype=mixed_dtype),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(m // bm, n // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="fp8_matmul_triton",
    )(*ins)


def matmul_tensor_scale(a_MK, b_KN, s, *, out_dtype, blocks, interpret=False):
    """``(a @ b) · s`` for padded FP8 operands; s: float32 [1]."""
    (m, k), n = a_MK.shape, b_KN.shape[1]
    bm, bn, bk = blocks
    specs = [
        pl.BlockSpec((1,), lambda i, j: (0,)),
        pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
        pl.BlockSpec((k, bn), lambda i, j: (0, j)),
    ]
    kernel = functools.partial(_kernel, bk=bk, n_k=k // bk, grouped=False)
    return _call(kernel, (s, a_MK, b_KN), specs, m, n, out_dtype, bm, bn, interpret)


def matmul_group_scale(a_MK, b_KN, sa_MG, sb_GN, *, out_dtype, blocks, interpret=False):
    """``Σ_g (a[:, g] @ b[g, :]) · sa[:, g] · sb[g, :]`` over 128-wide K groups, for padded
    FP8 operands; sa_MG: [M, K/128], sb_GN: [K/128, N]. block_k is forced to 128."""
    (m, k), n = a_MK.shape, b_KN.shape[1]
    bm, bn, _ = blocks
    g = k // GROUP
    specs = [
        pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
        pl.BlockSpec((k, bn), lambda i, j: (0, j)),
        pl.BlockSpec((bm, g), lambda i, j: (i, 0)),
        pl.BlockSpec((g, bn), lambda i, j: (0, j)),
    ]
    kernel = functools.partial(_kernel, bk=GROUP, n_k=g, grouped=True)
    return _call(kernel, (a_MK, b_KN, sa_MG, sb_GN), specs, m, n, out_dtype, bm, bn, interpret)
