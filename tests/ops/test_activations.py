"""`swiglu`'s custom backward against autodiff of silu(gate) ⊙ up, and what it keeps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from jaxllm.ops.activations import swiglu


def formula(g, u):
    return jax.nn.silu(g) * u


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matches_autodiff_of_the_formula(dtype):
    kg, ku, kd = jax.random.split(jax.random.key(0), 3)
    g = (4 * jax.random.normal(kg, (3, 7, 16))).astype(dtype)  # both tails of the sigmoid
    u = jax.random.normal(ku, (3, 7, 16)).astype(dtype)
    dh = jax.random.normal(kd, (3, 7, 16)).astype(dtype)
    h, vjp = jax.vjp(swiglu, g, u)
    h_ref, vjp_ref = jax.vjp(formula, g, u)
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_ref, np.float32))
    # float32 recompute: as exact as the formula in float32, closer than bf16 autodiff
    want = jax.vjp(formula, g.astype(jnp.float32), u.astype(jnp.float32))[1](dh.astype(jnp.float32))
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
    for got, ref, exact in zip(vjp(dh), vjp_ref(dh), want, strict=True):
        assert got.dtype == ref.dtype == dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(exact), rtol=tol,
                                   atol=tol)  # fmt: skip


def test_backward_keeps_gate_and_up_only():
    g = u = jnp.ones((4, 8, 32), jnp.bfloat16)
    res = saved_residuals(lambda g, u: swiglu(g, u).astype(jnp.float32).sum(), g, u)
    assert len(res) == 2
    assert len(saved_residuals(lambda g, u: formula(g, u).astype(jnp.float32).sum(), g, u)) > 2
