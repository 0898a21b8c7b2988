import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxllm.ops import attention, attention_reference, attention_splash
from jaxllm.ops.attention import (
    CUDNN_MAX_Q_ELEMENTS,
    _cudnn_on_host,
    attention_blocked,
    cudnn_unsupported,
    query_block,
)
from tests.helpers import assert_close

# RMS(Δ)/RMS(ref), as tests/ops/test_lightning_attention.py
RATIO = {jnp.float32: 1e-5, jnp.bfloat16: 5e-3}


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


@pytest.mark.parametrize("impl", ["reference", "xla", "auto"])
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


def _packed(b, t, h, g, kd, seed=2, dtype=jnp.float32):
    """Random q [B, T, H, K], k, v [B, T, G, K] and segment ids [B, T] of 3 documents whose
    boundaries differ per row (the first row's first document has one token)."""
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, kd), dtype)
    k = jax.random.normal(ks[1], (b, t, g, kd), dtype)
    v = jax.random.normal(ks[2], (b, t, g, kd), dtype)
    cuts = np.stack([np.array([1, t // 2]), np.array([t // 3, t - 5])][:b])
    seg = jnp.asarray((np.arange(t)[None, None] >= cuts[:, :, None]).sum(1), jnp.int32)
    return q, k, v, seg


def _grads(impl, q, k, v, **kw):
    # sin: a cotangent that differs per element, so a transposed or shifted gradient shows
    loss = lambda *a: jnp.sum(jnp.sin(attention(*a, impl=impl, **kw).astype(jnp.float32)))
    return jax.grad(loss, (0, 1, 2))(q, k, v)


@pytest.mark.parametrize("impl", ["xla", "auto"])
@pytest.mark.parametrize("packed", [False, True])
def test_gradients_match_reference(impl, packed):
    q, k, v, seg = _packed(2, 11, 4, 2, 8)
    kw = {"segment_ids_BT": seg} if packed else {}
    for a, b in zip(_grads(impl, q, k, v, **kw), _grads("reference", q, k, v, **kw)):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_blocked_matches_reference(packed):
    """The GPU fallback for packed rows: 3 steps of 128 query rows, GQA, outputs and grads."""
    q, k, v, seg = _packed(2, 384, 4, 2, 8)
    seg = seg if packed else None
    kw = {"segment_ids_BT": seg}
    blocked = lambda q, k, v: attention_blocked(q, k, v, block=128, causal=True, scale=None, **kw)
    assert_close("o", attention_reference(q, k, v, **kw), blocked(q, k, v), RATIO[jnp.float32])
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    got = jax.grad(loss(blocked), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: attention_reference(q, k, v, **kw)), (0, 1, 2))(q, k, v)
    for name, a, w in zip("qkv", got, want):
        assert_close(f"d{name}", w, a, RATIO[jnp.float32])
    assert (query_block(2048, 2048), query_block(384, 384), query_block(128, 128)) == (
        512,
        128,
        None,
    )
    assert query_block(100, 100) is None and query_block(1, 512) is None


def _splash_matches_reference(b, t, h, g, kd, *, causal, packed, dtype, grads=True):
    q, k, v, seg = _packed(b, t, h, g, kd, seed=3, dtype=dtype)
    seg = seg if packed else None
    got = attention_splash.splash_attention(
        q, k, v, segment_ids_BT=seg, causal=causal, interpret=True
    )
    want = attention_reference(q, k, v, segment_ids_BT=seg, causal=causal)
    assert_close("o", want, got, RATIO[dtype])
    if not grads:
        return

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, seg).astype(jnp.float32)))

    splash = lambda q, k, v, s: attention_splash.splash_attention(
        q, k, v, segment_ids_BT=s, causal=causal, interpret=True
    )
    ref = lambda q, k, v, s: attention_reference(q, k, v, segment_ids_BT=s, causal=causal)
    got = jax.grad(loss(splash), (0, 1, 2))(q, k, v)
    want = jax.grad(loss(ref), (0, 1, 2))(q, k, v)
    for name, a, w in zip("qkv", got, want):
        assert_close(f"d{name}", w, a, RATIO[dtype])


def test_splash_interpret_packed_causal_gqa_forward():
    """The TPU kernel in Pallas interpret mode: 3 documents a row, 2 query heads per kv head,
    one 128-token block. Forward only here (interpret mode is slow on the CPU); the gradients
    and larger shapes are the `slow` variants below."""
    _splash_matches_reference(1, 128, 2, 1, 64, causal=True, packed=True, dtype=jnp.float32,
                              grads=False)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("t", "h", "g", "kd", "causal", "packed", "dtype"),
    [
        (128, 2, 1, 64, True, True, jnp.float32),
        (256, 4, 2, 128, True, True, jnp.float32),  # one 256-token block
        (384, 4, 1, 64, True, True, jnp.float32),  # 3×3 128-blocks, 3 fully masked
        (256, 2, 2, 128, False, False, jnp.float32),
        (256, 4, 2, 128, True, True, jnp.bfloat16),
    ],
)
def test_splash_interpret_variants(t, h, g, kd, causal, packed, dtype):
    _splash_matches_reference(2, t, h, g, kd, causal=causal, packed=packed, dtype=dtype)


