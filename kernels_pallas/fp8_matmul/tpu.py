"""FP8 GEMM for TPU (Mosaic): grid (M/bm, N/bn, K/bk), float32 accumulator in VMEM.

v5e, v5p and v6e have no FP8 MXU (TPU7x does): the FP8 tiles are DMA'd from HBM as FP8 (half
the bytes of bf16, the whole win on these chips) and upcast to bfloat16 in VMEM, where the
MXU multiplies them exactly (every E4M3/E5M2 value is a bfloat16) with float32 accumulation.

Operands arrive padded (see `api.py`): M a multiple of bm, K of bk, N of bn. Scales:

- per-tensor: one float32 multiplier in SMEM, applied once to the finished accumulator;
- fine-grained: a_scale [M, K/128] (VMEM block [bm, K/128], the whole row of groups, since
  a block narrower than 128 lanes must span the array) and b_scale expanded per column to
  [K/128, 1, N] (block [bk/128, 1, bn]); each 128-wide K step's partial product is scaled
  and added to the accumulator, as DeepSeek-V3's kernel promotes every 128 elements.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import cost

GROUP = 128
# (bm, bn, bk) per generation: MXU 128² on v5e, 256² on v6e; FP8 tiles in (32, 128) layout;
# chosen to fit the default scoped VMEM (16 MiB on v5e, 32 MiB on v6e) with double buffering
# (the tpu_aot test compiles each). Not tuned on hardware.
DEFAULT_BLOCKS = {  # keys: `pltpu.ChipVersion` values
    "v4": (512, 512, 512),
    "v5e": (512, 512, 512),
    "v5p": (512, 1024, 512),
    "v6e": (512, 1024, 1024),
    "7x": (512, 1024, 1024),
}
FALLBACK_BLOCKS = (512, 512, 512)
ALIGN = (32, 128, 128)  # (m, n, k): FP8 sublane packing, lanes


def default_blocks() -> tuple[int, int, int]:
    """Block sizes for the attached TPU's generation; a generic choice off-TPU (an
    ahead-of-time compile from the CPU cannot see the target chip at trace time)."""
    try:
        version = pltpu.get_tpu_info().chip_version.value
    except ValueError:  # "Unsupported TPU device kind: cpu"
        return FALLBACK_BLOCKS
    return DEFAULT_BLOCKS.get(version, FALLBACK_BLOCKS)


def _compute_dtype(interpret) -> jnp.dtype:
    # bfloat16 for the MXU; float32 when interpreted (the CPU has no bf16 x bf16 -> f32 dot).
    # Both hold every FP8 value exactly, and their products are exact in float32.
    return jnp.float32 if interpret else jnp.bfloat16


def _tensor_kernel(s_ref, a_ref, b_ref, o_ref, acc_ref, *, cdt):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    a, b = a_ref[...].astype(cdt), b_ref[...].astype(cdt)
    acc_ref[...] += jnp.dot(a, b, preferred_element_type=jnp.float32)

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = (acc_ref[...] * s_ref[0]).astype(o_ref.dtype)


def _grouped_kernel(a_ref, b_ref, sa_ref, sb_ref, o_ref, acc_ref, *, groups_per_block, cdt):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    sa = sa_ref[...]  # [bm, K/128]
    lane = jax.lax.broadcasted_iota(jnp.int32, sa.shape, 1)
    for g in range(groups_per_block):
        ks = slice(g * GROUP, (g + 1) * GROUP)
        part = jnp.dot(
            a_ref[:, ks].astype(cdt),
            b_ref[ks, :].astype(cdt),
            preferred_element_type=jnp.float32,
        )
        # the group's column of a_scale, picked by a masked lane sum (a dynamic lane slice
        # is not something Mosaic lowers)
        sa_g = jnp.sum(jnp.where(lane == k * groups_per_block + g, sa, 0.0), axis=1, keepdims=True)
        acc_ref[...] += part * sa_g * sb_ref[g]

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def matmul_tensor_scale(a_MK, b_KN, s, *, out_dtype, blocks, interpret=False):
    """``(a @ b) · s`` for padded FP8 operands; s: float32 [1] (both scales multiplied)."""
    (m, k), n = a_MK.shape, b_KN.shape[1]
    bm, bn, bk = blocks
    return pl.pallas_call(
        functools.partial(_tensor_kernel, cdt=_compute_dtype(interpret)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        cost_estimate=cost.matmul(
            m, n, k, arrays=[a_MK, b_KN, jax.ShapeDtypeStruct((m, n), out_dtype)]
        ),
        grid=(m // bm, n // bn, k // bk),
        in_specs=[
            pl.BlockSpec(memory_space=pltpu.SMEM),
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="fp8_matmul_tensor_scale",
    )(s, a_MK, b_KN)


def matmul_group_scale(a_MK, b_KN, sa_MG, sb_GN, *, out_dtype, blocks, interpret=False):
    """``Σ_g (a[:, g] @ b[g, :]) · sa[:, g] · sb[g, :]`` over 128-wide K groups g, for padded
    FP8 operands; sa_MG: [M, K/128], sb_GN: [K/128, N] (one scale per column and group)."""
    (m, k), n = a_MK.shape, b_KN.shape[1]
    bm, bn, bk = blocks
    gpb = bk // GROUP
    sb_G1N = sb_GN[:, None, :]  # a block of one sublane row per group: [gpb, 1, bn]
    return pl.pallas_call(
        functools.partial(_grouped_kernel, groups_per_block=gpb, cdt=_compute_dtype(interpret)),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        cost_estimate=cost.matmul(
            m, n, k, arrays=[a_MK, b_KN, jax.ShapeDtypeStruct((m, n), out_dtype)]
        ),
        grid=(m // bm, n // bn, k // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
            pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
            pl.BlockSpec((bm, k // GROUP), lambda i, j, kk: (i, 0)),
            pl.BlockSpec((gpb, 1, bn), lambda i, j, kk: (kk, 0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="fp8_matmul_group_scale",
    )(a_MK, b_KN, sa_MG, sb_G1N)
