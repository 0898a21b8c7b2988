"""Gated linear attention as Pallas TPU (Mosaic) kernels: forward and backward.

The grid is (B, H, V/block_v, T/block_t): the last axis walks the sequence in order
("arbitrary") carrying the float32 state P = Sᵀ [block_v, K] in VMEM scratch, and each grid
step loops over its chunks of `chunk.CHUNK` tokens with the math of chunk.py. The other axes
are independent ("parallel", split over the TensorCores of a megacore chip). The backward pass
is two sweeps, as the lightning kernel's: forward rebuilding P and writing dq, then reverse
carrying dP and writing dk, dv and the initial state's cotangent. dq and dk sum over V and
feed the gates' gradient (api.py), so each V tile writes a float32 partial; the gates'
gradient is anchored at every block's end, where the forward sweep writes the state and the
reverse sweep reads it back to write Σ_V S ⊙ dS.

Inputs are head-major [B, H, T, ·] with T a multiple of block_t (itself a multiple of the
chunk), zero-padded; b [B, H, T, K] is the chunk-local cumulative sum of the log gates, float32
(zero in whole chunks of padding, so the state neither decays nor grows over them); states are
[B, H, V, K] float32 (transposed). Matmul operands are in the inputs' dtype, accumulation and
the state in float32.

Packed documents (optional `run_BT` [B, T] int32: document starts before each token, padding
repeating the last run) are the masks of `kernels_pallas.documents`, the row of runs cut into
[C]-wide chunks (a dynamic lane offset of 64 is not a whole vreg; a leading index is).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import cost
from kernels_pallas.documents import mask_inputs
from kernels_pallas.gated_linear_attention.chunk import (
    CHUNK,
    SUB_CHUNK,
    Documents,
    dkv_chunk,
    dq_chunk,
    forward_chunk,
    state_product,
)
from kernels_pallas.vma import out_shape

# Four chunks per grid step: several µs of MXU work at K = V = 128, well above a step's
# ~0.35 µs fixed cost, with double-buffered q/k/b/v/o blocks near 1 MiB of VMEM. Untimed (no
# TPU at hand); compiles for v5e, v5p and v6e (tests/kernels_pallas/test_gla_aot.py).
DEFAULT_BLOCK_T = 256


def _check(T, V, block_t, block_v):
    # Mosaic tiles a block's last dim by 128 lanes unless it spans the whole array.
    if block_t % CHUNK or T % block_t or V % block_v or (block_v != V and block_v % 128):
        raise ValueError(
            f"block_t={block_t} must be a multiple of {CHUNK} dividing T={T}, and "
            f"block_v={block_v} must divide V={V} and be V or a multiple of 128"
        )


def _rows(ref, start, n):
    """Rows start..start+n of a block whose last two dims are [rows, ·]."""
    rows = pl.ds(pl.multiple_of(start, SUB_CHUNK), n)
    return (0,) * (ref.ndim - 2) + (rows, slice(None))


def _io(refs, t0):
    """chunk.py's load and store for the chunk starting at row t0 of the block."""

    def load(name, r, n):
        ref = refs[name]
        return ref[_rows(ref, t0 + r, n)]

    def store(name, r, x):
        ref = refs[name]
        ref[_rows(ref, t0 + r, x.shape[0])] = x.astype(ref.dtype)

    return load, store


def _documents(mask_refs, t0, ci):
    """The chunk's `Documents` from the mask blocks (col, row, keep_in, keep_out)."""
    if mask_refs is None:
        return None
    col_ref, row_ref, in_ref, out_ref = mask_refs

    def col(ref):
        return lambda r, n: ref[_rows(ref, t0 + r, n)]

    def same(r, n):
        return (col(col_ref)(r, n) == row_ref[0, ci]).astype(jnp.float32)

    return Documents(same, col(in_ref), col(out_ref), CHUNK)


def _sweep(chunk_fn, refs, mask_refs, carry_scr, block_t, reverse):
    """Run chunk_fn over the block's chunks (in reverse order when reverse), carrying the
    state (or its cotangent) in carry_scr."""
    n_chunks = block_t // CHUNK

    def body(step, carry):
        ci = n_chunks - 1 - step if reverse else step
        t0 = ci * CHUNK
        load, store = _io(refs, t0)
        return chunk_fn(load, store, carry, _documents(mask_refs, t0, ci))

    carry_scr[...] = lax.fori_loop(0, n_chunks, body, carry_scr[...])


