"""Lightning Attention-2 on GPU: Pallas kernels through the Triton lowering.

Per (batch, head), λ = exp(g) and blocks of C = block_t tokens, block n holding L_n real tokens
(C except in the padded tail) and entering with state S_n [K, V] (j, i index inside the block):

    o_j     = Σ_{i≤j} λ^{j−i} (q_j·k_i) v_i + λ^{j+1} q_j S_n
    S_{n+1} = λ^{L_n} S_n + Σ_i λ^{L_n−1−i} k_iᵀ v_i

and, with G_n the cotangent of S_n (G_N = the final-state cotangent, G_0 = ds0):

    dq = [(dO Vᵀ) ⊙ D] K + λ^{j+1} dO S_nᵀ
    dk = [(dO Vᵀ) ⊙ D]ᵀ Q + λ^{L−1−i} V G_{n+1}ᵀ
    dv = [(Q Kᵀ) ⊙ D]ᵀ dO + λ^{L−1−i} K G_{n+1}
    G_n = λ^{L_n} G_{n+1} + (λ^{j+1} Q)ᵀ dO

with D_ji = λ^{j−i} for j ≥ i, else 0. Only λ^p with p ≥ 0 is ever formed (as exp(p·g)).
With `decay_grad` the reverse sweep also returns dL/dg, by the same terms and float32 matmuls
as the TPU kernel (tpu.py's docstring), carrying W_n beside G_n.

As in the official kernels (`lightning_attn2.py`, see linear_attention.md §2), every program
owns one (batch·head, V-tile) pair and walks the sequence with a `fori_loop`, its float32
[K, block_v] state in registers: the forward and the dq kernel sweep forwards rebuilding S_n,
the dk/dv/ds0 kernel sweeps backwards carrying G_n. The state's columns are independent, so
tiling V is exact for o, sT, dv and ds0; dq and dk sum over V, so with more than one V tile each
tile writes a float32 partial that XLA adds up.

Why Triton and not Mosaic GPU: in jax 0.10.2 Mosaic GPU is the default Pallas GPU lowering, but
its `pallas_call` path is deprecated for `plgpu.kernel`, where the kernel would manage shared
memory, TMA copies and warpgroup MMAs itself (Hopper and later only). The Triton lowering takes
this kernel's shape of code as the official kernels have it (pointer loads, a `fori_loop` with
the state in registers, small `dot`s) on any sm80+ GPU, runs in interpret mode on the CPU and
lowers to Triton IR without a GPU. Passing `triton.CompilerParams` selects it explicitly.

Packed documents (optional `run_BT`, [B, T] int32: how many document starts precede each
token; padded tokens repeat the last run) reset the state at each document start: each block's
D, q decays, key decays and state decay are multiplied by the masks of
`kernels_pallas.documents` (the block is the chunk), the same in the forward and both
backward sweeps, as the TPU kernel does. Without `run_BT` none of this is traced.

Triton wants power-of-two tile shapes: block_t and block_v must be powers of two (≥ 16, the
smallest MMA tile) and K is zero-padded to the next power of two here (exact: zero columns of
q and k and zero rows of the state contribute nothing).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.documents import mask_inputs
from kernels_pallas.vma import out_shape

# (block_t, block_v) by device_kind substring, first match wins. Untuned (no GPU was at hand
# when this was written); chosen from each GPU's shared memory per block, which Triton fills
# with num_stages copies of the per-iteration tiles (q, k [C, K] and v, dO [C, block_v]) plus
# the dot operands it stages: ≈ 100 KiB for C = block_v = 64, K = 128, bf16, two stages.
# - H100 / H200 / H800 / GH200 / B200 (227 KiB): C = 64 as the official kernels, block_v = 64
#   so that b·h·(V/64) programs fill 132 SMs at the benchmark's b = 4, h = 32.
# - A100 / A800 (163 KiB): the official kernels' A100 sizes, BLOCK = 64, BLOCK_MODEL = 32.
# - Everything else (RTX 30xx/40xx/50xx, A10, A40, L4, L40: 99 KiB): the official A100 sizes
#   fail there with "OutOfResources: shared memory" (lightning-attention #4; vLLM #41508 halves
#   CBLOCK for it), so C = 32, block_v = 32.
BLOCK_SIZES = (
    (("H100", "H200", "H800", "GH200", "B200", "B100", "GB200"), (64, 64)),
    (("A100", "A800"), (64, 32)),
)
FALLBACK_BLOCK_SIZES = (32, 32)


def default_block_sizes(device_kind):
    """(block_t, block_v) for a GPU named by `jax.Device.device_kind`, e.g. "NVIDIA H100"."""
    for names, sizes in BLOCK_SIZES:
        if any(name in device_kind for name in names):
            return sizes
    return FALLBACK_BLOCK_SIZES


def _compiler_params(block_t, K, block_v, itemsize):
    """Warps and pipeline stages from the tile sizes (untuned): two stages while one
    iteration's loads (q, k, v, dO) stay within 48 KiB, else one (fp32 at the H100 sizes)."""
    tile_bytes = 2 * block_t * (K + block_v) * itemsize
    num_warps = 4 if block_t * max(K, block_v) <= 64 * 64 else 8
    return pltriton.CompilerParams(
        num_warps=num_warps, num_stages=2 if tile_bytes <= 48 << 10 else 1
    )


