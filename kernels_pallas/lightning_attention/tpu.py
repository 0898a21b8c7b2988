"""Lightning Attention-2 as Pallas TPU (Mosaic) kernels: forward and backward.

Per batch element b and head h, with λ = exp(g_h) (g_h ≤ 0) and the sequence cut into chunks
of C tokens (j, i the positions inside a chunk, L the chunk's count of real tokens):

    O_intra = [(Q Kᵀ) ⊙ D] V,   D_ji = λ^{j−i} (j ≥ i, else 0)
    O_inter = diag(λ^{j+1}) Q S
    S ← λ^L S + (diag(λ^{L−1−i}) K)ᵀ V

Only powers λ^p with p ≥ 0 are formed. The grid is (B, H, V/block_v, T/block_t): the last
axis walks the sequence in order ("arbitrary") and carries the float32 [K, block_v] state in
VMEM scratch; each grid step loads block_t tokens and loops over its chunks of C ≤ block_t
tokens, so a step does enough work to hide the pipeline's per-step cost while the quadratic
intra-chunk part stays at C tokens. The other axes are independent ("parallel", split over
the TensorCores of a megacore chip).

The backward pass (Lightning Attention-2 §3.3), in two sequential sweeps:
- forward sweep: rebuild S chunk by chunk; dQ = [(dO Vᵀ) ⊙ D] K + diag(λ^{j+1}) dO Sᵀ;
- reverse sweep with dS (the cotangent of the state entering the chunk, seeded with the
  final state's cotangent): dK = [(dO Vᵀ) ⊙ D]ᵀ Q + diag(λ^{L−1−i}) V dSᵀ,
  dV = [(Q Kᵀ) ⊙ D]ᵀ dO + diag(λ^{L−1−i}) K dS, then dS ← λ^L dS + (diag(λ^{j+1}) Q)ᵀ dO;
  after the first chunk dS is the initial state's cotangent.
dQ and dK sum over V, so with several V tiles each tile writes a float32 partial and the
wrapper adds them.

With `decay_grad` the reverse sweep also returns dL/dg (a per-(b, h, V tile) partial), summed
over every place λ enters, each weighted by its exponent (d λ^p / dg = p λ^p):
- inside the chunk: Σ_{j≥i} (j−i) D_ji (q_j·k_i)(dO_j·v_i);
- keys into the outgoing state: Σ_i (L−1−i) λ^{L−1−i} k_i·(dS_{n+1} v_i);
- the incoming state S_n, read by the queries with λ^{j+1} and carried on with λ^L:
  Σ_n ⟨S_n, X_n⟩, X_n = (diag((j+1) λ^{j+1}) Q)ᵀ dO + L λ^L dS_{n+1}. The reverse sweep has
  no S_n, but S_n is a decayed sum of the earlier chunks' key sums M_m and of S₀, so this is
  Σ_m ⟨M_m, W_{m+1}⟩ + ⟨S₀, W_0⟩ with W_n = X_n + λ^L W_{n+1} carried like dS.
No term cancels another, unlike the shortcut Σ_t (t+1)(q_t·dq_t − k_t·dk_t), whose terms
grow with t while their sum does not: in bfloat16 its error reached 30% at λ = 0.3. The
matmuls that feed dL/dg, and with them dS's update, take float32 operands (bfloat16 ones left
it 3% off at weak decay): four [C, K]·[K, block_v]-sized float32 products per chunk, three
more than without (one replaces dS's bfloat16 one), paid only when the decay is learned
(api.py asks for dL/dg only then).

Packed documents (optional `run_BT`, [B, T] int32: how many document starts precede each
token; padded tokens repeat the last run) reset the state at each document start: each chunk's
D, q decays, k decays and state decay are multiplied by the masks of `documents.py`, the same
in the forward and both backward sweeps. Without `run_BT` none of this is traced.

Inputs are head-major [B, H, T, K], T zero-padded to a multiple of block_t, K and V to
multiples of 64; `seq_len` is the true length, so the state never decays over the padding.
Matmul operands are in the input dtype, accumulation and the state in float32.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import cost
from kernels_pallas.documents import mask_inputs
from kernels_pallas.vma import out_shape

# (block_t, chunk) per TPU generation, chosen from the hardware, not yet timed on a chip: the
# chunk is the MXU's width (128 on v4/v5e/v5p, 256 on v6e and later); block_t = 4 chunks makes
# one grid step several µs of MXU work at K=V=128, well above the ~0.35 µs fixed cost of a
# step, while the double-buffered q/k/v/o blocks stay near 1-2 MiB of VMEM. All compile for
# v5e, v5p and v6e (tests/kernels_pallas/test_lightning_aot.py).
BLOCK_SIZES = {
    "v4": (512, 128),
    "v5e": (512, 128),
    "v5p": (512, 128),
    "v6e": (1024, 256),
    "v7": (1024, 256),
}
DEFAULT_BLOCK_SIZES = (512, 128)


def default_block_sizes(device_kind: str) -> tuple[int, int]:
    """(block_t, chunk) for a TPU `jax.Device.device_kind` such as "TPU v5 lite"; unknown kinds
    (and non-TPU devices) get sizes valid on every generation."""
    kind = device_kind.lower().replace("tpu", "").replace(" ", "")
    aliases = {"v5lite": "v5e", "v6lite": "v6e", "v5": "v5p", "v4lite": "v4", "7": "v7",
               "7x": "v7"}  # fmt: skip
    return BLOCK_SIZES.get(aliases.get(kind, kind), DEFAULT_BLOCK_SIZES)


def _check(T, V, seq_len, block_t, block_v):
    # The grid is T // block_t by V // block_v: a remainder would be left unwritten.
    if T % block_t or V % block_v:
        raise ValueError(f"block_t={block_t} and block_v={block_v} must divide T={T} and V={V}")
    if not 0 < seq_len <= T:
        raise ValueError(f"seq_len must be in (0, T={T}], got {seq_len}")


def _chunk_for(block_t: int, chunk: int | None) -> int:
    if chunk is None:
        chunk = DEFAULT_BLOCK_SIZES[1]
    chunk = min(chunk, block_t)
    if block_t % chunk:
        raise ValueError(f"block_t ({block_t}) must be a multiple of the chunk ({chunk})")
    return chunk


def _rows(shape, dim=0):
    return lax.broadcasted_iota(jnp.int32, shape, dim).astype(jnp.float32)


def _pow(g, p):
    """λ^p = exp(g·p) for an array p ≥ 0 of exponents."""
    return jnp.exp(g * p)


def _decay_mask(g, C):
    """D [C, C]: λ^{j−i} below and on the diagonal, 0 above."""
    dist = _rows((C, C), 0) - _rows((C, C), 1)
    return jnp.where(dist >= 0, _pow(g, jnp.maximum(dist, 0.0)), 0.0)


def _dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_t(a, b):
    """a bᵀ, contracting the last axes."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _t_dot(a, b):
    """aᵀ b, contracting the first axes."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _chunk_len(seq_len, start, C):
    """Real tokens in the chunk of C tokens from `start` (C except in the padded tail)."""
    return jnp.clip(seq_len - start, 0, C).astype(jnp.float32)


def _params(interpret, n_parallel):
    sem = (pltpu.PARALLEL,) * n_parallel + (pltpu.ARBITRARY,)
    return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=sem), interpret=interpret)


def _g_spec():
    return pl.BlockSpec(memory_space=pltpu.SMEM)


def _masks(run_BT, C, block_t):
    """`documents.mask_inputs` with the row of runs cut into blocks, [B, T/block_t, 1, block_t]:
    a (1, 1, block_t) block of a [B, 1, T] row is not a multiple of 128 lanes when block_t is
    64, which Mosaic rejects; a block spanning the last two dims is always accepted."""
    col, row, keep_in, keep_out = mask_inputs(run_BT, C)
    B, _, T = row.shape
    return col, row.reshape(B, T // block_t, 1, block_t), keep_in, keep_out


def _mask_specs(block_t, block):
    col = pl.BlockSpec((1, block_t, 1), lambda b, h, e, n: (b, block(n), 0))
    row = pl.BlockSpec((1, 1, 1, block_t), lambda b, h, e, n: (b, block(n), 0, 0))
    return [col, row, col, col]


def _split(refs, packed):
    """The kernel's trailing refs → (the four mask refs or None, the rest)."""
    return (refs[:4], refs[4:]) if packed else (None, refs)


