"""Gated linear attention on GPU: Pallas kernels through the Triton lowering.

As the lightning GPU kernel (`kernels_pallas.lightning_attention.gpu`, whose docstring says
why Triton and not Mosaic GPU) and fla's `chunk_gla`: every program owns one (batch·head,
V tile) pair and walks the sequence with a `fori_loop` over chunks of `chunk.CHUNK` tokens, its
float32 state P = Sᵀ [block_v, K] in registers, running the math of chunk.py: the forward and
the dq kernel sweep forwards rebuilding P, the dk/dv kernel sweeps backwards carrying dP. dq
and dk sum over V and feed the gates' gradient (api.py), so each V tile writes a float32
partial that XLA adds up.

Inputs are head-major [B, H, T, ·], T a multiple of the chunk (zero-padded; b is 0 in whole
chunks of padding), K and V powers of two ≥ 64 (api.py pads them), states [B, H, V, K] float32.
Packed rows (`run_BT`) read the masks of `kernels_pallas.documents`: a program reads its batch
row's whole [T, 1] column and [1, T] row of runs.

Triton wants power-of-two tiles and 16 rows for an MMA: the sub-chunk (16), the chunk (64),
K and block_v are. Block sizes and warps are untuned (no GPU was at hand when this was
written).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.documents import mask_inputs
from kernels_pallas.gated_linear_attention.chunk import (
    CHUNK,
    Documents,
    dkv_chunk,
    dq_chunk,
    forward_chunk,
    state_product,
)
from kernels_pallas.vma import out_shape

# block_v by device_kind substring, first match wins: 64 on the Hopper/Blackwell parts (227 KiB
# of shared memory; B·H·V/64 programs fill 132 SMs at B4 H32 V128), else 32 (A100 has 163 KiB,
# consumer parts 99 KiB).
BLOCK_V = ((("H100", "H200", "H800", "GH200", "B200", "B100", "GB200"), 64),)
FALLBACK_BLOCK_V = 32
# The gates' gradient is anchored every SEGMENT_CHUNKS chunks (api.py): the dq sweep writes the
# state there, [B·H, T/256, V, K] float32 (as many bytes per token as bf16 q at K = V = 128).
SEGMENT_CHUNKS = 4


def segments(T):
    """How many anchored segments of SEGMENT_CHUNKS chunks T tokens make (the last may be
    short)."""
    return -(-T // (SEGMENT_CHUNKS * CHUNK))


def default_block_v(device_kind):
    """V columns per program for a GPU named by `jax.Device.device_kind`."""
    for names, block_v in BLOCK_V:
        if any(name in device_kind for name in names):
            return block_v
    return FALLBACK_BLOCK_V


def _check(q, v, block_v):
    T, K, V = q.shape[2], q.shape[3], v.shape[3]
    for name, size in (("K", K), ("block_v", block_v)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two ≥ 16 for Triton, got {size}")
    if T % CHUNK or V % block_v:
        raise ValueError(f"T={T} must be a multiple of {CHUNK} and V={V} of block_v={block_v}")


def _compiler_params(K, block_v):
    # A [64, K] float32 tile is 64·K/32 registers per thread at 4 warps: 8 warps past K = 64.
    return pltriton.CompilerParams(num_warps=4 if K * block_v <= 64 * 64 else 8, num_stages=1)


def _io(refs, t0):
    """chunk.py's load and store for the chunk starting at token t0."""

    def rows(r, n):
        return pl.ds(pl.multiple_of(t0 + r, 16), n)

    def load(name, r, n):
        return refs[name][rows(r, n), :]

    def store(name, r, x):
        refs[name][rows(r, x.shape[0]), :] = x.astype(refs[name].dtype)

    return load, store


def _documents(mask_refs, t0):
    if mask_refs is None:
        return None
    col_ref, row_ref, in_ref, out_ref = mask_refs

    def col(ref):
        return lambda r, n: ref[pl.ds(t0 + r, n), :]

    def same(r, n):
        return (col(col_ref)(r, n) == row_ref[:, pl.ds(t0, CHUNK)]).astype(jnp.float32)

    return Documents(same, col(in_ref), col(out_ref), CHUNK)


