import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops import attention, attention_reference


def _naive(q, k, v, mask):
    """Per-head loops in NumPy float64: the formula, nothing shared with the code under test."""
    b, t, h, kd = q.shape
    g = k.shape[2]
    out = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            s = q[bi, :, hi] @ k[bi, :, gi].T / np.sqrt(kd)
            s = np.where(mask[bi], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, gi]
    return out


@pytest.mark.parametrize("impl", ["reference", "xla", "auto"])
@pytest.mark.parametrize(("h", "g"), [(4, 4), (4, 2), (6, 1)])
def test_causal_gqa_matches_naive(impl, h, g):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 9, h, 8))
    k = jax.random.normal(ks[1], (2, 9, g, 8))
    v = jax.random.normal(ks[2], (2, 9, g, 8))
    mask = np.tril(np.ones((9, 9), bool))[None].repeat(2, 0)
    want = _naive(*(np.asarray(x, np.float64) for x in (q, k, v)), mask)
    np.testing.assert_allclose(attention(q, k, v, impl=impl), want, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_segments_and_positions(impl):
    ks = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(ks[0], (1, 7, 2, 4))
    k = jax.random.normal(ks[1], (1, 7, 2, 4))
    v = jax.random.normal(ks[2], (1, 7, 2, 4))
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 3]])
    mask = np.tril(np.ones((7, 7), bool)) & (np.asarray(seg)[0, :, None] == np.asarray(seg)[0])
    want = _naive(*(np.asarray(x, np.float64) for x in (q, k, v)), mask[None])
    got = attention(q, k, v, segment_ids_BT=seg, impl=impl)
    np.testing.assert_allclose(got, want, atol=1e-5)

    # A decode step: 2 queries at absolute positions 3, 4 against a 7-slot cache.
    qd = q[:, :2]
    got = attention(
        qd, k, v, q_positions_BT=jnp.array([[3, 4]]), kv_positions_BS=jnp.arange(7)[None],
        impl=impl,
    )  # fmt: skip
    m = np.arange(7)[None, :] <= np.array([3, 4])[:, None]
    want = _naive(*(np.asarray(x, np.float64) for x in (qd, k, v)), m[None])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_gradients_match_reference():
    ks = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(ks[0], (2, 11, 4, 8))
    k = jax.random.normal(ks[1], (2, 11, 2, 8))
    v = jax.random.normal(ks[2], (2, 11, 2, 8))

    def grads(impl):
        return jax.grad(lambda *a: jnp.sum(attention(*a, impl=impl) ** 2), (0, 1, 2))(q, k, v)

    for a, b in zip(grads("xla"), grads("reference")):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bad_impl():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(x, x, x, impl="flash")
    assert attention_reference(x, x, x).shape == (1, 2, 1, 4)