def _sds(t, h, kd, dtype=jnp.bfloat16, g=None):
    """Abstract q [2, T, H, K] and k = v [2, T, G, K] (G = H/2 unless given)."""
    q = jax.ShapeDtypeStruct((2, t, h, kd), dtype)
    kv = jax.ShapeDtypeStruct((2, t, g or h // 2, kd), dtype)
    return q, kv, kv


def test_splash_support_check():
    pos = jax.ShapeDtypeStruct((1, 256), jnp.int32)
    none = dict(segment_ids_BT=jax.ShapeDtypeStruct((2, 256), jnp.int32),
                kv_segment_ids_BS=None, q_positions_BT=None, kv_positions_BS=None)  # fmt: skip
    assert attention_splash.unsupported(*_sds(256, 4, 128), **none) is None
    q, kv, _ = _sds(256, 4, 128)
    long_kv = jax.ShapeDtypeStruct((2, 512, 2, 128), jnp.bfloat16)
    cases = {
        "positions": ((q, kv, kv), {"q_positions_BT": pos, "kv_positions_BS": pos}),
        "separate kv": ((q, kv, kv), {"kv_segment_ids_BS": pos}),
        "S=512 != T=256": ((q, long_kv, long_kv), {}),
        "not a multiple of 128": (_sds(200, 4, 128), {"segment_ids_BT": None}),
        "head dims": (_sds(256, 4, 32), {}),
        "dtypes": (_sds(256, 4, 128, jnp.float16), {}),
    }
    for reason, (args, kw) in cases.items():
        assert reason in attention_splash.unsupported(*args, **{**none, **kw}), reason
    assert attention_splash.block_size(1536) == 512 and attention_splash.block_size(384) == 128


def test_splash_fails_closed_inside_check_vma_shard_map():
    """jax's splash `pallas_call`s carry no manual-axis types, which `check_vma=True` needs."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("s",))
    seen = []

    def local(q, k, v):
        seen.append(attention_splash.unsupported(q, k, v, segment_ids_BT=None,
                    kv_segment_ids_BS=None, q_positions_BT=None, kv_positions_BS=None))  # fmt: skip
        return attention(q, k, v)

    q, kv, _ = _sds(128, 2, 64, jnp.float32, g=1)
    q, kv = (jax.ShapeDtypeStruct((4, *x.shape[1:]), x.dtype) for x in (q, kv))
    for check in (True, False):
        mapped = jax.shard_map(local, mesh=mesh, in_specs=P("s"), out_specs=P("s"),
                               check_vma=check)  # fmt: skip
        jax.jit(mapped).trace(q, kv, kv)
    assert "check_vma" in seen[0] and seen[1] is None


def test_impl_splash_fails_closed_by_name():
    x = jnp.zeros((1, 2, 1, 64))
    with pytest.raises(ValueError, match="cannot run these inputs: T=2 is not a multiple"):
        attention(x, x, x, impl="splash")


def test_cudnn_support_check():
    sds = jax.ShapeDtypeStruct
    q, kv, _ = _sds(256, 4, 128)
    none = dict(causal=True, segment_ids_BT=None, kv_segment_ids_BS=None, q_positions_BT=None,
                kv_positions_BS=None)  # fmt: skip
    why = cudnn_unsupported(q, kv, kv, **none)
    assert why is None if _cudnn_on_host() else "not found" in why
    seg = {**none, "segment_ids_BT": sds((2, 256), jnp.int32)}
    assert "packed" in cudnn_unsupported(q, kv, kv, **seg)
    assert "bfloat16" in cudnn_unsupported(*_sds(256, 4, 128, jnp.float32), **none)
    big = sds((CUDNN_MAX_Q_ELEMENTS // (2048 * 32 * 128), 2048, 32, 128), jnp.bfloat16)
    big_kv = sds((big.shape[0], 2048, 8, 128), jnp.bfloat16)
    assert "2^31" in cudnn_unsupported(big, big_kv, big_kv, **none)
    assert "head dim" in cudnn_unsupported(*_sds(256, 4, 100), **none)


def test_bad_impl():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="impl must be one of"):
        attention(x, x, x, impl="flash")
    assert attention_reference(x, x, x).shape == (1, 2, 1, 4)
