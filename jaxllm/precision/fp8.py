"""Scaled FP8 projections: current, delayed (Transformer Engine) and blockwise (DeepSeek-V3).

Every projection ``y = einsum(eq, x, w)`` becomes three FP8 GEMMs (see `einsum.py`): the
forward on E4M3 x and w, and the two backward GEMMs on the output gradient (E5M2, the HYBRID
recipe; blockwise uses E4M3 everywhere as DeepSeek-V3 does) with the saved FP8 x and w.
Quantize means ``fp8(clip(v · s))`` with a float32 scale ``s``, and the GEMM result is divided
by the scales, so on hardware with FP8 GEMMs XLA can run it as a scaled FP8 dot (the pattern
``dot(convert(f8) · s⁻¹, convert(f8) · s⁻¹)``); on the CPU it is emulated exactly. The FP8
operands (not the high-precision ones) are what the backward keeps.

- `current`: per-tensor scales from this step's amax: ``s = fp8_max / amax``.
- `delayed`: per-tensor scales computed from an amax history of the last
  `amax_history_len` steps (TE ``DelayedScaling`` with ``amax_compute_algo="max"``): the step
  quantizes with the scale it carries, records its amax, and the train step then updates the
  history and scale with `update_delayed_state` (scale ``fp8_max / max(history) / 2^margin``,
  the old scale kept when that max is 0 or not finite). The new histories leave the
  differentiated function as the "gradient" of the state (Flax's overwrite-with-gradient
  trick), so a train step gets them from `jax.grad` with no side channel.
- `blockwise`: one scale per 1×128 tile of activations and per 128×128 block of weights,
  along each GEMM's inner dims (``s = 448 / amax`` per tile), E4M3 for every operand.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.precision import einsum as es

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
FP8_MAX = {jnp.dtype(E4M3): 448.0, jnp.dtype(E5M2): 57344.0}
TILE = 128

# Delayed-scaling state of one projection: a history and a scale per GEMM input.
DelayedEntry = dict[str, dict[str, jax.Array]]
_ROLES = ("x", "w", "dy")


def fp8_max(dtype) -> float:
    return FP8_MAX[jnp.dtype(dtype)]


def scale_from_amax(amax: jax.Array, dtype, old: jax.Array | float = 1.0, margin: int = 0):
    """``fp8_max / amax / 2^margin``; `old` where amax is 0 or not finite."""
    ok = (amax > 0) & jnp.isfinite(amax)
    new = fp8_max(dtype) / jnp.where(ok, amax, 1.0) / 2.0**margin
    return jnp.where(ok, new, old).astype(jnp.float32)


def to_fp8(x: jax.Array, dtype, scale: jax.Array) -> jax.Array:
    """``fp8(clip(x · scale))``: saturating, round to nearest even."""
    m = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) * scale, -m, m).astype(dtype)


def qdq(x: jax.Array, dtype, scale: jax.Array) -> jax.Array:
    """Quantize then dequantize, in float32."""
    return to_fp8(x, dtype, scale).astype(jnp.float32) / scale


def _amax(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x.astype(jnp.float32)))


def _scaled_gemm(eq, x8, sx, w8, sw, out_dtype):
    y = jnp.einsum(eq, x8.astype(out_dtype), w8.astype(out_dtype),
                   preferred_element_type=jnp.float32)  # fmt: skip
    return (y / (sx * sw)).astype(out_dtype)


def _backward(eq, dy, dy_dtype, sdy, x8, sx, w8, sw, x_dtype, w_dtype):
    dy8 = to_fp8(dy, dy_dtype, sdy)
    a, b, c = es.parse(eq)
    dx = jnp.einsum(f"{c},{b}->{a}", dy8.astype(x_dtype), w8.astype(x_dtype),
                    preferred_element_type=jnp.float32) / (sdy * sw)  # fmt: skip
    dw = jnp.einsum(f"{c},{a}->{b}", dy8.astype(x_dtype), x8.astype(x_dtype),
                    preferred_element_type=jnp.float32) / (sdy * sx)  # fmt: skip
    return dx.astype(x_dtype), dw.astype(w_dtype)


# ------------------------------------------------------------------------- current


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fp8_einsum_current(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``einsum(eq, x, w)`` as FP8 GEMMs with per-tensor scales from this step's amax."""
    return _current_fwd(eq, x, w)[0]


def _current_fwd(eq, x, w):
    sx, sw = scale_from_amax(_amax(x), E4M3), scale_from_amax(_amax(w), E4M3)
    x8, w8 = to_fp8(x, E4M3, sx), to_fp8(w, E4M3, sw)
    return _scaled_gemm(eq, x8, sx, w8, sw, x.dtype), (x8, sx, w8, sw, _dtypes(x, w))


def _dtypes(x, w):
    # residuals must be arrays: empty ones carry the input dtypes to the backward
    return jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype)


def _current_bwd(eq, res, dy):
    x8, sx, w8, sw, (xd, wd) = res
    sdy = scale_from_amax(_amax(dy), E5M2)
    return _backward(eq, dy, E5M2, sdy, x8, sx, w8, sw, xd.dtype, wd.dtype)


fp8_einsum_current.defvjp(_current_fwd, _current_bwd)


# ------------------------------------------------------------------------- delayed


def init_delayed_entry(history_len: int) -> DelayedEntry:
    """A projection's fresh state: zero histories, unit scales."""
    return {
        r: {"history": jnp.zeros((history_len,), jnp.float32), "scale": jnp.ones((), jnp.float32)}
        for r in _ROLES
    }