def _chunk_masks(mask_refs, rows):
    """(same [C, C], keep_in [C, 1], keep_out [C, 1], keep_state [1, 1]) float32 for the
    chunk at `rows`: [run_j = run_i], [run_j = p], [run_i = l] and [l = p]."""
    col_ref, row_ref, in_ref, out_ref = mask_refs
    same = (col_ref[0, rows, :] == row_ref[0, 0, :, rows]).astype(jnp.float32)
    keep_in = in_ref[0, rows, :]
    return same, keep_in, out_ref[0, rows, :], jnp.min(keep_in, axis=0, keepdims=True)


def _chunk_decays(g, L, j, D, mask_refs, rows):
    """(D, q_decay [C, 1], k_decay [C, 1], state decay [1, 1]) of one chunk of L real tokens,
    masked by the documents when packed."""
    q_decay = _pow(g, j + 1.0)
    k_decay = _pow(g, jnp.maximum(L - 1.0 - j, 0.0))
    s_decay = _pow(g, jnp.full((1, 1), L))
    if mask_refs is None:
        return D, q_decay, k_decay, s_decay
    same, keep_in, keep_out, keep_state = _chunk_masks(mask_refs, rows)
    return D * same, q_decay * keep_in, k_decay * keep_out, s_decay * keep_state


