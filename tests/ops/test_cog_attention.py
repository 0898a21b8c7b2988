"""Cog attention: the shared op suite (`tests/ops/attention_op_cases.py`: the chunked online
softmax with its custom VJP against the materialised reference, outputs and gradients, ragged
key tiles, GQA without repeating kv, packed rows; the reference against a NumPy port of the
authors' `CogAttention.forward`), and what is this op's own: signed weights, decode against a
cache, rows without keys, dispatch, and memory that does not grow as T².
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ops
from jaxllm.ops.cog_attention import cog_attention_chunked as _chunked
from tests.helpers import assert_close
from tests.ops.attention_op_cases import F32_RATIO, AttentionOpCases, compare, outputs_and_grads


def numpy_cog(q, k, v, mask):
    """trestad/CogAttn `CogAttention.forward`: P = qkᵀ/√d, W = sign(P)·softmax(mask(|P|));
    mask: [B|1, T, S], True where a query sees a key."""
    h, g = q.shape[2], k.shape[2]
    k, v = np.repeat(k, h // g, axis=2), np.repeat(v, h // g, axis=2)
    p = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    a = np.where(mask[:, None], np.abs(p), -np.inf)
    e = np.exp(a - a.max(-1, keepdims=True))
    w = np.sign(p) * e / e.sum(-1, keepdims=True)
    return np.einsum("bhts,bshv->bthv", w, v)


def _op(q, k, v, *, impl, block, **kw):
    """`cog_attention` with chunks of `block` keys."""
    return ops.cog_attention(q, k, v, impl=impl, chunk=block or 128, **kw)


class TestCogAttention(AttentionOpCases):
    op = staticmethod(_op)
    formula = staticmethod(numpy_cog)
    impls = ("chunked",)
    fast_impl = "chunked"
    # Scale 2 puts many scores far from 0 on both signs, so the sign pattern matters.
    qk_scale = 2.0
    # (B, T, H, G, K, V, chunk, causal, packed): 37 keys in chunks of 5 (a ragged last tile),
    # of 16 (not causal) and of 64 (one tile, S < chunk); 4 query heads on 1 kv head and 6 on
    # 3, kv never repeated; packed rows in chunks of 4.
    cases = (
        (2, 37, 4, 2, 8, 6, 5, True, False),
        (2, 37, 4, 2, 8, 6, 16, False, False),
        (2, 37, 4, 2, 8, 6, 64, True, False),
        (2, 19, 4, 1, 8, 6, 8, True, False),
        (2, 19, 6, 3, 8, 6, 8, True, False),
        (2, 23, 4, 2, 8, 6, 4, True, True),
    )


def qkv(t=37, s=None, h=4, g=2, kd=8, vd=6, seed=0):
    return TestCogAttention().inputs(2, t, h, g, kd, vd, S=s, seed=seed)[:3]


def test_weights_are_signed_and_sum_to_one_in_absolute_value():
    q, k, _ = qkv(t=9)
    # With V = identity over keys, the output row is the weight row itself.
    eye = jnp.broadcast_to(jnp.eye(9)[None, :, None, :], (2, 9, 2, 9))
    w = jax.jit(ops.cog_attention_reference)(q, k, eye)
    assert float(jnp.min(w)) < 0
    np.testing.assert_allclose(jnp.sum(jnp.abs(w), -1), 1.0, rtol=1e-6)
    assert float(jnp.max(jnp.abs(jnp.triu(jnp.moveaxis(w, 2, 1), 1)))) == 0.0


def check_chunked(q, k, v, chunk, qpos, kpos):
    """Chunked against reference with query / key positions: the output, and the gradients
    of q, k, v under a random cotangent. Returns the chunked (output, (dq, dk, dv))."""
    do = jax.random.normal(jax.random.key(9), (*q.shape[:3], v.shape[3]))
    run = functools.partial(outputs_and_grads, q, k, v, do, None, qpos, kpos, op=_op)
    got = run(impl="chunked", block=chunk)
    compare(run(impl="reference"), got, "chunked ")
    return got


def test_chunked_decode_against_a_cache():
    # 3 queries at positions 10..12 over a 20-slot buffer (slots > 12 not written yet).
    q, k, v = qkv(t=3, s=20)
    check_chunked(q, k, v, 7, jnp.arange(10, 13)[None], jnp.arange(20)[None])
    # One token, per-row positions.
    q, k, v = qkv(t=1, s=20)
    check_chunked(q, k, v, 6, jnp.array([[3], [17]]), jnp.arange(20)[None])


def test_chunked_rows_without_keys_are_zero_with_zero_gradients():
    # Queries at positions 0..3 over keys at 2..9: rows 0 and 1 see no key.
    q, k, v = qkv(t=4, s=8)
    out, (dq, _, _) = check_chunked(q, k, v, 3, jnp.arange(4)[None], jnp.arange(2, 10)[None])
    assert float(jnp.max(jnp.abs(out[:, :2]))) == 0.0
    assert float(jnp.min(jnp.max(jnp.abs(out[:, 2:]), axis=-1))) > 0.0
    assert float(jnp.max(jnp.abs(dq[:, :2]))) == 0.0


def test_dispatch_and_bad_impl():
    cog_attention = jax.jit(ops.cog_attention, static_argnames=("impl", "chunk"))
    q, k, v = qkv(t=40)
    ref = cog_attention(q, k, v, impl="reference")
    assert_close("auto", ref, cog_attention(q, k, v, impl="auto", chunk=16), F32_RATIO)
    assert_close("chunked", ref, cog_attention(q, k, v, impl="chunked"), F32_RATIO)
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