def _record(history: jax.Array, amax: jax.Array) -> jax.Array:
    # TE / Flax bookkeeping: a window of the last L amaxes (roll, then write slot 0).
    return jnp.roll(history, -1).at[0].set(amax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fp8_einsum_delayed(eq: str, x: jax.Array, w: jax.Array, entry: DelayedEntry) -> jax.Array:
    """``einsum(eq, x, w)`` as FP8 GEMMs with the scales carried in `entry`.

    The cotangent returned for `entry` is not a gradient: its histories are the new histories
    (this step's amax recorded) and its scales are zero; `update_delayed_state` turns them
    into the next step's state.
    """
    return _delayed_fwd(eq, x, w, entry)[0]


def _delayed_fwd(eq, x, w, entry):
    sx, sw = entry["x"]["scale"], entry["w"]["scale"]
    x8, w8 = to_fp8(x, E4M3, sx), to_fp8(w, E4M3, sw)
    y = _scaled_gemm(eq, x8, sx, w8, sw, x.dtype)
    return y, (x8, sx, w8, sw, _dtypes(x, w), entry, _amax(x), _amax(w))


def _delayed_bwd(eq, res, dy):
    x8, sx, w8, sw, (xd, wd), entry, amax_x, amax_w = res
    sdy = entry["dy"]["scale"]
    dx, dw = _backward(eq, dy, E5M2, sdy, x8, sx, w8, sw, xd.dtype, wd.dtype)
    amaxes = {"x": amax_x, "w": amax_w, "dy": _amax(dy)}
    new = {
        r: {"history": _record(entry[r]["history"], amaxes[r]), "scale": jnp.zeros((), jnp.float32)}
        for r in _ROLES
    }
    return dx, dw, new


fp8_einsum_delayed.defvjp(_delayed_fwd, _delayed_bwd)


def update_delayed_state(old: dict, recorded: dict, margin: int = 0) -> dict:
    """The next step's delayed-scaling state.

    old: the state the step ran with; recorded: the histories the step recorded (the "gradient"
    of the state; with micro-batches, their elementwise max — the amax of the whole batch).
    """

    def one(old_entry, rec_entry):
        out = {}
        for r in _ROLES:
            dtype = E5M2 if r == "dy" else E4M3
            hist = rec_entry[r]["history"]
            amax = jnp.max(hist)
            out[r] = {
                "history": hist,
                "scale": scale_from_amax(amax, dtype, old_entry[r]["scale"], margin),
            }
        return out

    return {k: one(old[k], recorded[k]) for k in old}


# ----------------------------------------------------------------------- blockwise


def _tile_qdq(x_NK: jax.Array, tile: int) -> jax.Array:
    """Quantize-dequantize ``[..., K]`` with one E4M3 scale per `tile` elements of K."""
    k = x_NK.shape[-1]
    pad = -k % tile
    xp = jnp.pad(x_NK.astype(jnp.float32), [(0, 0)] * (x_NK.ndim - 1) + [(0, pad)])
    xb = xp.reshape(*xp.shape[:-1], -1, tile)
    s = scale_from_amax(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), E4M3)
    return qdq(xb, E4M3, s).reshape(xp.shape)[..., :k]


def _block_qdq(w_NK: jax.Array, tile: int) -> jax.Array:
    """Quantize-dequantize ``[N, K]`` with one E4M3 scale per `tile × tile` block."""
    n, k = w_NK.shape
    wp = jnp.pad(w_NK.astype(jnp.float32), [(0, -n % tile), (0, -k % tile)])
    wb = wp.reshape(wp.shape[0] // tile, tile, wp.shape[1] // tile, tile)
    s = scale_from_amax(jnp.max(jnp.abs(wb), axis=(1, 3), keepdims=True), E4M3)
    return qdq(wb, E4M3, s).reshape(wp.shape)[:n, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def fp8_einsum_blockwise(eq: str, x: jax.Array, w: jax.Array, tile: int = TILE) -> jax.Array:
    """``einsum(eq, x, w)`` with DeepSeek-V3 fine-grained scaling: activations (and output
    gradients) in 1×`tile` groups along each GEMM's inner dims, weights in `tile`×`tile`
    blocks; every operand E4M3. The GEMM itself runs on the dequantized values (the
    per-group scales cannot be factored out of the sum, as DeepSeek's kernel does on the
    fly every 128 elements)."""
    return _blockwise_fwd(eq, x, w, tile)[0]


def _blockwise_fwd(eq, x, w, tile):
    a, b, c = es.parse(eq)
    k_fwd = es.inner(a, b, c)
    xq = es.along(x, a, k_fwd, lambda v: _tile_qdq(v, tile))
    wq = es.along_2d(w, b, k_fwd, lambda v: _block_qdq(v, tile))
    y = jnp.einsum(eq, xq.astype(x.dtype), wq.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype), (x, wq.astype(w.dtype))


def _blockwise_bwd(eq, tile, res, dy):
    x, wq = res
    a, b, c = es.parse(eq)
    # dX: dy grouped along the output channels it sums over; W's 128×128 blocks serve both
    # orientations. dW: dy and x grouped along the tokens (128×1 tiles in DeepSeek's terms).
    dy_dx = es.along(dy, c, es.inner(c, b, a), lambda v: _tile_qdq(v, tile))
    k_dw = es.inner(c, a, b)
    dy_dw = es.along(dy, c, k_dw, lambda v: _tile_qdq(v, tile))
    x_dw = es.along(x, a, k_dw, lambda v: _tile_qdq(v, tile))
    dt = x.dtype
    return es.gemm_grads(eq, dy_dx.astype(dt), wq.astype(dt), dy_dw.astype(dt),
                         x_dw.astype(dt), dt, wq.dtype)  # fmt: skip


fp8_einsum_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