def _sweep(chunk_fn, refs, mask_refs, carry, n_chunks, reverse, at_anchor=None):
    """chunk_fn over the chunks, carrying the state (or its cotangent); at_anchor(segment,
    carry) runs where that carry is the state leaving a segment (or its cotangent): after the
    segment's last chunk going forwards, before it going backwards."""

    def body(step, carry):
        n = n_chunks - 1 - step if reverse else step
        # The segment's last chunk (one comparison: Triton's lowering mixes up i1 and i32 in a
        # logical_or of two).
        anchor = n == jnp.minimum((n // SEGMENT_CHUNKS + 1) * SEGMENT_CHUNKS, n_chunks) - 1
        if reverse and at_anchor is not None:
            pl.when(anchor)(lambda: at_anchor(n // SEGMENT_CHUNKS, carry))
        t0 = pl.multiple_of(n * CHUNK, CHUNK)
        load, store = _io(refs, t0)
        carry = chunk_fn(load, store, carry, _documents(mask_refs, t0))
        if not reverse and at_anchor is not None:
            pl.when(anchor)(lambda: at_anchor(n // SEGMENT_CHUNKS, carry))
        return carry

    return lax.fori_loop(0, n_chunks, body, carry)


def _split(refs, packed):
    return (refs[:4], refs[4:]) if packed else (None, refs)


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, *refs, packed):
    mask_refs, (o_ref, sT_ref) = _split(refs, packed)
    io = dict(q=q_ref, k=k_ref, v=v_ref, b=b_ref, o=o_ref)
    n_chunks = q_ref.shape[0] // CHUNK
    sT_ref[...] = _sweep(forward_chunk, io, mask_refs, s0_ref[...], n_chunks, reverse=False)


def _dq_kernel(k_ref, v_ref, b_ref, do_ref, s0_ref, *refs, packed):
    """Also writes the state leaving each segment (the gates' gradient is anchored there)."""
    mask_refs, (dq_ref, Sa_ref) = _split(refs, packed)
    io = dict(k=k_ref, v=v_ref, b=b_ref, do=do_ref, dq=dq_ref)

    def at_anchor(segment, P_VK):
        Sa_ref[segment] = P_VK

    n_chunks = k_ref.shape[0] // CHUNK
    _sweep(dq_chunk, io, mask_refs, s0_ref[...], n_chunks, reverse=False, at_anchor=at_anchor)


def _dkv_kernel(q_ref, k_ref, v_ref, b_ref, do_ref, dsT_ref, Sa_ref, *refs, packed):
    """Also writes Σ_V S ⊙ dS for the state leaving each segment (a partial over this V
    tile)."""
    mask_refs, (dk_ref, dv_ref, ds0_ref, r_ref) = _split(refs, packed)
    io = dict(q=q_ref, k=k_ref, v=v_ref, b=b_ref, do=do_ref, dk=dk_ref, dv=dv_ref)

    def at_anchor(segment, dP_VK):
        r_ref[pl.ds(segment, 1), :] = state_product(Sa_ref[segment], dP_VK)

    n_chunks = q_ref.shape[0] // CHUNK
    ds0_ref[...] = _sweep(dkv_chunk, io, mask_refs, dsT_ref[...], n_chunks, reverse=True,
                          at_anchor=at_anchor)  # fmt: skip


def _flat(x):
    """[B, H, ...] → [B·H, ...] (a free reshape)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


class _Specs:
    """BlockSpecs on the (batch·head, V tile) grid."""

    def __init__(self, T, K, block_v, H):
        self.TK = pl.BlockSpec((None, T, K), lambda bh, iv: (bh, 0, 0))
        self.TV = pl.BlockSpec((None, T, block_v), lambda bh, iv: (bh, 0, iv))
        self.VK = pl.BlockSpec((None, block_v, K), lambda bh, iv: (bh, iv, 0))
        self.part = pl.BlockSpec((None, None, T, K), lambda bh, iv: (iv, bh, 0, 0))
        # The state leaving each segment, and Σ_V S ⊙ dS there (a partial per V tile).
        S = segments(T)
        self.anchor = pl.BlockSpec((None, S, block_v, K), lambda bh, iv: (bh, 0, iv, 0))
        self.r = pl.BlockSpec((None, None, S, K), lambda bh, iv: (iv, bh, 0, 0))
        col = pl.BlockSpec((None, T, 1), lambda bh, iv: (bh // H, 0, 0))
        row = pl.BlockSpec((None, 1, T), lambda bh, iv: (bh // H, 0, 0))
        self.masks = [col, row, col, col]


def _call(kernel, name, grid, in_specs, out_specs, out_shapes, K, block_v, interpret):
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shapes,
        compiler_params=_compiler_params(K, block_v),
        interpret=interpret,
        name=name,
    )


@functools.partial(jax.jit, static_argnames=("block_v", "interpret"))
def forward(q_BHTK, k_BHTK, v_BHTV, b_BHTK, s0_BHVK, *, run_BT=None, block_v, interpret=False):
    """(o [B, H, T, V] in q's dtype, final state [B, H, V, K] float32); arguments as
    `tpu.forward` (T a multiple of 64, K and block_v powers of two)."""
    _check(q_BHTK, v_BHTV, block_v)
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[3]
    spec = _Specs(T, K, block_v, H)
    packed = run_BT is not None
    inputs = [_flat(x) for x in (q_BHTK, k_BHTK, v_BHTV, b_BHTK, s0_BHVK)]
    masks = list(mask_inputs(run_BT, CHUNK)) if packed else []
    o, sT = _call(
        functools.partial(_fwd_kernel, packed=packed),
        "gated_linear_attention_fwd",
        (B * H, V // block_v),
        [spec.TK, spec.TK, spec.TV, spec.TK, spec.VK, *(spec.masks if packed else [])],
        [spec.TV, spec.VK],
        [
            out_shape((B * H, T, V), q_BHTK.dtype, *inputs),
            out_shape((B * H, V, K), jnp.float32, *inputs),
        ],
        K,
        block_v,
        interpret,
    )(*inputs, *masks)
    return o.reshape(B, H, T, V), sT.reshape(B, H, V, K)


@functools.partial(jax.jit, static_argnames=("block_v", "interpret"))
def backward(q, k, v, b, s0, do_BHTV, dsT_BHVK, *, run_BT=None, block_v, interpret=False):
    """(dq, dk [B, H, T, K] float32, dv [B, H, T, V] in v's dtype, ds0 [B, H, V, K] float32,
    r [B, H, segments(T), K] float32); arguments as `tpu.backward`, whose r is per block of
    block_t tokens where this one's is per SEGMENT_CHUNKS chunks."""
    _check(q, v, block_v)
    B, H, T, K = q.shape
    V = v.shape[3]
    NV = V // block_v
    spec = _Specs(T, K, block_v, H)
    packed = run_BT is not None
    masks = list(mask_inputs(run_BT, CHUNK)) if packed else []
    mask_specs = spec.masks if packed else []
    q, k, v, b, s0, do, dsT = (_flat(x) for x in (q, k, v, b, s0, do_BHTV, dsT_BHVK))
    inputs = (q, k, v, b, s0, do, dsT)
    part = out_shape((NV, B * H, T, K), jnp.float32, *inputs)
    common = dict(grid=(B * H, NV), K=K, block_v=block_v, interpret=interpret)
    S = segments(T)
    dq, Sa = _call(
        functools.partial(_dq_kernel, packed=packed),
        "gated_linear_attention_bwd_dq",
        in_specs=[spec.TK, spec.TV, spec.TK, spec.TV, spec.VK, *mask_specs],
        out_specs=[spec.part, spec.anchor],
        out_shapes=[part, out_shape((B * H, S, V, K), jnp.float32, *inputs)],
        **common,
    )(k, v, b, do, s0, *masks)
    dk, dv, ds0, r = _call(
        functools.partial(_dkv_kernel, packed=packed),
        "gated_linear_attention_bwd_dkdv",
        in_specs=[spec.TK, spec.TK, spec.TV, spec.TK, spec.TV, spec.VK, spec.anchor, *mask_specs],
        out_specs=[spec.part, spec.TV, spec.VK, spec.r],
        out_shapes=[
            part,
            out_shape((B * H, T, V), v.dtype, *inputs),
            out_shape((B * H, V, K), jnp.float32, *inputs),
            out_shape((NV, B * H, S, K), jnp.float32, *inputs),
        ],
        **common,
    )(q, k, v, b, do, dsT, Sa, *masks)

    def unflat(x):
        return x.reshape(B, H, *x.shape[1:])

    return unflat(dq.sum(0)), unflat(dk.sum(0)), unflat(dv), unflat(ds0), unflat(r.sum(0))
