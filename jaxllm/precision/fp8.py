"""Scaled FP8 projections: current, delayed (Transformer Engine) and blockwise (DeepSeek-V3).

Every projection ``y = einsum(eq, x, w)`` becomes three FP8 GEMMs (see `einsum.py`): the
forward on E4M3 x and w, and the two backward GEMMs on the output gradient (E5M2, the HYBRID
recipe; blockwise uses E4M3 everywhere as DeepSeek-V3 does) with the saved FP8 x and w.
Quantize means ``fp8(clip(v · s))`` with a float32 scale ``s``. The FP8 operands (not the
high-precision ones) are what the backward keeps.

On the XLA path (``fp8_impl="xla"``) each GEMM is an einsum of the FP8 arrays themselves with
``preferred_element_type=float32``, divided by its two scalar scales after the dot (as Flax's
``Fp8DirectDotGeneralOp`` does): E4M3 × E4M3 forward, E5M2 × E4M3 for dX and dW. That is what
XLA:GPU's GemmRewriter makes a cuBLASLt FP8 GEMM of on Ada / Hopper (it takes either mixed
pair, refuses E5M2 × E5M2) and folds a division of its output by a broadcast scalar into the
GEMM's scale (its ``F8ScaleD``); `tests/precision/test_fp8_hlo.py` checks that the lowered
train step has this form for every projection. The CPU emulates the FP8 dot exactly (products
of two FP8 values are exact in float32, sums in float32): the numbers of dequantize-then-dot
in float32, up to the order of the sum.

- `current`: per-tensor scales from this step's amax: ``s = fp8_max / amax``.
- `delayed`: per-tensor scales computed from an amax history of the last
  `amax_history_len` steps (TE ``DelayedScaling`` with ``amax_compute_algo="max"``): the step
  quantizes with the scale it carries, records its amax, and the train step then updates the
  history and scale with `update_delayed_state` (scale ``fp8_max / max(history) / 2^margin``,
  the old scale kept when that max is 0 or not finite). The new histories leave the
  differentiated function as the "gradient" of the state (Flax's overwrite-with-gradient
  trick), so a train step gets them from `jax.grad` with no side channel.
- `blockwise`: one scale per 1×128 tile of activations and per 128×128 block of weights,
  along each GEMM's inner dims (``s = 448 / amax`` per tile), E4M3 for every operand. The
  scales vary along the sum, so they cannot leave the dot as one factor: the XLA path keeps
  dequantize-then-dot in the input dtype (a dot per 128-wide group would write a
  [K/128, M, N] float32 partial product per GEMM), and ``fp8_impl="pallas"`` applies them
  inside the kernel, per 128 elements of the sum.

What runs in FP8, per chip (TPU: ahead-of-time compiles for each topology; the cycles are
XLA:TPU's own estimate for an 8192³ dot, in its optimized HLO):
- H100 / H200: FP8 tensor cores at 2× the dense bf16 rate, through the rewrite above (not
  checked here: the ``__cublas$lt$matmul$f8`` call appears only when compiling for a GPU).
- TPU v5e, v5p, v6e: no FP8 matrix units. XLA:TPU hands the FP8 operands to the convolution
  as they are (no convert in the optimized HLO, so the widening for the MXU is below the HLO,
  in the fusion's generated code) and estimates the FP8 dot at about the bf16 dot's cycles
  (millions: v5p 4.68 vs 4.55, v5e 8.74 vs 9.28, v6e 2.45 vs 2.83; int8 takes 1.6-2.1× fewer).
  FP8 there is a memory and communication format (half the bytes of bf16 wherever values are
  kept or sent in FP8) at bf16 matrix throughput.
- TPU7x: FP8 MXUs; the same dot (E4M3 × E4M3 or E5M2 × E4M3) is estimated at 1.23 million
  cycles against 2.53 million in bf16.

The MoE experts' grouped GEMM (`ragged.py`) still widens its FP8 values before ``ragged_dot``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxllm.precision import einsum as es
from jaxllm.precision import fp8_gemm

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
FP8_MAX = {jnp.dtype(E4M3): 448.0, jnp.dtype(E5M2): 57344.0}
TILE = 128
IMPLS = ("xla", "pallas")  # precision.fp8_impl: XLA's dot_general or the Pallas FP8 kernel

# Delayed-scaling state of one projection: a history and a scale per GEMM input.
DelayedEntry = dict[str, dict[str, jax.Array]]
_ROLES = ("x", "w", "dy")
# Keys of the delayed state of a scanned run of layers, whose entries are stacked [U, ...].
SCAN_PREFIX = "scan/"


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


def _kernel_plan(eq: str, impl: str, *scales) -> fp8_gemm.Plan | None:
    """The 2-D form of the projection when `impl` is "pallas" and the kernel can take it: a
    plain matmul (`fp8_gemm.plan`) with per-tensor scales (per-expert weight scales and batch
    letters stay on XLA's dot_general). None means XLA."""
    if impl not in IMPLS:
        raise ValueError(f"fp8 impl must be one of {IMPLS}, not {impl!r}")
    if impl == "xla" or any(jnp.ndim(s) for s in scales):
        return None
    return fp8_gemm.plan(eq)


def _f8_einsum(eq: str, a8: jax.Array, b8: jax.Array) -> jax.Array:
    """``einsum(eq, a8, b8)`` with the FP8 operands fed to the dot as they are, accumulated
    and returned in float32; the caller divides by the scalar scales after it."""
    return jnp.einsum(eq, a8, b8, preferred_element_type=jnp.float32)


def _scaled_gemm(eq, x8, sx, w8, sw, out_dtype, impl="xla"):
    if (p := _kernel_plan(eq, impl, sx, sw)) is not None:
        y2 = fp8_gemm.matmul(p.x2(x8), p.w2(w8), 1.0 / (sx * sw), 1.0, out_dtype, tokens="rows")
        return p.y(y2, p.sizes(x8, w8, other_is_w=True))
    return (_f8_einsum(eq, x8, w8) / (sx * sw)).astype(out_dtype)


def _backward(eq, dy, dy_dtype, sdy, x8, sx, w8, sw, x_dtype, w_dtype, impl="xla"):
    dy8 = to_fp8(dy, dy_dtype, sdy)
    if (p := _kernel_plan(eq, impl, sx, sw)) is not None:
        # dX = dY·Wᵀ, dW = Xᵀ·dY on the saved FP8 operands (transposed in FP8)
        dy2, sizes = p.y2(dy8), p.sizes(x8, dy, other_is_w=False)
        dx = fp8_gemm.matmul(dy2, p.w2(w8).T, 1.0 / (sdy * sw), 1.0, x_dtype, tokens="rows")
        dw = fp8_gemm.matmul(p.x2(x8).T, dy2, 1.0 / (sdy * sx), 1.0, w_dtype, tokens="inner")
        return p.x_back(dx, sizes), p.w_back(dw, sizes)
    a, b, c = es.parse(eq)
    dx = _f8_einsum(f"{c},{b}->{a}", dy8, w8) / (sdy * sw)  # E5M2 × E4M3
    dw = _f8_einsum(f"{c},{a}->{b}", dy8, x8) / (sdy * sx)
    return dx.astype(x_dtype), dw.astype(w_dtype)


# ------------------------------------------------------------------------- current


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def fp8_einsum_current(eq: str, x: jax.Array, w: jax.Array, impl: str = "xla") -> jax.Array:
    """``einsum(eq, x, w)`` as FP8 GEMMs with per-tensor scales from this step's amax;
    impl: "xla" (dot_general) or "pallas" (`kernels_pallas.fp8_matmul`)."""
    return _current_fwd(eq, x, w, impl)[0]


def _current_fwd(eq, x, w, impl):
    sx, sw = scale_from_amax(_amax(x), E4M3), scale_from_amax(_amax(w), E4M3)
    x8, w8 = to_fp8(x, E4M3, sx), to_fp8(w, E4M3, sw)
    return _scaled_gemm(eq, x8, sx, w8, sw, x.dtype, impl), (x8, sx, w8, sw, _dtypes(x, w))


def _dtypes(x, w):
    # residuals must be arrays: empty ones carry the input dtypes to the backward
    return jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype)