def _split(refs, packed):
    return (refs[:4], refs[4:]) if packed else (None, refs)


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, *refs, block_t, packed):
    mask_refs, (o_ref, sT_ref, P_scr) = _split(refs, packed)
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        P_scr[...] = s0_ref[0, 0]

    io = dict(q=q_ref, k=k_ref, v=v_ref, b=b_ref, o=o_ref)
    _sweep(forward_chunk, io, mask_refs, P_scr, block_t, reverse=False)

    @pl.when(n == pl.num_programs(3) - 1)
    def _():
        sT_ref[0, 0] = P_scr[...]


def _dq_kernel(k_ref, v_ref, b_ref, do_ref, s0_ref, *refs, block_t, packed):
    """Also writes the state leaving each block (the gates' gradient is anchored there)."""
    mask_refs, (dq_ref, Sa_ref, P_scr) = _split(refs, packed)

    @pl.when(pl.program_id(3) == 0)
    def _():
        P_scr[...] = s0_ref[0, 0]

    io = dict(k=k_ref, v=v_ref, b=b_ref, do=do_ref, dq=dq_ref)
    _sweep(dq_chunk, io, mask_refs, P_scr, block_t, reverse=False)
    Sa_ref[0, 0, 0] = P_scr[...]


def _dkv_kernel(q_ref, k_ref, v_ref, b_ref, do_ref, dsT_ref, Sa_ref, *refs, block_t, packed):
    """Also writes Σ_V S ⊙ dS for the state leaving each block (a partial over this V tile)."""
    mask_refs, (dk_ref, dv_ref, ds0_ref, r_ref, dP_scr) = _split(refs, packed)
    n = pl.program_id(3)

    @pl.when(n == 0)
    def _():
        dP_scr[...] = dsT_ref[0, 0]

    r_ref[0, 0, 0, 0] = state_product(Sa_ref[0, 0, 0], dP_scr[...])
    io = dict(q=q_ref, k=k_ref, v=v_ref, b=b_ref, do=do_ref, dk=dk_ref, dv=dv_ref)
    _sweep(dkv_chunk, io, mask_refs, dP_scr, block_t, reverse=True)

    @pl.when(n == pl.num_programs(3) - 1)
    def _():
        ds0_ref[0, 0] = dP_scr[...]