def _dot(a, b, contract=(1, 0)):
    """a·b contracting a's dim contract[0] with b's dim contract[1], accumulated in float32."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _decays(g, C):
    """D [C, C] (λ^{j−i} on and below the diagonal, 0 above) and λ^{j+1} as a [C, 1] column."""
    j = lax.broadcasted_iota(jnp.int32, (C, C), 0)
    i = lax.broadcasted_iota(jnp.int32, (C, C), 1)
    # Clamp before exp: above the diagonal the exponent would be positive.
    diag_CC = jnp.where(j >= i, jnp.exp(g * jnp.maximum(j - i, 0).astype(jnp.float32)), 0.0)
    q_decay_C1 = jnp.exp(g * (lax.broadcasted_iota(jnp.int32, (C, 1), 0) + 1).astype(jnp.float32))
    return diag_CC, q_decay_C1


def _block_decays(g, n, C, seq_len, decays, mask_refs):
    """(D [C, C], λ^{j+1} [C, 1], key decays λ^{L_n−1−i} [C, 1], λ^{L_n}) of block n with L_n
    real tokens, masked by its documents when packed (mask_refs: the column of runs, the row of
    runs, [run = p] and [run = l], all [T, ·]). decays: `_decays(g, C)`. Padded keys are zero,
    so clamping their negative exponents to 0 changes nothing."""
    diag_CC, q_decay_C1 = decays
    L = jnp.clip(seq_len - n * C, 0, C)
    i = lax.broadcasted_iota(jnp.int32, (C, 1), 0)
    k_decay_C1 = jnp.exp(g * jnp.maximum(L - 1 - i, 0).astype(jnp.float32))
    block_decay = jnp.exp(g * L.astype(jnp.float32))
    if mask_refs is None:
        return diag_CC, q_decay_C1, k_decay_C1, block_decay
    col_ref, row_ref, in_ref, out_ref = mask_refs
    t = pl.ds(pl.multiple_of(n * C, C), C)
    same_CC = (col_ref[t, :] == row_ref[:, t]).astype(jnp.float32)
    keep_in_C1 = in_ref[t, :]
    # [l = p]: the block's state survives only when no document starts inside it.
    keep_state = jnp.min(keep_in_C1)
    return (
        diag_CC * same_CC,
        q_decay_C1 * keep_in_C1,
        k_decay_C1 * out_ref[t, :],
        block_decay * keep_state,
    )


def _split(refs, packed):
    """A kernel's refs after its fixed inputs → (the four mask refs or None, the outputs)."""
    return (refs[:4], refs[4:]) if packed else (None, refs)


