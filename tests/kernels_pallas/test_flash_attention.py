"""The Triton flash-attention kernels (`kernels_pallas.flash_attention`) against
`attention_reference`: outputs and the gradients of q, k and v through `jax.vjp` with a random
cotangent, in Pallas interpret mode on the CPU; on a GPU (marker `gpu`) compiled, in bfloat16.

Cases: causal and not, packed documents (segment ids: runs, the pipeline's rows with padding,
ids that come back, where no block may be skipped) and not, GQA ratios 1 and 4, a T the
blocks do not divide, head dims that are not powers of two (zero-padded), blocks of unequal
sizes. Tolerances as the other kernels: RMS(Δ)/RMS(ref) ≤ 1e-5 in float32, ≤ 5e-3 in bfloat16.
The compile for an H200 (Triton, sm_90 shared memory) is in test_gpu_aot.py.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxllm.ops.attention import attention, attention_reference
from kernels_pallas.flash_attention import flash_attention, unsupported
from kernels_pallas.flash_attention.api import _document_bounds
from tests.helpers import assert_close

RATIO = {jnp.float32: 1e-5, jnp.bfloat16: 5e-3}


def _inputs(b, t, h, g, kd, vd, dtype, packed, seed=0):
    """packed: False, True / "runs" (documents of ~17 tokens, ids counting up), "pipeline"
    (the data pipeline's rows: ids 1, 2, ... then 0 for padding) or "returning" (ids that come
    back after another: no block may be skipped)."""
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (b, t, h, kd), dtype)
    k = jax.random.normal(ks[1], (b, t, g, kd), dtype)
    v = jax.random.normal(ks[2], (b, t, g, vd), dtype)
    do = jax.random.normal(ks[3], (b, t, h, vd), dtype)
    seg = None
    if packed:
        seg = 1 + jnp.cumsum(jax.random.uniform(ks[4], (b, t)) < 0.06, axis=1)
        if packed == "pipeline":
            seg = jnp.where(jnp.arange(t) < t - 9, seg, 0)
        elif packed == "returning":
            seg = seg % 2
    return q, k, v, do, seg


def _check(fn, q, k, v, do, seg, causal, ratio):
    def ref(q, k, v):
        return attention_reference(q, k, v, causal=causal, segment_ids_BT=seg)

    o, vjp = jax.vjp(fn, q, k, v)
    o_ref, vjp_ref = jax.vjp(ref, q, k, v)
    assert o.dtype == q.dtype
    assert_close("o", o_ref, o, ratio)
    for name, got, want in zip("qkv", vjp(do), vjp_ref(do)):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_close(f"d{name}", want, got, ratio)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("packed", [False, "runs", "pipeline", "returning"])
@pytest.mark.parametrize(("h", "g"), [(4, 4), (8, 2)])
def test_kernel_matches_reference(causal, packed, h, g):
    q, k, v, do, seg = _inputs(2, 75, h, g, 24, 40, jnp.float32, packed)

    def fn(q, k, v):
        return flash_attention(q, k, v, segment_ids=seg, causal=causal, block_q=32,
                               block_k=16, interpret=True)  # fmt: skip

    _check(fn, q, k, v, do, seg, causal, RATIO[jnp.float32])


def test_document_bounds():
    seg = jnp.array([[1, 1, 2, 2, 2, 0], [1, 1, 2, 2, 1, 1]])
    first, end = _document_bounds(seg)
    assert first.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]  # row 2: id 1 comes back
    assert end.tolist() == [[2, 2, 5, 5, 5, 6], [6] * 6]


def test_kernel_matches_reference_in_bfloat16_at_the_default_blocks():
    q, k, v, do, seg = _inputs(1, 200, 4, 2, 64, 64, jnp.bfloat16, packed=True, seed=1)

    def fn(q, k, v):
        return flash_attention(q, k, v, segment_ids=seg, interpret=True)

    _check(fn, q, k, v, do, seg, True, RATIO[jnp.bfloat16])


def test_ops_attention_by_name():
    """impl="flash" is the kernel (interpreted off CUDA); auto on the CPU stays the XLA form."""
    q, k, v, do, seg = _inputs(1, 64, 4, 2, 32, 32, jnp.bfloat16, packed=True, seed=2)

    def fn(q, k, v):
        return attention(q, k, v, segment_ids_BT=seg, impl="flash")

    _check(fn, q, k, v, do, seg, True, RATIO[jnp.bfloat16])
    with pytest.raises(ValueError, match="positions"):
        attention(q, k, v, q_positions_BT=jnp.zeros((1, 64), jnp.int32), impl="flash")


@pytest.mark.parametrize(
    ("q", "k", "v", "why"),
    [
        ((1, 8, 4, 16), (1, 4, 4, 16), (1, 4, 4, 16), "self-attention"),
        ((1, 8, 4, 16), (1, 8, 3, 16), (1, 8, 3, 16), "query heads"),
        ((1, 8, 4, 16), (1, 8, 2, 32), (1, 8, 2, 16), "head dims"),
        ((1, 8, 4, 512), (1, 8, 2, 512), (1, 8, 2, 512), "head dims"),
    ],
)
def test_unsupported_shapes_are_named(q, k, v, why):
    sds = lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    assert why in unsupported(sds(q), sds(k), sds(v))
    with pytest.raises(ValueError, match=why):
        flash_attention(*(jnp.zeros(s, jnp.bfloat16) for s in (q, k, v)))


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize(("h", "g", "kd"), [(32, 4, 64), (16, 16, 128)])
def test_compiled_kernel_on_gpu(packed, h, g, kd):
    q, k, v, do, seg = _inputs(2, 1000, h, g, kd, kd, jnp.bfloat16, packed, seed=3)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, segment_ids=seg))
    _check(fn, q, k, v, do, seg, True, RATIO[jnp.bfloat16])
