"""`grouped_matmul`: megablox gmm/tgmm (interpret mode on the CPU) and, on a Hopper GPU
(marker `gpu`), jax's Mosaic GPU grouped GEMMs against ``ragged_dot``; the compile for an H200
is in tests/kernels_pallas/test_gpu_aot.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.precision.grouped_matmul import (
    grouped_matmul,
    grouped_matmul_reference,
    mosaic_gpu_unsupported,
)


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
    mega = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl="megablox", interpret=True))
    _check(mega, m, k, n, sizes, dtype)


def _check(fn, m, k, n, sizes, dtype):
    kx, kw, kd = jax.random.split(jax.random.key(m), 3)
    x = jax.random.normal(kx, (m, k)).astype(dtype)
    w = jax.random.normal(kw, (len(sizes), k, n)).astype(dtype)
    dy = jax.random.normal(kd, (m, n))
    sizes = jnp.array(sizes, jnp.int32)
    got = _value_and_grads(fn, x, w, sizes, dy)
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


def test_mosaic_gpu_names_what_it_cannot_run():
    sds = jax.ShapeDtypeStruct
    x, w = sds((64, 256), jnp.bfloat16), sds((4, 256, 384), jnp.bfloat16)
    assert mosaic_gpu_unsupported(x, w, jnp.bfloat16) is None
    assert "one dtype" in mosaic_gpu_unsupported(sds((64, 256), jnp.float32), w, jnp.float32)
    assert "result" in mosaic_gpu_unsupported(x, w, jnp.float32)
    assert "multiples" in mosaic_gpu_unsupported(x, sds((4, 256, 200), jnp.bfloat16), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples"):
        grouped_matmul(jnp.zeros((8, 64), jnp.bfloat16), jnp.zeros((2, 64, 128), jnp.bfloat16),
                       jnp.array([3, 5]), impl="mosaic_gpu")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", [[1000, 0, 3000, 96], [0, 0, 4096, 0], [517, 1483, 1, 2095]])
def test_mosaic_gpu_matches_ragged_dot_on_a_gpu(sizes):
    fn = jax.jit(lambda x, w, s: grouped_matmul(x, w, s, impl="mosaic_gpu"))
    _check(fn, 4200, 256, 384, sizes, jnp.bfloat16)