def _fwd_kernel(g_ref, q_ref, k_ref, v_ref, s0_ref, *refs, seq_len, block_t, C, packed):
    mask_refs, (o_ref, sT_ref, s_scr, d_scr) = _split(refs, packed)
    n = pl.program_id(3)
    g = g_ref[pl.program_id(1)]

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[0, 0]
        d_scr[...] = _decay_mask(g, C)

    j = _rows((C, 1))

    def chunk(c, carry):
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        q, k, v = q_ref[0, 0, rows, :], k_ref[0, 0, rows, :], v_ref[0, 0, rows, :]
        L = _chunk_len(seq_len, n * block_t + c * C, C)
        D, q_decay, k_decay, s_decay = _chunk_decays(g, L, j, d_scr[...], mask_refs, rows)
        S = s_scr[...]
        scores = _dot_t(q, k) * D
        o = _dot(scores.astype(v.dtype), v) + _dot(q, S.astype(q.dtype)) * q_decay
        o_ref[0, 0, rows, :] = o.astype(o_ref.dtype)
        kd = (k.astype(jnp.float32) * k_decay).astype(v.dtype)
        s_scr[...] = s_decay * S + _t_dot(kd, v)
        return carry

    lax.fori_loop(0, block_t // C, chunk, 0)

    @pl.when(n == pl.num_programs(3) - 1)
    def _():
        sT_ref[0, 0] = s_scr[...]


@functools.partial(jax.jit, static_argnames=("seq_len", "block_t", "block_v", "chunk", "interpret"))
def forward(q_BHTK, k_BHTK, v_BHTV, g_H, s0_BHKV, *, run_BT=None, seq_len, block_t, block_v,
            chunk=None, interpret=False):  # fmt: skip
    """o [B, H, T, V] in q's dtype and the final state sT [B, H, K, V] float32.

    q, k [B, H, T, K], v [B, H, T, V] (T a multiple of block_t, zero beyond seq_len),
    g_H [H] float32 log decay ≤ 0, s0 [B, H, K, V] float32. block_v must divide V; chunk
    (default 128, at most block_t) must divide block_t. run_BT: None, or [B, T] int32 document
    runs for packed rows (nondecreasing; the padding repeats the last run).
    """
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[-1]
    _check(T, V, seq_len, block_t, block_v)
    C = _chunk_for(block_t, chunk)
    grid = (B, H, V // block_v, T // block_t)
    qk_spec = pl.BlockSpec((1, 1, block_t, K), lambda b, h, e, n: (b, h, n, 0))
    v_spec = pl.BlockSpec((1, 1, block_t, block_v), lambda b, h, e, n: (b, h, n, e))
    s_spec = pl.BlockSpec((1, 1, K, block_v), lambda b, h, e, n: (b, h, 0, e))
    packed = run_BT is not None
    kernel = functools.partial(_fwd_kernel, seq_len=seq_len, block_t=block_t, C=C, packed=packed)
    inputs = (g_H.astype(jnp.float32), q_BHTK, k_BHTK, v_BHTV, s0_BHKV.astype(jnp.float32))
    in_specs = [_g_spec(), qk_spec, qk_spec, v_spec, s_spec]
    masks = _masks(run_BT, C, block_t) if packed else ()
    if packed:
        in_specs += _mask_specs(block_t, lambda n: n)
    outs = [
        out_shape((B, H, T, V), q_BHTK.dtype, *inputs),
        out_shape((B, H, K, V), jnp.float32, *inputs),
    ]
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[v_spec, s_spec],
        out_shape=outs,
        scratch_shapes=[pltpu.VMEM((K, block_v), jnp.float32), pltpu.VMEM((C, C), jnp.float32)],
        cost_estimate=cost.chunked_linear(
            "forward", B, H, T, K, V, C=C, block_v=block_v, arrays=[*inputs, *outs]
        ),
        **_params(interpret, 3),
    )(*inputs, *masks)


def _dq_kernel(g_ref, k_ref, v_ref, do_ref, s0_ref, *refs, seq_len, block_t, C, packed):
    """Forward sweep: rebuild S and write dQ (a partial over this V tile)."""
    mask_refs, (dq_ref, s_scr, d_scr) = _split(refs, packed)
    n = pl.program_id(3)
    g = g_ref[pl.program_id(1)]

    @pl.when(n == 0)
    def _():
        s_scr[...] = s0_ref[0, 0]
        d_scr[...] = _decay_mask(g, C)

    j = _rows((C, 1))

    def chunk(c, carry):
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        k, v, do = k_ref[0, 0, rows, :], v_ref[0, 0, rows, :], do_ref[0, 0, rows, :]
        L = _chunk_len(seq_len, n * block_t + c * C, C)
        D, q_decay, k_decay, s_decay = _chunk_decays(g, L, j, d_scr[...], mask_refs, rows)
        S = s_scr[...]
        dp = _dot_t(do, v) * D
        dq = _dot(dp.astype(k.dtype), k) + _dot_t(do, S.astype(do.dtype)) * q_decay
        dq_ref[0, 0, 0, rows, :] = dq.astype(dq_ref.dtype)
        kd = (k.astype(jnp.float32) * k_decay).astype(v.dtype)
        s_scr[...] = s_decay * S + _t_dot(kd, v)
        return carry

    lax.fori_loop(0, block_t // C, chunk, 0)


def _total(x):
    """The sum of a 2-D array as a [1, 1] array."""
    return jnp.sum(jnp.sum(x, axis=1, keepdims=True), axis=0, keepdims=True)


def _dkv_kernel(g_ref, q_ref, k_ref, v_ref, do_ref, dsT_ref, *refs, seq_len, block_t, C,
                n_blocks, packed, decay_grad):  # fmt: skip
    """Reverse sweep over blocks (and chunks) with dS: write dK (a partial), dV and dS₀, and
    with decay_grad dL/dg (a partial over this V tile, broadcast along a row of 128 lanes)."""
    mask_refs, refs = _split(refs, packed)
    if decay_grad:
        s0_ref, dk_ref, dv_ref, ds0_ref, dg_ref, ds_scr, d_scr, w_scr, dg_scr = refs
    else:
        dk_ref, dv_ref, ds0_ref, ds_scr, d_scr = refs
    n = pl.program_id(3)
    g = g_ref[pl.program_id(1)]

    @pl.when(n == 0)
    def _():
        ds_scr[...] = dsT_ref[0, 0]
        d_scr[...] = _decay_mask(g, C)
        if decay_grad:
            w_scr[...] = jnp.zeros_like(w_scr)
            dg_scr[...] = jnp.zeros_like(dg_scr)

    j = _rows((C, 1))
    n_chunks = block_t // C
    # j − i on and below the diagonal (D is zero above it).
    dist = jnp.maximum(_rows((C, C), 0) - _rows((C, C), 1), 0.0) if decay_grad else None

    def chunk(r, carry):
        c = n_chunks - 1 - r
        rows = pl.ds(pl.multiple_of(c * C, C), C)
        q, k = q_ref[0, 0, rows, :], k_ref[0, 0, rows, :]
        v, do = v_ref[0, 0, rows, :], do_ref[0, 0, rows, :]
        L = _chunk_len(seq_len, (n_blocks - 1 - n) * block_t + c * C, C)
        D, q_decay, k_decay, s_decay = _chunk_decays(g, L, j, d_scr[...], mask_refs, rows)
        dS = ds_scr[...]
        dov = _dot_t(do, v)
        dp = dov * D
        p = _dot_t(q, k) * D
        v_dS = _dot_t(v, dS.astype(v.dtype))
        dk = _t_dot(dp.astype(q.dtype), q) + v_dS * k_decay
        dv = _t_dot(p.astype(do.dtype), do) + _dot(k, dS.astype(k.dtype)) * k_decay
        dk_ref[0, 0, 0, rows, :] = dk.astype(dk_ref.dtype)
        dv_ref[0, 0, rows, :] = dv.astype(dv_ref.dtype)
        if decay_grad:
            # W holds W_{n+1} here: the terms of the module docstring, then W ← W_n and dS.
            # Their matmuls (and dS's) take float32 operands: the terms partly cancel, and
            # bfloat16 ones (q·λ^{j+1} into dS, dS, W) put dL/dg off by 3% at weak decay.
            f32 = jnp.float32
            q32, v32, do32, W = q.astype(f32), v.astype(f32), do.astype(f32), w_scr[...]
            k_power = jnp.maximum(L - 1.0 - j, 0.0)
            k_terms = k.astype(f32) * k_decay * (k_power * _dot_t(v32, dS) + _dot_t(v32, W))
            dg_scr[...] += _total(p * dov * dist) + _total(k_terms)
            w_scr[...] = _t_dot(q32 * (q_decay * (j + 1.0)), do32) + s_decay * (L * dS + W)
            ds_scr[...] = s_decay * dS + _t_dot(q32 * q_decay, do32)
        else:
            qd = (q.astype(jnp.float32) * q_decay).astype(do.dtype)
            ds_scr[...] = s_decay * dS + _t_dot(qd, do)
        return carry

    lax.fori_loop(0, n_chunks, chunk, 0)

    @pl.when(n == pl.num_programs(3) - 1)
    def _():
        ds0_ref[0, 0] = ds_scr[...]
        if decay_grad:
            total = dg_scr[...] + _total(s0_ref[0, 0] * w_scr[...])
            dg_ref[0, 0, 0] = jnp.broadcast_to(total, dg_ref.shape[3:])


@functools.partial(
    jax.jit,
    static_argnames=("seq_len", "block_t", "block_v", "chunk", "interpret", "decay_grad"),
)
def backward(q, k, v, g_H, s0, do_BHTV, dsT_BHKV, *, run_BT=None, seq_len, block_t, block_v,
             chunk=None, interpret=False, decay_grad=False):  # fmt: skip
    """(dq, dk, dv, ds0, dg): the cotangents of `forward`'s inputs given do [B, H, T, V] and
    the final state's cotangent dsT [B, H, K, V] float32. dq, dk, dv in the inputs' dtype, ds0
    float32; dg [H] float32 with decay_grad (summed over the batch), else None. Arguments
    otherwise as `forward`."""
    B, H, T, K = q.shape
    V = v.shape[-1]
    _check(T, V, seq_len, block_t, block_v)
    C = _chunk_for(block_t, chunk)
    NV, NB = V // block_v, T // block_t
    grid = (B, H, NV, NB)
    packed = run_BT is not None
    masks = _masks(run_BT, C, block_t) if packed else ()
    # Partial dq/dk per V tile: float32 unless there is only one tile.
    part_dtype = q.dtype if NV == 1 else jnp.float32
    inputs = (g_H.astype(jnp.float32), q, k, v, do_BHTV, s0, dsT_BHKV)
    part_shape = out_shape((NV, B, H, T, K), part_dtype, *inputs)
    s_spec = pl.BlockSpec((1, 1, K, block_v), lambda b, h, e, n: (b, h, 0, e))
    scratch = [pltpu.VMEM((K, block_v), jnp.float32), pltpu.VMEM((C, C), jnp.float32)]
    g_H = inputs[0]

    def specs(block):
        """BlockSpecs for q/k, v/do, the dq/dk partials and the masks, walking the blocks as
        block(n)."""
        qk = pl.BlockSpec((1, 1, block_t, K), lambda b, h, e, n: (b, h, block(n), 0))
        vv = pl.BlockSpec((1, 1, block_t, block_v), lambda b, h, e, n: (b, h, block(n), e))
        part = pl.BlockSpec((1, 1, 1, block_t, K), lambda b, h, e, n: (e, b, h, block(n), 0))
        return qk, vv, part, _mask_specs(block_t, block) if packed else []

    kw = dict(seq_len=seq_len, block_t=block_t, C=C, packed=packed)
    flops = functools.partial(cost.chunked_linear, B=B, H=H, T=T, K=K, V=V, C=C, block_v=block_v)
    qk, vv, part, mask_specs = specs(lambda n: n)
    dq_parts = pl.pallas_call(
        functools.partial(_dq_kernel, **kw),
        grid=grid,
        in_specs=[_g_spec(), qk, vv, vv, s_spec, *mask_specs],
        out_specs=part,
        out_shape=part_shape,
        scratch_shapes=scratch,
        cost_estimate=flops("dq", arrays=[*inputs, part_shape]),
        **_params(interpret, 3),
    )(g_H, k, v, do_BHTV, s0.astype(jnp.float32), *masks)

    qk, vv, part, mask_specs = specs(lambda n: NB - 1 - n)
    out_specs = [part, vv, s_spec]
    out_shapes = [
        part_shape,
        out_shape((B, H, T, V), v.dtype, *inputs),
        out_shape((B, H, K, V), jnp.float32, *inputs),
    ]
    extra_in, extra_specs = [], []
    if decay_grad:
        # A row of 128 lanes per (V tile, b, h), every lane the same partial of dL/dg.
        out_specs.append(pl.BlockSpec((1, 1, 1, 1, 128), lambda b, h, e, n: (e, b, h, 0, 0)))
        out_shapes.append(out_shape((NV, B, H, 1, 128), jnp.float32, *inputs))
        scratch = [*scratch, pltpu.VMEM((K, block_v), jnp.float32),
                   pltpu.VMEM((1, 128), jnp.float32)]  # fmt: skip
        extra_in, extra_specs = [s0.astype(jnp.float32)], [s_spec]
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel, n_blocks=NB, decay_grad=decay_grad, **kw),
        grid=grid,
        in_specs=[_g_spec(), qk, qk, vv, vv, s_spec, *mask_specs, *extra_specs],
        out_specs=out_specs,
        out_shape=out_shapes,
        scratch_shapes=scratch,
        cost_estimate=flops("dkv_decay" if decay_grad else "dkv", arrays=[*inputs, *out_shapes]),
        **_params(interpret, 3),
    )(g_H, q, k, v, do_BHTV, dsT_BHKV.astype(jnp.float32), *masks, *extra_in)
    dk_parts, dv, ds0 = outs[:3]
    dg = outs[3][..., 0, 0].sum(axis=(0, 1)) if decay_grad else None

    def total(parts, dtype):
        return parts[0] if NV == 1 else parts.sum(0).astype(dtype)

    return total(dq_parts, q.dtype), total(dk_parts, k.dtype), dv, ds0, dg
