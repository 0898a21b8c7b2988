"""`rms_norm`'s custom backward against autodiff of its formula: the same outputs (bit for bit)
and gradients of x and the scale, for per-channel and per-head scales, a broadcast scale, no
scale, float32 and bfloat16 inputs; and what the backward keeps: x in its own dtype and one
float32 value per row, no float32 copy of x."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from jaxllm.layers.norms import rms_norm

EPS = 1e-6


def formula(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


@pytest.mark.parametrize(
    ("x_shape", "scale_shape", "dtype"),
    [
        ((2, 5, 8), (8,), jnp.float32),
        ((2, 5, 8), (8,), jnp.bfloat16),
        ((2, 3, 4, 8), (4, 8), jnp.float32),  # per-head scale [H, K]
        ((2, 3, 4, 8), (1, 8), jnp.float32),  # broadcast over heads
        ((2, 5, 8), None, jnp.bfloat16),
    ],
)
def test_matches_autodiff_of_the_formula(x_shape, scale_shape, dtype):
    kx, ks, kd = jax.random.split(jax.random.key(0), 3)
    x = (3 * jax.random.normal(kx, x_shape)).astype(dtype)
    scale = None if scale_shape is None else 1 + jax.random.normal(ks, scale_shape)
    dy = jax.random.normal(kd, x_shape).astype(dtype)
    y, vjp = jax.vjp(lambda x, s: rms_norm(x, s, EPS), x, scale)
    y_ref, vjp_ref = jax.vjp(lambda x, s: formula(x, s, EPS), x, scale)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
    for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=tol, atol=tol)  # fmt: skip


def test_backward_keeps_x_in_its_dtype():
    x = jnp.ones((4, 16, 32), jnp.bfloat16)
    scale = jnp.ones((32,), jnp.float32)

    def saved(fn):
        res = saved_residuals(lambda x: fn(x, scale, EPS).astype(jnp.float32).sum(), x)
        return [(a.shape, a.dtype) for a, _ in res]

    assert (x.shape, jnp.dtype(jnp.float32)) in saved(formula)  # autodiff keeps an f32 copy
    kept = saved(rms_norm)
    assert all(dt != jnp.float32 or shape[-1] == 1 for shape, dt in kept if len(shape) == 3)