def _current_bwd(eq, impl, res, dy):
    x8, sx, w8, sw, (xd, wd) = res
    sdy = scale_from_amax(_amax(dy), E5M2)
    return _backward(eq, dy, E5M2, sdy, x8, sx, w8, sw, xd.dtype, wd.dtype, impl)


fp8_einsum_current.defvjp(_current_fwd, _current_bwd)


# ------------------------------------------------------------------------- delayed


def init_delayed_entry(history_len: int, w_scales: tuple[int, ...] = ()) -> DelayedEntry:
    """A projection's fresh state: zero histories, unit scales. `w_scales`: the shape of the
    weight's scale (``()`` per tensor, ``(E,)`` one per expert); its history is
    ``[history_len, *w_scales]``."""
    shapes = {"x": (), "w": tuple(w_scales), "dy": ()}
    return {
        r: {
            "history": jnp.zeros((history_len, *shapes[r]), jnp.float32),
            "scale": jnp.ones(shapes[r], jnp.float32),
        }
        for r in _ROLES
    }


def record_amax(history: jax.Array, amax: jax.Array) -> jax.Array:
    """TE / Flax bookkeeping: a window of the last L amaxes (roll, then write slot 0)."""
    return jnp.roll(history, -1, axis=0).at[0].set(amax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4))
