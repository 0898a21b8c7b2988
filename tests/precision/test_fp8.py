"""Scaled FP8 projections: error bounds the formats imply, delayed-scaling bookkeeping
against a NumPy model, blockwise scaling, and the six-input ExMy GEMM."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxllm.precision import (
    exmy_einsum,
    fp8_einsum_blockwise,
    fp8_einsum_current,
    fp8_einsum_delayed,
    init_delayed_entry,
    quantize_exmy,
    update_delayed_state,
)

U4, U5 = 2.0**-4, 2.0**-3  # unit roundoff of E4M3 (3 mantissa bits) and E5M2 (2 bits)
SUB4, SUB5 = 2.0**-10, 2.0**-17  # half the smallest subnormal: E4M3 2^-9, E5M2 2^-16
EQ = "BTD,DHK->BTHK"


def _data(seed=0, b=2, t=5, d=48, h=3, k=8):
    r = np.random.default_rng(seed)
    x = r.standard_normal((b, t, d)).astype(np.float32)
    w = (0.1 * r.standard_normal((d, h, k))).astype(np.float32)
    dy = (1e-3 * r.standard_normal((b, t, h, k))).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy)


def _vjp(fn, x, w, dy):
    @jax.jit  # one compile instead of many eager op dispatches
    def run(x, w, dy):
        y, pull = jax.vjp(fn, x, w)
        return (y, *pull(dy))

    return run(x, w, dy)


def test_current_scaling_is_within_the_format_error():
    x, w, dy = _data()
    y, dx, dw = _vjp(lambda a, b: fp8_einsum_current(EQ, a, b), x, w, dy)
    y0, dx0, dw0 = _vjp(lambda a, b: jnp.einsum(EQ, a, b), x, w, dy)
    ax, aw, ady = (float(jnp.max(jnp.abs(v))) for v in (x, w, dy))
    sx, sw, sdy = 448 / ax, 448 / aw, 57344 / ady
    # each element: |q(v) - v| ≤ u|v| + (half a subnormal)/scale; products add both errors
    absx, absw, absdy = jnp.abs(x), jnp.abs(w), jnp.abs(dy)
    bound_y = (2 * U4 + U4**2) * jnp.einsum(EQ, absx, absw) + (1 + U4) * (
        SUB4 / sx * jnp.einsum(EQ, jnp.ones_like(x), absw)
        + SUB4 / sw * jnp.einsum(EQ, absx, jnp.ones_like(w))
    )
    assert jnp.all(jnp.abs(y - y0) <= bound_y + 1e-6)
    bound_dx = (U4 + U5 + U4 * U5) * jnp.einsum("BTHK,DHK->BTD", absdy, absw) + (1 + U4) * (
        SUB5 / sdy * jnp.einsum("BTHK,DHK->BTD", jnp.ones_like(dy), absw)
        + SUB4 / sw * jnp.einsum("BTHK,DHK->BTD", absdy, jnp.ones_like(w))
    )
    assert jnp.all(jnp.abs(dx - dx0) <= bound_dx + 1e-9)
    bound_dw = (U4 + U5 + U4 * U5) * jnp.einsum("BTHK,BTD->DHK", absdy, absx) + (1 + U4) * (
        SUB5 / sdy * jnp.einsum("BTHK,BTD->DHK", jnp.ones_like(dy), absx)
        + SUB4 / sx * jnp.einsum("BTHK,BTD->DHK", absdy, jnp.ones_like(x))
    )
    assert jnp.all(jnp.abs(dw - dw0) <= bound_dw + 1e-9)
    # and FP8 really happened: the error is of the formats' size, not float32's
    rel = float(jnp.linalg.norm(y - y0) / jnp.linalg.norm(y0))
    assert 1e-3 < rel < 0.05


def test_current_scaling_uses_ml_dtypes_e4m3():
    x, w, _ = _data(1)
    y = jax.jit(lambda a, b: fp8_einsum_current(EQ, a, b))(x, w)
    xn, wn = np.asarray(x), np.asarray(w)
    sx, sw = np.float32(448) / np.abs(xn).max(), np.float32(448) / np.abs(wn).max()
    xq = (xn * sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    wq = (wn * sw).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    want = np.einsum(EQ, xq, wq) / (sx * sw)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_current_backward_is_the_mixed_fp8_gemm_of_the_saved_operands():
    """dX = E5M2(dy)·E4M3(w)ᵀ and dW = E4M3(x)ᵀ·E5M2(dy), scales divided out after the GEMM:
    ml_dtypes' roundings in NumPy, float32 sums (the CPU's FP8 dot is exact up to their order)."""
    x, w, dy = _data(6)
    _, dx, dw = _vjp(lambda a, b: fp8_einsum_current(EQ, a, b), x, w, dy)
    xn, wn, dyn = (np.asarray(v) for v in (x, w, dy))
    sx, sw = np.float32(448) / np.abs(xn).max(), np.float32(448) / np.abs(wn).max()
    sdy = np.float32(57344) / np.abs(dyn).max()
    xq = (xn * sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    wq = (wn * sw).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    dyq = (dyn * sdy).astype(ml_dtypes.float8_e5m2).astype(np.float32)
    want_dx = np.einsum("BTHK,DHK->BTD", dyq, wq) / (sdy * sw)
    want_dw = np.einsum("BTHK,BTD->DHK", dyq, xq) / (sdy * sx)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-6 * np.abs(want_dx).max())
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-6 * np.abs(want_dw).max())


def _np_qdq(v, dtype, scale):
    m = float(ml_dtypes.finfo(dtype).max)
    return np.clip(v * scale, -m, m).astype(dtype).astype(np.float32) / scale


def test_delayed_bookkeeping_step_by_step_against_numpy():
    hist_len, margin = 3, 1
    x, w, dy = (np.asarray(v) for v in _data(2))
    # amax over the steps: growing, an all-zero step, a non-finite gradient, then quiet
    factors = [1.0, 4.0, 0.5, 0.0, 2.0, 1.0, 1.0, 1.0]
    entry = init_delayed_entry(hist_len)
    ref = {r: {"history": np.zeros(hist_len, np.float32), "scale": np.float32(1)} for r in
           ("x", "w", "dy")}  # fmt: skip
    fmax = {"x": 448.0, "w": 448.0, "dy": 57344.0}
    for t, f in enumerate(factors):
        xt, dyt = x * np.float32(f), dy * np.float32(f)
        if t == 4:
            dyt = dyt.copy()
            dyt[0, 0, 0, 0] = np.inf
        y, pull = jax.vjp(lambda a, b, e: fp8_einsum_delayed(EQ, a, b, e), xt, w, entry)
        _, _, recorded = pull(jnp.asarray(dyt))
        # forward used the scales carried in: NumPy with the same casts
        want = np.einsum(
            EQ,
            _np_qdq(xt, ml_dtypes.float8_e4m3fn, ref["x"]["scale"]),
            _np_qdq(w, ml_dtypes.float8_e4m3fn, ref["w"]["scale"]),
        )
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
        entry = update_delayed_state({"p": entry}, {"p": recorded}, margin)["p"]
        for role, v in (("x", xt), ("w", w), ("dy", dyt)):
            h = np.roll(ref[role]["history"], -1)
            h[0] = np.abs(v).max()
            amax = h.max()
            ok = amax > 0 and np.isfinite(amax)
            scale = np.float32(fmax[role] / amax / 2**margin) if ok else ref[role]["scale"]
            ref[role] = {"history": h, "scale": scale}
            np.testing.assert_array_equal(entry[role]["history"], h)
            np.testing.assert_allclose(entry[role]["scale"], scale, rtol=1e-6)
    # the window forgot the 4x step, and the inf step kept the old dy scale until it left
    assert np.isfinite(float(entry["dy"]["scale"]))


def test_blockwise_survives_outliers_that_ruin_a_per_tensor_scale():
    r = np.random.default_rng(3)
    x = r.standard_normal((2, 64, 256)).astype(np.float32)
    x[0, 0, :128] *= 1e6  # one 1×128 tile of huge activations
    w = (0.05 * r.standard_normal((256, 200))).astype(np.float32)
    x, w = jnp.asarray(x), jnp.asarray(w)
    y0 = jnp.einsum("BTD,DF->BTF", x, w)
    rest = (slice(1, None),)  # rows without the outlier tile
    err = {}
    for name, fn in (("current", fp8_einsum_current), ("blockwise", fp8_einsum_blockwise)):
        y = jax.jit(lambda a, b, fn=fn: fn("BTD,DF->BTF", a, b))(x, w)
        err[name] = float(jnp.linalg.norm((y - y0)[rest]) / jnp.linalg.norm(y0[rest]))
    # per-tile scales: E4M3 rounding everywhere, relative RMS ≈ 2^-4/√3 per operand, so
    # ≈ 0.04 for the product of two; the per-tensor scale pushes the other rows into E4M3's
    # subnormals (a 1e6 outlier leaves them ~2^-12 of the range)
    assert err["blockwise"] < 0.06
    assert err["current"] > 3 * err["blockwise"]


def test_blockwise_gradients_are_close():
    x, w, dy = _data(4, d=160)
    g = _vjp(lambda a, b: fp8_einsum_blockwise(EQ, a, b), x, w, dy)
    g0 = _vjp(lambda a, b: jnp.einsum(EQ, a, b), x, w, dy)
    for a, b in zip(g, g0):
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert 1e-4 < rel < 0.05, rel


@pytest.mark.parametrize("which", range(6))
def test_exmy_einsum_quantizes_exactly_the_chosen_gemm_input(which):
    x, w, dy = _data(5)
    spec = (2, 1, 16)
    specs = tuple(spec if i == which else None for i in range(6))
    y, dx, dw = _vjp(lambda a, b: exmy_einsum(EQ, a, b, specs), x, w, dy)
    q = jax.jit(lambda v, axis: quantize_exmy(v, 2, 1, block_size=16, axis=axis),
                static_argnums=1)  # fmt: skip

    def q_flat(v, lead):  # blocks along the flattened leading dims (the B·T tokens)
        flat = v.reshape(-1, *v.shape[lead:])
        return q(flat, 0).reshape(v.shape)

    def q_hk(v, first):  # blocks along the flattened (H, K) dims
        if first:
            return q(v.reshape(-1, v.shape[-1]).T, -1).T.reshape(v.shape)
        return q(v.reshape(*v.shape[:-2], -1), -1).reshape(v.shape)

    qx = q(x, -1) if which == 0 else x
    qw = q(w, 0) if which == 1 else w
    dy_dx = q_hk(dy, False) if which == 2 else dy
    w_dx = w.reshape(w.shape[0], -1)
    w_dx = (q(w_dx, -1) if which == 3 else w_dx).reshape(w.shape)
    dy_dw = q_flat(dy, 2) if which == 4 else dy
    x_dw = q_flat(x, 2) if which == 5 else x
    np.testing.assert_allclose(y, jnp.einsum(EQ, qx, qw), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, jnp.einsum("BTHK,DHK->BTD", dy_dx, w_dx), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(dw, jnp.einsum("BTHK,BTD->DHK", dy_dw, x_dw), rtol=1e-5, atol=1e-9)
    y0, dx0, dw0 = _vjp(lambda a, b: jnp.einsum(EQ, a, b), x, w, dy)
    changed = [not np.allclose(a, b, rtol=1e-6) for a, b in ((y, y0), (dx, dx0), (dw, dw0))]
    assert changed == [which in (0, 1), which in (2, 3), which in (4, 5)]
