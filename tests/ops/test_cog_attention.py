"""Cog attention: the materialised reference against a NumPy port of the authors'
`CogAttention.forward`, and the chunked online-softmax path (custom VJP) against the reference,
outputs and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ops
from jaxllm.ops.cog_attention import cog_attention_chunked as _chunked

# Jitted once per shape: the eager op-by-op dispatch dominates otherwise.
cog_attention = jax.jit(ops.cog_attention, static_argnames=("causal", "impl", "chunk"))
cog_attention_reference = jax.jit(ops.cog_attention_reference, static_argnames=("causal",))
cog_attention_chunked = jax.jit(_chunked, static_argnames=("causal", "chunk"))

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


def check_chunked(q, k, v, chunk, fwd=FWD, grad=GRAD, **kw):
    """Chunked against reference: the output, and the gradients of q, k, v under a random
    cotangent. Returns the chunked (output, (dq, dk, dv))."""
    ct = jax.random.normal(jax.random.key(9), (*q.shape[:3], v.shape[3])).astype(q.dtype)

    def run(f):  # one compile per path: output and gradients together
        out, vjp = jax.vjp(lambda q, k, v: f(q, k, v, **kw), q, k, v)
        return out, vjp(ct)

    out, g_chk = jax.jit(lambda: run(functools.partial(_chunked, chunk=chunk)))()
    ref, g_ref = jax.jit(lambda: run(ops.cog_attention_reference))()
    assert out.dtype == q.dtype
    np.testing.assert_allclose(out.astype(jnp.float32), ref.astype(jnp.float32), **fwd)
    for name, a, b in zip("qkv", g_chk, g_ref):
        assert a.dtype == b.dtype, name
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), **grad,
                                   err_msg=f"d{name}")  # fmt: skip
    return out, g_chk


# 37 keys in chunks of 5 (a ragged last tile), of 16, and of 64 (one tile, S < chunk).
@pytest.mark.parametrize("chunk,causal", [(5, True), (16, False), (64, True)])
def test_chunked_matches_reference(chunk, causal):
    check_chunked(*qkv(), chunk, causal=causal)


@pytest.mark.parametrize("h,g", [(4, 1), (6, 3)])
def test_chunked_gqa_without_repeating_kv(h, g):
    check_chunked(*qkv(t=19, h=h, g=g), 8)


def test_chunked_packed_rows():
    q, k, v = qkv(t=23)
    seg = jnp.array([[1] * 10 + [2] * 13, [1] * 4 + [2] * 7 + [3] * 12])
    check_chunked(q, k, v, 4, segment_ids_BT=seg)
    # The second document of row 0 is the same as that document on its own.
    alone = cog_attention_reference(q[:1, 10:], k[:1, 10:], v[:1, 10:])
    np.testing.assert_allclose(
        cog_attention(q, k, v, segment_ids_BT=seg, impl="chunked", chunk=4)[:1, 10:], alone, **FWD
    )


def test_chunked_decode_against_a_cache():
    # 3 queries at positions 10..12 over a 20-slot buffer (slots > 12 not written yet).
    q, k, v = qkv(t=3, s=20)
    kw = dict(q_positions_BT=jnp.arange(10, 13)[None], kv_positions_BS=jnp.arange(20)[None])
    check_chunked(q, k, v, 7, **kw)
    # One token, per-row positions.
    q, k, v = qkv(t=1, s=20)
    check_chunked(q, k, v, 6, q_positions_BT=jnp.array([[3], [17]]),
                  kv_positions_BS=jnp.arange(20)[None])  # fmt: skip


def test_chunked_rows_without_keys_are_zero_with_zero_gradients():
    # Queries at positions 0..3 over keys at 2..9: rows 0 and 1 see no key.
    q, k, v = qkv(t=4, s=8)
    kw = dict(q_positions_BT=jnp.arange(4)[None], kv_positions_BS=jnp.arange(2, 10)[None])
    out, (dq, _, _) = check_chunked(q, k, v, 3, **kw)
    assert float(jnp.max(jnp.abs(out[:, :2]))) == 0.0
    assert float(jnp.min(jnp.max(jnp.abs(out[:, 2:]), axis=-1))) > 0.0
    assert float(jnp.max(jnp.abs(dq[:, :2]))) == 0.0


def test_chunked_bf16():
    # bf16 inputs and outputs, float32 statistics inside both paths: the two differ by the
    # bf16 rounding of the output and of the gradients (8 bits of mantissa).
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv())
    tol = dict(rtol=2e-2, atol=2e-2)
    check_chunked(q, k, v, 8, fwd=tol, grad=dict(rtol=5e-2, atol=5e-2))
    ref = numpy_cog(*(x.astype(jnp.float32) for x in (q, k, v)))
    out = cog_attention_chunked(q, k, v, chunk=8)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, **tol)


def test_dispatch_and_bad_impl():
    q, k, v = qkv(t=40)
    ref = cog_attention_reference(q, k, v)
    np.testing.assert_allclose(cog_attention(q, k, v, impl="auto", chunk=16), ref, **FWD)
    np.testing.assert_allclose(cog_attention(q, k, v, impl="chunked"), ref, **FWD)
    with pytest.raises(ValueError, match="impl"):
        cog_attention(q, k, v, impl="pallas")


def test_chunked_memory_does_not_grow_as_t_squared():
    """The chunked gradient's temporaries grow ~linearly in T; the reference's as T²."""

    def temp_bytes(f, t):
        q, k, v = (jax.ShapeDtypeStruct((1, t, h, 16), jnp.float32) for h in (2, 1, 1))
        grad = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    chunked = lambda q, k, v: _chunked(q, k, v, chunk=64)
    ref = ops.cog_attention_reference
    small, large = temp_bytes(chunked, 256), temp_bytes(chunked, 1024)
    # 4× the tokens: at most ~4× the memory (T²-growth would give 16×).
    assert large < 6 * small, (small, large)
    assert large * 8 < temp_bytes(ref, 1024)