class _Specs:
    """BlockSpecs on the (B, H, V tile, T block) grid, walking the blocks as block(n)."""

    def __init__(self, K, block_t, block_v, n_blocks, reverse):
        def blk(n):
            return n_blocks - 1 - n if reverse else n

        self.TK = pl.BlockSpec((1, 1, block_t, K), lambda b, h, e, n: (b, h, blk(n), 0))
        self.TV = pl.BlockSpec((1, 1, block_t, block_v), lambda b, h, e, n: (b, h, blk(n), e))
        self.VK = pl.BlockSpec((1, 1, block_v, K), lambda b, h, e, n: (b, h, e, 0))
        # The state leaving each block, and Σ_V S ⊙ dS there (a partial per V tile).
        self.anchor = pl.BlockSpec((1, 1, 1, block_v, K), lambda b, h, e, n: (b, h, blk(n), e, 0))
        self.r = pl.BlockSpec((1, 1, 1, 1, 1, K), lambda b, h, e, n: (e, b, h, blk(n), 0, 0))
        # A float32 partial of dq or dk per V tile.
        self.part = pl.BlockSpec((1, 1, 1, block_t, K), lambda b, h, e, n: (e, b, h, blk(n), 0))
        col = pl.BlockSpec((1, block_t, 1), lambda b, h, e, n: (b, blk(n), 0))
        row = pl.BlockSpec((1, block_t // CHUNK, 1, CHUNK), lambda b, h, e, n: (b, blk(n), 0, 0))
        self.masks = [col, row, col, col]


def _masks(run_BT):
    """mask_inputs for chunks of CHUNK tokens, the row cut into chunks [B, T/C, 1, C]."""
    if run_BT is None:
        return []
    col, row, keep_in, keep_out = mask_inputs(run_BT, CHUNK)
    B, _, T = row.shape
    return [col, row.reshape(B, T // CHUNK, 1, CHUNK), keep_in, keep_out]


def _call(kernel, grid, in_specs, out_specs, out_shapes, scratch, interpret, *, sweep, inputs):
    """The kernel on the (B, H, V tile, T block) grid; `sweep` and `inputs` give the FLOPs and
    bytes it declares (`kernels_pallas.cost`)."""
    sem = (pltpu.PARALLEL,) * 3 + (pltpu.ARBITRARY,)
    B, H, T, K = inputs[0].shape
    V = inputs[2].shape[-1]
    block_v = V // grid[2]
    flops = cost.chunked_linear(
        sweep, B, H, T, K, V, C=CHUNK, block_v=block_v, arrays=[*inputs, *out_shapes]
    )
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=sem),
        cost_estimate=flops,
        interpret=interpret,
    )


@functools.partial(jax.jit, static_argnames=("block_t", "block_v", "interpret"))
def forward(q_BHTK, k_BHTK, v_BHTV, b_BHTK, s0_BHVK, *, run_BT=None, block_t, block_v,
            interpret=False):  # fmt: skip
    """(o [B, H, T, V] in q's dtype, final state [B, H, V, K] float32).

    q, k [B, H, T, K] and v [B, H, T, V] in one dtype; b [B, H, T, K] float32 chunk-local
    cumulative log gates; s0 [B, H, V, K] float32 (transposed state); run_BT None or [B, T]
    int32 document runs. T a multiple of block_t (a multiple of 64), V of block_v.
    """
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[-1]
    _check(T, V, block_t, block_v)
    spec = _Specs(K, block_t, block_v, T // block_t, reverse=False)
    packed = run_BT is not None
    inputs = (q_BHTK, k_BHTK, v_BHTV, b_BHTK, s0_BHVK)
    return _call(
        functools.partial(_fwd_kernel, block_t=block_t, packed=packed),
        (B, H, V // block_v, T // block_t),
        [spec.TK, spec.TK, spec.TV, spec.TK, spec.VK, *(spec.masks if packed else [])],
        [spec.TV, spec.VK],
        [
            out_shape((B, H, T, V), q_BHTK.dtype, *inputs),
            out_shape((B, H, V, K), jnp.float32, *inputs),
        ],
        [pltpu.VMEM((block_v, K), jnp.float32)],
        interpret,
        sweep="forward",
        inputs=inputs,
    )(*inputs, *_masks(run_BT))


@functools.partial(jax.jit, static_argnames=("block_t", "block_v", "interpret"))
def backward(q, k, v, b, s0, do_BHTV, dsT_BHVK, *, run_BT=None, block_t, block_v,
             interpret=False):  # fmt: skip
    """(dq, dk [B, H, T, K] float32, dv [B, H, T, V] in v's dtype, ds0 [B, H, V, K] float32,
    r [B, H, T/block_t, K] float32): the cotangents of `forward`'s q, k, v and s0 given
    do [B, H, T, V] and the final state's cotangent dsT [B, H, V, K], and Σ_V S ⊙ dS for the
    state leaving each block, from which with dq and dk api.py forms the gates' gradient."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    _check(T, V, block_t, block_v)
    NV, NB = V // block_v, T // block_t
    grid = (B, H, NV, NB)
    packed = run_BT is not None
    masks = _masks(run_BT)
    inputs = (q, k, v, b, do_BHTV, s0, dsT_BHVK)
    part = out_shape((NV, B, H, T, K), jnp.float32, *inputs)
    state = [pltpu.VMEM((block_v, K), jnp.float32)]
    kw = dict(block_t=block_t, packed=packed)

    spec = _Specs(K, block_t, block_v, NB, reverse=False)
    dq, Sa = _call(
        functools.partial(_dq_kernel, **kw),
        grid,
        [spec.TK, spec.TV, spec.TK, spec.TV, spec.VK, *(spec.masks if packed else [])],
        [spec.part, spec.anchor],
        [part, out_shape((B, H, NB, V, K), jnp.float32, *inputs)],
        state,
        interpret,
        sweep="dq",
        inputs=inputs,
    )(k, v, b, do_BHTV, s0, *masks)

    spec = _Specs(K, block_t, block_v, NB, reverse=True)
    dk, dv, ds0, r = _call(
        functools.partial(_dkv_kernel, **kw),
        grid,
        [
            spec.TK,
            spec.TK,
            spec.TV,
            spec.TK,
            spec.TV,
            spec.VK,
            spec.anchor,
            *(spec.masks if packed else []),
        ],
        [spec.part, spec.TV, spec.VK, spec.r],
        [
            part,
            out_shape((B, H, T, V), v.dtype, *inputs),
            out_shape((B, H, V, K), jnp.float32, *inputs),
            out_shape((NV, B, H, NB, 1, K), jnp.float32, *inputs),
        ],
        state,
        interpret,
        sweep="dkv",
        inputs=inputs,
    )(q, k, v, b, do_BHTV, dsT_BHVK, Sa, *masks)
    return dq.sum(0), dk.sum(0), dv, ds0, r.sum(0)[:, :, :, 0]
