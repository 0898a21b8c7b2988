"""`grouped_matmul`: megablox gmm/tgmm (interpret mode on the CPU) against ``ragged_dot``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.precision.grouped_matmul import grouped_matmul, grouped_matmul_reference


def _value_and_grads(fn, x, w, sizes, dy):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, sizes), x, w)
    return (y, *vjp(dy.astype(y.dtype)))


@pytest.mark.parametrize(
    "m, k, n, sizes, dtype",
    [
        # empty groups first, inside and last; rows past the groups; m pads to the tile
        (100, 48, 40, [0, 30, 0, 45, 9, 0], jnp.float32),
        # two m tiles with a group across their boundary; k past its 512 tile (masked rest)
        (600, 520, 136, [250, 300, 50], jnp.float32),
        (96, 64, 128, [17, 0, 60, 11], jnp.bfloat16),
    ],
)
def test_megablox_matches_ragged_dot(m, k, n, sizes, dtype):
    kx, kw, kd = jax.random.split(jax.random.key(m), 3)
    x = jax.random.normal(kx, (m, k)).astype(dtype)
    w = jax.random.normal(kw, (len(sizes), k, n)).astype(dtype)
    dy = jax.random.normal(kd, (m, n))
    sizes = jnp.array(sizes, jnp.int32)
    mega = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl="megablox", interpret=True))
    got = _value_and_grads(mega, x, w, sizes, dy)
    want = _value_and_grads(grouped_matmul_reference, x, w, sizes, dy)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    for name, g, r in zip(("y", "dx", "dw"), got, want, strict=True):
        assert g.dtype == r.dtype == dtype, name
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        scale = np.abs(r).max()
        np.testing.assert_allclose(g / scale, r / scale, atol=tol, err_msg=name)
    # rows past the groups are zero in y and dx, as ragged_dot gives
    end = int(sizes.sum())
    assert not np.asarray(got[0][end:]).any() and not np.asarray(got[1][end:]).any()


def test_auto_is_ragged_dot_off_tpu():
    x = jax.random.normal(jax.random.key(0), (40, 16))
    w = jax.random.normal(jax.random.key(1), (3, 16, 8))
    sizes = jnp.array([10, 0, 25], jnp.int32)
    np.testing.assert_array_equal(
        jax.jit(grouped_matmul)(x, w, sizes), grouped_matmul_reference(x, w, sizes)
    )
