"""Cog attention: the materialised reference against a NumPy port of the authors'
`CogAttention.forward`, and the blocked online-softmax path against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ops
from jaxllm.ops.cog_attention import cog_attention_blocked as _blocked

# Jitted once per shape: the eager op-by-op dispatch dominates otherwise.
cog_attention = jax.jit(ops.cog_attention, static_argnames=("causal", "impl", "block"))
cog_attention_reference = jax.jit(ops.cog_attention_reference, static_argnames=("causal",))
cog_attention_blocked = jax.jit(_blocked, static_argnames=("causal", "block"))

FWD = dict(rtol=1e-5, atol=1e-5)  # float32, different summation order
GRAD = dict(rtol=1e-4, atol=1e-5)


def numpy_cog(q, k, v, causal=True):
    """trestad/CogAttn `CogAttention.forward`: P = qkᵀ/√d, W = sign(P)·softmax(mask(|P|))."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    h, g = q.shape[2], k.shape[2]
    k, v = np.repeat(k, h // g, axis=2), np.repeat(v, h // g, axis=2)
    p = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    a = np.abs(p)
    if causal:
        t, s = p.shape[-2:]
        a = np.where(np.tril(np.ones((t, s), bool), s - t), a, -np.inf)
    e = np.exp(a - a.max(-1, keepdims=True))
    w = np.sign(p) * e / e.sum(-1, keepdims=True)
    return np.einsum("bhts,bshv->bthv", w, v)


def qkv(t=37, s=None, h=4, g=2, kd=8, vd=6, seed=0):
    s = s or t
    ks = jax.random.split(jax.random.key(seed), 3)
    # Scale 2 puts many scores far from 0 on both signs, so the sign pattern matters.
    return (
        2 * jax.random.normal(ks[0], (2, t, h, kd)),
        2 * jax.random.normal(ks[1], (2, s, g, kd)),
        jax.random.normal(ks[2], (2, s, g, vd)),
    )


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_authors_formula(causal):
    q, k, v = qkv()
    out = cog_attention_reference(q, k, v, causal=causal)
    np.testing.assert_allclose(out, numpy_cog(q, k, v, causal), **FWD)


def test_weights_are_signed_and_sum_to_one_in_absolute_value():
    q, k, _ = qkv(t=9)
    # With V = identity over keys, the output row is the weight row itself.
    eye = jnp.broadcast_to(jnp.eye(9)[None, :, None, :], (2, 9, 2, 9))
    w = cog_attention_reference(q, k, eye)
    assert float(jnp.min(w)) < 0
    np.testing.assert_allclose(jnp.sum(jnp.abs(w), -1), 1.0, rtol=1e-6)
    assert float(jnp.max(jnp.abs(jnp.triu(jnp.moveaxis(w, 2, 1), 1)))) == 0.0


@pytest.mark.parametrize("block", [5, 64])
def test_blocked_matches_reference_forward_and_gradients(block):
    q, k, v = qkv()
    f_ref = lambda *a: cog_attention_reference(*a)
    f_blk = lambda *a: cog_attention_blocked(*a, block=block)
    np.testing.assert_allclose(f_blk(q, k, v), f_ref(q, k, v), **FWD)
    ct = jax.random.normal(jax.random.key(9), (2, 37, 4, 6))
    loss = lambda f: lambda *a: jnp.sum(f(*a) * ct)
    g_ref = jax.jit(jax.grad(loss(f_ref), argnums=(0, 1, 2)))(q, k, v)
    g_blk = jax.jit(jax.grad(loss(f_blk), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_blk, g_ref):
        np.testing.assert_allclose(a, b, **GRAD)


def test_blocked_with_cache_positions_and_segments():
    # A decode-like call: 3 queries at positions 10..12 over a 20-slot buffer (slots > 12 empty).
    q, k, v = qkv(t=3, s=20)
    kw = dict(q_positions_BT=jnp.arange(10, 13)[None], kv_positions_BS=jnp.arange(20)[None])
    np.testing.assert_allclose(
        cog_attention_blocked(q, k, v, block=7, **kw), cog_attention_reference(q, k, v, **kw), **FWD
    )
    q, k, v = qkv(t=23)
    seg = jnp.array([[1] * 10 + [2] * 13, [1] * 23])
    np.testing.assert_allclose(
        cog_attention_blocked(q, k, v, block=4, segment_ids_BT=seg),
        cog_attention_reference(q, k, v, segment_ids_BT=seg),
        **FWD,
    )
    # The second document of row 0 is the same as that document on its own.
    alone = cog_attention_reference(q[:1, 10:], k[:1, 10:], v[:1, 10:])
    np.testing.assert_allclose(
        cog_attention(q, k, v, segment_ids_BT=seg, impl="xla", block=4)[:1, 10:], alone, **FWD
    )


def test_dispatch_and_bad_impl():
    q, k, v = qkv(t=40)
    ref = cog_attention_reference(q, k, v)
    np.testing.assert_allclose(cog_attention(q, k, v, impl="auto", block=16), ref, **FWD)
    np.testing.assert_allclose(cog_attention(q, k, v, impl="xla"), ref, **FWD)
    with pytest.raises(ValueError, match="impl"):
        cog_attention(q, k, v, impl="pallas")


def test_bf16_inputs():
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv())
    out = cog_attention_blocked(q, k, v, block=8)
    assert out.dtype == jnp.bfloat16
    ref = numpy_cog(*(x.astype(jnp.float32) for x in (q, k, v)))
    # bf16 output rounding: 8 bits of mantissa.
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=2e-2, atol=2e-2)