def fp8_einsum_delayed(
    eq: str, x: jax.Array, w: jax.Array, entry: DelayedEntry, impl: str = "xla"
) -> jax.Array:
    """``einsum(eq, x, w)`` as FP8 GEMMs with the scales carried in `entry`.

    The cotangent returned for `entry` is not a gradient: its histories are the new histories
    (this step's amax recorded) and its scales are zero; `update_delayed_state` turns them
    into the next step's state.
    """
    return _delayed_fwd(eq, x, w, entry, impl)[0]


def _delayed_fwd(eq, x, w, entry, impl):
    sx, sw = entry["x"]["scale"], entry["w"]["scale"]
    x8, w8 = to_fp8(x, E4M3, sx), to_fp8(w, E4M3, sw)
    y = _scaled_gemm(eq, x8, sx, w8, sw, x.dtype, impl)
    return y, (x8, sx, w8, sw, _dtypes(x, w), entry, _amax(x), _amax(w))


def _delayed_bwd(eq, impl, res, dy):
    x8, sx, w8, sw, (xd, wd), entry, amax_x, amax_w = res
    sdy = entry["dy"]["scale"]
    dx, dw = _backward(eq, dy, E5M2, sdy, x8, sx, w8, sw, xd.dtype, wd.dtype, impl)
    amaxes = {"x": amax_x, "w": amax_w, "dy": _amax(dy)}
    new = {
        r: {
            "history": record_amax(entry[r]["history"], amaxes[r]),
            "scale": jnp.zeros((), jnp.float32),
        }
        for r in _ROLES
    }
    return dx, dw, new


fp8_einsum_delayed.defvjp(_delayed_fwd, _delayed_bwd)


def update_delayed_state(old: dict, recorded: dict, margin: int = 0) -> dict:
    """The next step's delayed-scaling state.

    old: the state the step ran with; recorded: the histories the step recorded (the "gradient"
    of the state; with micro-batches, their elementwise max — the amax of the whole batch).
    Entries of scanned layers (keys starting with `SCAN_PREFIX`) are stacked [U, ...] and
    updated per layer.
    """

    def one(old_entry, rec_entry):
        out = {}
        for r in _ROLES:
            dtype = E5M2 if r == "dy" else E4M3
            hist = rec_entry[r]["history"]
            amax = jnp.max(hist, axis=0)  # over the window; per expert for expert weights
            out[r] = {
                "history": hist,
                "scale": scale_from_amax(amax, dtype, old_entry[r]["scale"], margin),
            }
        return out

    return {
        k: (jax.vmap(one) if k.startswith(SCAN_PREFIX) else one)(old[k], recorded[k]) for k in old
    }


# ----------------------------------------------------------------------- blockwise


def _tile_quant(x_NK: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
    """``[..., K]`` in E4M3 with one scale per `tile` elements of K; the scales [..., ⌈K/tile⌉]."""
    k = x_NK.shape[-1]
    xp = jnp.pad(x_NK.astype(jnp.float32), [(0, 0)] * (x_NK.ndim - 1) + [(0, -k % tile)])
    xb = xp.reshape(*xp.shape[:-1], -1, tile)
    s = scale_from_amax(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), E4M3)
    return to_fp8(xb, E4M3, s).reshape(xp.shape)[..., :k], s[..., 0]


def _tile_qdq(x_NK: jax.Array, tile: int) -> jax.Array:
    """Quantize-dequantize ``[..., K]`` with one E4M3 scale per `tile` elements of K."""
    x8, s = _tile_quant(x_NK, tile)
    return x8.astype(jnp.float32) / jnp.repeat(s, tile, axis=-1)[..., : x_NK.shape[-1]]


