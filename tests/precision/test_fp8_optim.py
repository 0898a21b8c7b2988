"""FP8-LM O1/O2 optimizer wrapper: state formats, bytes per parameter, and updates that track
the float32 optimizer."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from jaxllm.optim.came import came
from jaxllm.precision.fp8_optim import (
    ScaledFP8,
    fp8_gradients,
    fp8_lm,
    train_state_bytes_per_param,
)


def _problem(seed=0):
    r = np.random.default_rng(seed)
    params = {"w": jnp.asarray(r.standard_normal((64, 32)), jnp.float32),
              "b": jnp.asarray(r.standard_normal((32,)), jnp.float32)}  # fmt: skip
    target = {k: jnp.asarray(r.standard_normal(v.shape), jnp.float32) for k, v in params.items()}

    def loss(p):
        return sum(jnp.mean((p[k] - target[k]) ** 2) for k in p)

    return params, loss


def _train(tx, steps=60):
    params, loss = _problem()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        l, g = jax.value_and_grad(loss)(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, l

    losses = []
    for _ in range(steps):
        params, state, l = step(params, state)
        losses.append(float(l))
    return np.array(losses), params, state


@pytest.mark.parametrize(
    "make", [lambda: optax.adamw(3e-2), lambda: came(3e-2)], ids=["adamw", "came"]
)
def test_levels_train_and_o1_tracks_float32(make):
    ref, _, _ = _train(make())
    o1, _, _ = _train(fp8_lm(make(), "O1"))
    o2, _, state = _train(fp8_lm(make(), "O2"))
    assert ref[-1] < 0.5 * ref[0]
    # O1 only rounds the gradients (E4M3, ≤ 2^-4 relative, unbiased on average): the loss
    # stays within 5% of the float32 run's for 60 steps.
    np.testing.assert_allclose(o1, ref, rtol=0.05)
    # O2 re-rounds the first moment every step: with 3 mantissa bits an update of
    # (1 - β1) = 10% is below the 12.5% spacing, so m lags (FP8-LM accepts this: the direction
    # matters). It must still train as well: within 30% of the float32 loss, and falling.
    assert o2[-1] < 0.5 * o2[0]
    np.testing.assert_allclose(o2, ref, rtol=0.3)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, ScaledFP8))
    scaled = [x for x in leaves if isinstance(x, ScaledFP8)]
    assert any(x.data.dtype == jnp.float8_e4m3fn for x in scaled)
    assert any(x.data.dtype == jnp.float16 for x in scaled)


def test_o2_state_is_the_float32_state_rounded():
    params, loss = _problem(1)
    g = jax.grad(loss)(params)
    inner = optax.adam(1e-2)
    _, ref = inner.update(fp8_gradients(g), inner.init(params), params)
    tx = fp8_lm(optax.adam(1e-2), "O2")
    _, state = tx.update(g, tx.init(params), params)
    mu, nu = state[0].mu, state[0].nu
    for k in params:
        m_ref, v_ref = np.asarray(ref[0].mu[k]), np.asarray(ref[0].nu[k])
        sm = np.float32(448) / np.abs(m_ref).max()
        want_m = (m_ref * sm).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) / sm
        np.testing.assert_allclose(mu[k].data.astype(jnp.float32) / mu[k].scale, want_m, rtol=1e-6)
        sv = np.float32(65504 / 2) / np.abs(v_ref).max()
        want_v = (v_ref * sv).astype(np.float16).astype(np.float32) / sv
        np.testing.assert_allclose(nu[k].data.astype(jnp.float32) / nu[k].scale, want_v, rtol=1e-6)


def test_bytes_per_param_per_level():
    params = {"w": jnp.zeros((256, 256)), "v": jnp.zeros((256, 128))}
    got = {}
    levels = (
        ("fp32", optax.adamw(1e-3), 4),
        ("O1", fp8_lm(optax.adamw(1e-3), "O1"), 1),
        ("O2", fp8_lm(optax.adamw(1e-3), "O2"), 1),
    )
    for level, tx, grad_bytes in levels:
        got[level] = train_state_bytes_per_param(params, tx.init(params), grad_bytes)
    assert got["fp32"]["total"] == pytest.approx(16, abs=0.01)  # 4 + 4 + 4 + 4
    assert got["O1"]["total"] == pytest.approx(13, abs=0.01)  # 4 + 1 + 4 + 4
    assert got["O2"]["total"] == pytest.approx(8, abs=0.01)  # 4 + 1 + 1 + 2 (+ scales)


def test_fp8_gradients_rounding():
    g = {"a": jnp.linspace(-1.0, 1.0, 1001)}
    q = fp8_gradients(g)["a"]
    # per-tensor scale to 448: E4M3's 3 mantissa bits, relative error ≤ 2^-4 above subnormals
    big = jnp.abs(g["a"]) > 2.0**-6 / 448
    assert jnp.all(jnp.abs(q - g["a"])[big] <= 2.0**-4 * jnp.abs(g["a"])[big])
    assert not jnp.array_equal(q, g["a"])


def test_unknown_level():
    with pytest.raises(ValueError, match="fp8_level"):
        fp8_lm(optax.adamw(1e-3), "O3")
