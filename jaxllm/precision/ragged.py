"""The grouped expert GEMM ``ragged_dot`` in FP8 or ExMy: the kernels of `project_ragged`.

A mixture of experts runs ``y_NF = ragged_dot(x_ND, w_EDF, sizes_E)``: the N rows are sorted by
expert, ``sizes_E[e]`` rows per expert, and each block of rows is multiplied by its expert's
[D, F] weight (rows past ``sum(sizes_E)`` give zeros). Like a dense projection it is three GEMMs:

    Y  = ragged_dot(X, W)              inner D                     (P1 = X, P2 = W)
    dX = ragged_dot(dY, Wᵀ)            inner F                     (P3 = dY, P4 = W)
    dW = Xᵀ dY per expert's rows       inner N (ragged contraction) (P5 = dY, P6 = X)

Scaled FP8 (`current`, `delayed`): the token activations and the output gradient get one
scale per tensor, the weights one scale per expert (experts differ in magnitude; a per-tensor
scale would leave a small expert's weights in FP8's subnormals). The GEMMs run on the FP8
values (exact in any wider float) and each output row is divided by its row's scales, so the
emulation is exact and the FP8 operands are what the backward keeps, as in `fp8.py`.
Blockwise FP8 and ExMy quantize-dequantize each GEMM input along that GEMM's inner dim, as
`fp8_einsum_blockwise` and `exmy_einsum` do; dW's inner dim is the tokens, whose blocks do not
respect expert boundaries (a block straddling two experts shares one scale).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.precision import einsum as es
from jaxllm.precision import fp8 as f8
from jaxllm.precision.exmy import quantize_exmy

# dW: x [N, D] and dy [N, F] contracted over their ragged rows → [E, D, F]
_DW_DIMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(((0,), (0,)), ((), ())),
    lhs_ragged_dimensions=[0],
    rhs_group_dimensions=[],
)


def gemm(x_ND, w_EDF, sizes_E):
    return jax.lax.ragged_dot(x_ND, w_EDF, sizes_E, preferred_element_type=jnp.float32)


def gemm_dx(dy_NF, w_EDF, sizes_E):
    return jax.lax.ragged_dot(dy_NF, jnp.swapaxes(w_EDF, 1, 2), sizes_E,
                              preferred_element_type=jnp.float32)  # fmt: skip


def gemm_dw(dy_NF, x_ND, sizes_E):
    return jax.lax.ragged_dot_general(x_ND, dy_NF, sizes_E, _DW_DIMS,
                                      preferred_element_type=jnp.float32)  # fmt: skip


def expert_of_row(sizes_E: jax.Array, n: int) -> jax.Array:
    """[N] int32: the expert whose block holds each row (the last expert past the end)."""
    row = jnp.searchsorted(jnp.cumsum(sizes_E), jnp.arange(n), side="right")
    return jnp.minimum(row, sizes_E.shape[0] - 1)


def _amax_E(w_EDF: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(w_EDF.astype(jnp.float32)), axis=(1, 2))


def _dtypes(x, w):
    # residuals must be arrays: empty ones carry the input dtypes to the backward
    return jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype)


# ------------------------------------------------------------ scaled FP8 (per expert)


def _fp8_fwd(x, w, sizes, sx, sw_E):
    x8 = f8.to_fp8(x, f8.E4M3, sx)
    w8 = f8.to_fp8(w, f8.E4M3, sw_E[:, None, None])
    row_scale_N = sx * sw_E[expert_of_row(sizes, x.shape[0])]
    y = gemm(x8.astype(x.dtype), w8.astype(x.dtype), sizes) / row_scale_N[:, None]
    return y.astype(x.dtype), (x8, sx, w8, sw_E, sizes, _dtypes(x, w))


def _fp8_bwd(res, dy, sdy):
    x8, sx, w8, sw_E, sizes, (xd, wd) = res
    dt = xd.dtype
    dy8 = f8.to_fp8(dy, f8.E5M2, sdy).astype(dt)
    row_scale_N = sdy * sw_E[expert_of_row(sizes, dy.shape[0])]
    dx = gemm_dx(dy8, w8.astype(dt), sizes) / row_scale_N[:, None]
    dw = gemm_dw(dy8, x8.astype(dt), sizes) / (sdy * sx)
    return dx.astype(dt), dw.astype(wd.dtype)


@jax.custom_vjp
def fp8_ragged_current(x_ND: jax.Array, w_EDF: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """``ragged_dot`` as FP8 GEMMs with this step's amax: per-tensor for x (E4M3) and dy
    (E5M2), per expert for w (E4M3). Result in `x_ND.dtype`."""
    return _current_fwd(x_ND, w_EDF, sizes_E)[0]


def _current_fwd(x, w, sizes):
    sx = f8.scale_from_amax(jnp.max(jnp.abs(x.astype(jnp.float32))), f8.E4M3)
    return _fp8_fwd(x, w, sizes, sx, f8.scale_from_amax(_amax_E(w), f8.E4M3))


def _current_bwd(res, dy):
    sdy = f8.scale_from_amax(jnp.max(jnp.abs(dy.astype(jnp.float32))), f8.E5M2)
    return (*_fp8_bwd(res, dy, sdy), None)


fp8_ragged_current.defvjp(_current_fwd, _current_bwd)


@jax.custom_vjp
def fp8_ragged_delayed(x_ND, w_EDF, sizes_E, entry: f8.DelayedEntry) -> jax.Array:
    """``ragged_dot`` as FP8 GEMMs with the scales in `entry` (``entry["w"]`` per expert:
    scale [E], history [L, E]). As in `fp8_einsum_delayed`, the cotangent of `entry` carries
    the new histories (this step's amaxes recorded) for `update_delayed_state`."""
    return _delayed_fwd(x_ND, w_EDF, sizes_E, entry)[0]


def _delayed_fwd(x, w, sizes, entry):
    y, res = _fp8_fwd(x, w, sizes, entry["x"]["scale"], entry["w"]["scale"])
    amax_x = jnp.max(jnp.abs(x.astype(jnp.float32)))
    return y, (res, entry, amax_x, _amax_E(w))


def _delayed_bwd(saved, dy):
    res, entry, amax_x, amax_w_E = saved
    dx, dw = _fp8_bwd(res, dy, entry["dy"]["scale"])
    amaxes = {"x": amax_x, "w": amax_w_E, "dy": jnp.max(jnp.abs(dy.astype(jnp.float32)))}
    new = {
        r: {
            "history": f8.record_amax(entry[r]["history"], amaxes[r]),
            "scale": jnp.zeros_like(entry[r]["scale"]),
        }
        for r in entry
    }
    return dx, dw, None, new


fp8_ragged_delayed.defvjp(_delayed_fwd, _delayed_bwd)


# ------------------------------------------- quantize-dequantize: blockwise FP8, ExMy


def _blockwise_w(w_EDF: jax.Array, tile: int) -> jax.Array:
    # each expert's [D, F] in tile×tile blocks (these serve both Y and dX)
    per_expert = lambda w_DF: f8._block_qdq(w_DF.T, tile).T
    return jax.vmap(per_expert)(w_EDF)


def _quantizer(mode: tuple):
    """fn(v, letters, inner, role) → v quantize-dequantized along `inner` (float32 or v's
    dtype). mode: ("blockwise", tile) or ("exmy", six `QSpec | None` in GEMM_INPUTS order)."""
    roles = ("x", "w", "dy_dx", "w_dx", "dy_dw", "x_dw")

    def q(v, letters, inner, role):
        if mode[0] == "blockwise":
            if letters == "EDF":
                return _blockwise_w(v, mode[1])
            return es.along(v, letters, inner, lambda u: f8._tile_qdq(u, mode[1]))
        spec = mode[1][roles.index(role)]
        if spec is None:
            return v
        e, m, block = spec
        return es.along(v, letters, inner, lambda u: quantize_exmy(u, e, m, block_size=block))

    return q


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def qdq_ragged(x_ND, w_EDF, sizes_E, mode: tuple) -> jax.Array:
    """``ragged_dot`` with each of its six GEMM inputs quantize-dequantized by `mode`
    (see `_quantizer`); float32 accumulation, result in `x_ND.dtype`."""
    return _qdq_fwd(x_ND, w_EDF, sizes_E, mode)[0]


def _qdq_fwd(x, w, sizes, mode):
    q = _quantizer(mode)
    wq = q(w, "EDF", "D", "w")
    y = gemm(q(x, "ND", "D", "x").astype(x.dtype), wq.astype(x.dtype), sizes)
    # blockwise keeps the quantized weight (its blocks serve dX too); ExMy re-quantizes
    w_res = wq if mode[0] == "blockwise" else w
    return y.astype(x.dtype), (x, w_res.astype(w.dtype), sizes, _dtypes(x, w))


def _qdq_bwd(mode, res, dy):
    x, w, sizes, (xd, wd) = res
    q = _quantizer(mode)
    dt = xd.dtype
    w_dx = w if mode[0] == "blockwise" else q(w, "EDF", "F", "w_dx")
    dx = gemm_dx(q(dy, "NF", "F", "dy_dx").astype(dt), w_dx.astype(dt), sizes)
    dw = gemm_dw(q(dy, "NF", "N", "dy_dw").astype(dt), q(x, "ND", "N", "x_dw").astype(dt), sizes)
    return dx.astype(dt), dw.astype(wd.dtype), None


qdq_ragged.defvjp(_qdq_fwd, _qdq_bwd)