def _block_quant(w_NK: jax.Array, tile: int) -> tuple[jax.Array, jax.Array]:
    """A matrix in E4M3 with one scale per `tile × tile` block; the scales [⌈N/t⌉, ⌈K/t⌉]."""
    n, k = w_NK.shape
    wp = jnp.pad(w_NK.astype(jnp.float32), [(0, -n % tile), (0, -k % tile)])
    wb = wp.reshape(wp.shape[0] // tile, tile, wp.shape[1] // tile, tile)
    s = scale_from_amax(jnp.max(jnp.abs(wb), axis=(1, 3), keepdims=True), E4M3)
    return to_fp8(wb, E4M3, s).reshape(wp.shape)[:n, :k], s[:, 0, :, 0]


def _block_qdq(w_NK: jax.Array, tile: int) -> jax.Array:
    """Quantize-dequantize ``[N, K]`` with one E4M3 scale per `tile × tile` block."""
    w8, s = _block_quant(w_NK, tile)
    full = jnp.repeat(jnp.repeat(s, tile, axis=0), tile, axis=1)[: w_NK.shape[0], : w_NK.shape[1]]
    return w8.astype(jnp.float32) / full


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def fp8_einsum_blockwise(
    eq: str, x: jax.Array, w: jax.Array, tile: int = TILE, impl: str = "xla"
) -> jax.Array:
    """``einsum(eq, x, w)`` with DeepSeek-V3 fine-grained scaling: activations (and output
    gradients) in 1×`tile` groups along each GEMM's inner dims, weights in `tile`×`tile`
    blocks; every operand E4M3. The GEMM itself runs on the dequantized values (the
    per-group scales cannot be factored out of the sum, as DeepSeek's kernel does on the
    fly every 128 elements). impl="pallas" runs the three GEMMs in the kernel on the FP8
    values and their scales, which applies them per 128 elements of the sum as DeepSeek's
    does (tile must be the kernel's 128; otherwise XLA)."""
    return _blockwise_fwd(eq, x, w, tile, impl)[0]


def _blockwise_plan(eq, tile, impl):
    p = _kernel_plan(eq, impl)
    return p if p is not None and tile == TILE else None


def _blockwise_fwd(eq, x, w, tile, impl):
    if (p := _blockwise_plan(eq, tile, impl)) is not None:
        x8, sx = _tile_quant(p.x2(x), tile)  # [M, K], [M, K/128]
        w8, sw = _block_quant(p.w2(w), tile)  # [K, N], [K/128, N/128]
        y2 = fp8_gemm.matmul(x8, w8, 1.0 / sx, 1.0 / sw, x.dtype, tokens="rows")
        return p.y(y2, p.sizes(x, w, other_is_w=True)), (x, w8, sw, _dtypes(x, w)[1])
    a, b, c = es.parse(eq)
    k_fwd = es.inner(a, b, c)
    xq = es.along(x, a, k_fwd, lambda v: _tile_qdq(v, tile))
    wq = es.along_2d(w, b, k_fwd, lambda v: _block_qdq(v, tile))
    y = jnp.einsum(eq, xq.astype(x.dtype), wq.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype), (x, wq.astype(w.dtype))


def _blockwise_bwd(eq, tile, impl, res, dy):
    if (p := _blockwise_plan(eq, tile, impl)) is not None:
        x, w8, sw, wd = res
        sizes, dy2 = p.sizes(x, dy, other_is_w=False), p.y2(dy)
        # the same groupings as the XLA form below: dX sums over N, so dy in 1×128 groups
        # along N and W's blocks transposed; dW sums over tokens, so x and dy grouped along M
        dy8, sdy = _tile_quant(dy2, tile)
        dx = fp8_gemm.matmul(dy8, w8.T, 1.0 / sdy, 1.0 / sw.T, x.dtype, tokens="rows")
        dyt8, sdyt = _tile_quant(dy2.T, tile)  # [N, M], [N, M/128]
        xt8, sxt = _tile_quant(p.x2(x).T, tile)  # [K, M], [K, M/128]
        dw = fp8_gemm.matmul(xt8, dyt8.T, 1.0 / sxt, 1.0 / sdyt.T, wd.dtype, tokens="inner")
        return p.x_back(dx, sizes), p.w_back(dw, sizes)
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