def _fwd_kernel(g_ref, q_ref, k_ref, v_ref, s0_ref, *refs, seq_len, block_t, packed):
    """One (batch·head, V tile): q, k [T, K], v, o [T, Bv], s0, sT [K, Bv]."""
    mask_refs, (o_ref, sT_ref) = _split(refs, packed)
    C = block_t
    g = g_ref[...]
    decays = _decays(g, C)

    def body(n, S_KV):
        t = pl.ds(pl.multiple_of(n * C, C), C)
        q_CK, k_CK, v_CV = q_ref[t, :], k_ref[t, :], v_ref[t, :]
        D_CC, q_decay_C1, k_decay_C1, block_decay = _block_decays(
            g, n, C, seq_len, decays, mask_refs
        )
        scores_CC = _dot(q_CK, k_CK, (1, 1)) * D_CC
        o_CV = _dot(scores_CC.astype(v_CV.dtype), v_CV)
        o_CV += _dot(q_CK, S_KV.astype(q_CK.dtype)) * q_decay_C1
        o_ref[t, :] = o_CV.astype(o_ref.dtype)
        kd_CK = (k_CK * k_decay_C1).astype(k_CK.dtype)
        return block_decay * S_KV + _dot(kd_CK, v_CV, (0, 0))

    sT_ref[...] = lax.fori_loop(0, q_ref.shape[0] // C, body, s0_ref[...])


def _bwd_dq_kernel(g_ref, k_ref, v_ref, do_ref, s0_ref, *refs, seq_len, block_t, packed):
    """Forward sweep rebuilding S_n: dq [T, K] (this V tile's share) from k, v, dO, s0."""
    mask_refs, (dq_ref,) = _split(refs, packed)
    C = block_t
    g = g_ref[...]
    decays = _decays(g, C)

    def body(n, S_KV):
        t = pl.ds(pl.multiple_of(n * C, C), C)
        k_CK, v_CV, do_CV = k_ref[t, :], v_ref[t, :], do_ref[t, :]
        D_CC, q_decay_C1, k_decay_C1, block_decay = _block_decays(
            g, n, C, seq_len, decays, mask_refs
        )
        dov_CC = _dot(do_CV, v_CV, (1, 1)) * D_CC
        dq_CK = _dot(dov_CC.astype(k_CK.dtype), k_CK)
        dq_CK += _dot(do_CV, S_KV.astype(do_CV.dtype), (1, 1)) * q_decay_C1
        dq_ref[t, :] = dq_CK.astype(dq_ref.dtype)
        kd_CK = (k_CK * k_decay_C1).astype(k_CK.dtype)
        return block_decay * S_KV + _dot(kd_CK, v_CV, (0, 0))

    lax.fori_loop(0, k_ref.shape[0] // C, body, s0_ref[...])


def _bwd_dkdv_kernel(g_ref, q_ref, k_ref, v_ref, do_ref, dsT_ref, *refs, seq_len, block_t,
                     packed, decay_grad):  # fmt: skip
    """Reverse sweep carrying G_n: dk [T, K] (this V tile's share), dv [T, Bv], ds0 [K, Bv];
    with decay_grad also W_n and dL/dg (this V tile's share, written to all 16 lanes of dg),
    as the TPU kernel's (tpu.py: the terms and why no shortcut)."""
    mask_refs, refs = _split(refs, packed)
    if decay_grad:
        s0_ref, dk_ref, dv_ref, ds0_ref, dg_ref = refs
    else:
        dk_ref, dv_ref, ds0_ref = refs
    C = block_t
    g = g_ref[...]
    decays = _decays(g, C)
    num_blocks = q_ref.shape[0] // C
    j_C1 = lax.broadcasted_iota(jnp.int32, (C, 1), 0).astype(jnp.float32)
    # j − i on and below the diagonal (D is zero above it).
    dist_CC = jnp.maximum(
        lax.broadcasted_iota(jnp.int32, (C, C), 0) - lax.broadcasted_iota(jnp.int32, (C, C), 1),
        0,
    ).astype(jnp.float32)

    def body(step, carry):
        G_KV = carry[0]
        n = num_blocks - 1 - step
        t = pl.ds(pl.multiple_of(n * C, C), C)
        q_CK, k_CK, v_CV, do_CV = q_ref[t, :], k_ref[t, :], v_ref[t, :], do_ref[t, :]
        D_CC, q_decay_C1, k_decay_C1, block_decay = _block_decays(
            g, n, C, seq_len, decays, mask_refs
        )
        scores_CC = _dot(q_CK, k_CK, (1, 1)) * D_CC
        dov_raw_CC = _dot(do_CV, v_CV, (1, 1))
        dov_CC = dov_raw_CC * D_CC
        dv_CV = _dot(scores_CC.astype(do_CV.dtype), do_CV, (0, 0))
        dv_CV += _dot(k_CK, G_KV.astype(k_CK.dtype)) * k_decay_C1
        vG_CK = _dot(v_CV, G_KV.astype(v_CV.dtype), (1, 1))
        dk_CK = _dot(dov_CC.astype(q_CK.dtype), q_CK, (0, 0)) + vG_CK * k_decay_C1
        dv_ref[t, :] = dv_CV.astype(dv_ref.dtype)
        dk_ref[t, :] = dk_CK.astype(dk_ref.dtype)
        if not decay_grad:
            qd_CK = (q_CK * q_decay_C1).astype(q_CK.dtype)
            return (block_decay * G_KV + _dot(qd_CK, do_CV, (0, 0)),)
        # W_KV holds W_{n+1}: the block's terms, then W ← W_n and G (tpu.py's docstring), with
        # float32 operands: the terms partly cancel (bfloat16 ones: 3% off at weak decay).
        W_KV, dg = carry[1:]
        f32 = jnp.float32
        q32, v32, do32 = q_CK.astype(f32), v_CV.astype(f32), do_CV.astype(f32)
        L = jnp.clip(seq_len - n * C, 0, C).astype(f32)
        k_power_C1 = jnp.maximum(L - 1.0 - j_C1, 0.0)
        vG32_CK = _dot(v32, G_KV, (1, 1))
        k_terms_CK = (
            k_CK.astype(f32) * k_decay_C1 * (k_power_C1 * vG32_CK + _dot(v32, W_KV, (1, 1)))
        )
        dg += jnp.sum(scores_CC * dov_raw_CC * dist_CC) + jnp.sum(k_terms_CK)
        W_KV = _dot(q32 * (q_decay_C1 * (j_C1 + 1.0)), do32, (0, 0)) + block_decay * (
            L * G_KV + W_KV
        )
        G_next = block_decay * G_KV + _dot(q32 * q_decay_C1, do32, (0, 0))
        return G_next, W_KV, dg

    carry = (dsT_ref[...],)
    if decay_grad:
        carry += (jnp.zeros_like(carry[0]), jnp.zeros((), jnp.float32))
    carry = lax.fori_loop(0, num_blocks, body, carry)
    ds0_ref[...] = carry[0]
    if decay_grad:
        dg_ref[...] = jnp.full(dg_ref.shape, carry[2] + jnp.sum(s0_ref[...] * carry[1]))


def _check(q, v, run_BT, seq_len, block_t, block_v):
    B, T, V = q.shape[0], q.shape[2], v.shape[3]
    if run_BT is not None and run_BT.shape != (B, T):
        raise ValueError(f"run_BT must be [B, T] = {(B, T)}, got {run_BT.shape}")
    for name, size in (("block_t", block_t), ("block_v", block_v)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two ≥ 16 for Triton, got {size}")
    if T % block_t or V % block_v:
        raise ValueError(
            f"T={T} and V={V} must be multiples of block_t={block_t}, block_v={block_v}"
        )
    if not 0 < seq_len <= T:
        raise ValueError(f"seq_len must be in (0, T={T}], got {seq_len}")


def _next_pow2(n):
    return 1 << (n - 1).bit_length()


def _flat(x):
    """[B, H, ...] → [B·H, ...] (a free reshape)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _specs(T, K, block_v, H):
    """BlockSpecs on the (batch·head, V tile) grid: g per head, [T, K], [T, Bv], [K, Bv]."""
    return dict(
        g=pl.BlockSpec((None,), lambda bh, iv: (bh % H,)),
        TK=pl.BlockSpec((None, T, K), lambda bh, iv: (bh, 0, 0)),
        TV=pl.BlockSpec((None, T, block_v), lambda bh, iv: (bh, 0, iv)),
        KV=pl.BlockSpec((None, K, block_v), lambda bh, iv: (bh, 0, iv)),
    )


def _masks(run_BT, block_t, H):
    """The packed path's extra inputs (`documents.mask_inputs` for blocks of block_t tokens)
    and their BlockSpecs (a program reads its batch row's whole [T, 1] / [1, T] masks), or two
    empty lists without documents."""
    if run_BT is None:
        return [], []
    T = run_BT.shape[1]
    col = pl.BlockSpec((None, T, 1), lambda bh, iv: (bh // H, 0, 0))
    row = pl.BlockSpec((None, 1, T), lambda bh, iv: (bh // H, 0, 0))
    return list(mask_inputs(run_BT, block_t)), [col, row, col, col]


def _pad_axis(x, axis, size):
    """Zero-pad one axis of x up to size."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _sum_partials(x_NBHTK, B, H, K, dtype):
    """Add the V tiles' shares and restore [B, H, T, K] (dropping K's padding) in dtype."""
    x = x_NBHTK[0] if x_NBHTK.shape[0] == 1 else x_NBHTK.sum(0)
    return x.reshape(B, H, *x.shape[1:])[..., :K].astype(dtype)


@functools.partial(jax.jit, static_argnames=("seq_len", "block_t", "block_v", "interpret"))
def forward(q_BHTK, k_BHTK, v_BHTV, g_H, s0_BHKV, *, run_BT=None, seq_len, block_t, block_v,
            interpret=False):  # fmt: skip
    """Lightning attention forward.

    Args:
      q_BHTK, k_BHTK: [B, H, T, K].  v_BHTV: [B, H, T, V].  One dtype (bf16 or fp32) for all
        three: they meet in the same MMAs. T a multiple of block_t, V of block_v; tokens from
        seq_len on are zero padding.
      g_H: [H] float32 log decay (≤ 0).  s0_BHKV: [B, H, K, V] float32 initial state.
      run_BT: None, or [B, T] int32 document runs of packed rows (nondecreasing; the padding
        repeats the last run): the state is reset at each document start.
      seq_len: the number of real tokens (static); the state does not decay over the padding.
      block_t, block_v: tokens per block and V columns per program, powers of two ≥ 16.
      interpret: run in Pallas interpret mode (CPU).

    Returns:
      (o [B, H, T, V] in q's dtype, final state [B, H, K, V] float32).
    """
    _check(q_BHTK, v_BHTV, run_BT, seq_len, block_t, block_v)
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[3]
    Kp = _next_pow2(K)
    q, k = (_flat(_pad_axis(x, 3, Kp)) for x in (q_BHTK, k_BHTK))
    s0 = _flat(_pad_axis(s0_BHKV.astype(jnp.float32), 2, Kp))
    spec = _specs(T, Kp, block_v, H)
    masks, mask_specs = _masks(run_BT, block_t, H)
    kernel = functools.partial(
        _fwd_kernel, seq_len=seq_len, block_t=block_t, packed=run_BT is not None
    )
    o, sT = pl.pallas_call(
        kernel,
        grid=(B * H, V // block_v),
        in_specs=[spec["g"], spec["TK"], spec["TK"], spec["TV"], spec["KV"], *mask_specs],
        out_specs=[spec["TV"], spec["KV"]],
        out_shape=[
            out_shape((B * H, T, V), q_BHTK.dtype, q, k, v_BHTV, s0),
            out_shape((B * H, Kp, V), jnp.float32, q, k, v_BHTV, s0),
        ],
        compiler_params=_compiler_params(block_t, Kp, block_v, q_BHTK.dtype.itemsize),
        interpret=interpret,
        name="lightning_attention_fwd",
    )(g_H.astype(jnp.float32), q, k, _flat(v_BHTV), s0, *masks)
    return o.reshape(B, H, T, V), sT.reshape(B, H, Kp, V)[:, :, :K]


@functools.partial(
    jax.jit, static_argnames=("seq_len", "block_t", "block_v", "interpret", "decay_grad")
)
def backward(
    q_BHTK,
    k_BHTK,
    v_BHTV,
    g_H,
    s0_BHKV,
    do_BHTV,
    dsT_BHKV,
    *,
    run_BT=None,
    seq_len,
    block_t,
    block_v,
    interpret=False,
    decay_grad=False,
):
    """Lightning attention backward: the cotangents of q, k, v, s0 and, with decay_grad, g.

    Arguments as `forward`, plus do_BHTV [B, H, T, V] (o's cotangent) and dsT_BHKV [B, H, K, V]
    (the final state's). Returns (dq, dk [B, H, T, K], dv [B, H, T, V]) in the inputs' dtypes,
    ds0 [B, H, K, V] float32 and dg [H] float32 (summed over the batch) or None.
    """
    _check(q_BHTK, v_BHTV, run_BT, seq_len, block_t, block_v)
    B, H, T, K = q_BHTK.shape
    V = v_BHTV.shape[3]
    Kp, nV = _next_pow2(K), V // block_v
    q, k = (_flat(_pad_axis(x, 3, Kp)) for x in (q_BHTK, k_BHTK))
    s0, dsT = (_flat(_pad_axis(x.astype(jnp.float32), 2, Kp)) for x in (s0_BHKV, dsT_BHKV))
    v, do = _flat(v_BHTV), _flat(do_BHTV.astype(v_BHTV.dtype))
    g = g_H.astype(jnp.float32)
    spec = _specs(T, Kp, block_v, H)
    masks, mask_specs = _masks(run_BT, block_t, H)
    kw = dict(seq_len=seq_len, block_t=block_t, packed=run_BT is not None)
    # dq and dk sum over V: each V tile writes its share, in float32 when there are several.
    partial_spec = pl.BlockSpec((None, None, T, Kp), lambda bh, iv: (iv, bh, 0, 0))
    partial_dtype = q_BHTK.dtype if nV == 1 else jnp.float32
    inputs = (q, k, v, do, s0, dsT)
    partial_shape = out_shape((nV, B * H, T, Kp), partial_dtype, *inputs)
    common = dict(
        grid=(B * H, nV),
        compiler_params=_compiler_params(block_t, Kp, block_v, q_BHTK.dtype.itemsize),
        interpret=interpret,
    )
    dq = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, **kw),
        in_specs=[spec["g"], spec["TK"], spec["TV"], spec["TV"], spec["KV"], *mask_specs],
        out_specs=partial_spec,
        out_shape=partial_shape,
        name="lightning_attention_bwd_dq",
        **common,
    )(g, k, v, do, s0, *masks)
    out_specs = [partial_spec, spec["TV"], spec["KV"]]
    out_shapes = [
        partial_shape,
        out_shape((B * H, T, V), v_BHTV.dtype, *inputs),
        out_shape((B * H, Kp, V), jnp.float32, *inputs),
    ]
    extra_in, extra_specs = [], []
    if decay_grad:
        # 16 lanes (Triton's smallest tile) per (V tile, batch·head), all the same partial.
        out_specs.append(pl.BlockSpec((None, None, 16), lambda bh, iv: (iv, bh, 0)))
        out_shapes.append(out_shape((nV, B * H, 16), jnp.float32, *inputs))
        extra_in, extra_specs = [s0], [spec["KV"]]
    outs = pl.pallas_call(
        functools.partial(_bwd_dkdv_kernel, decay_grad=decay_grad, **kw),
        in_specs=[
            *(spec[name] for name in ("g", "TK", "TK", "TV", "TV", "KV")),
            *mask_specs,
            *extra_specs,
        ],
        out_specs=out_specs,
        out_shape=out_shapes,
        name="lightning_attention_bwd_dkdv",
        **common,
    )(g, q, k, v, do, dsT, *masks, *extra_in)
    dk, dv, ds0 = outs[:3]
    dg = outs[3][..., 0].sum(0).reshape(B, H).sum(0) if decay_grad else None
    return (
        _sum_partials(dq, B, H, K, q_BHTK.dtype),
        _sum_partials(dk, B, H, K, k_BHTK.dtype),
        dv.reshape(B, H, T, V),
        ds0.reshape(B, H, Kp, V)[:, :, :K],
        dg,
    )
