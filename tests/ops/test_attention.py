"""Softmax attention: the shared op suite (`tests/ops/attention_op_cases.py`: the XLA form,
`auto` and the blocked form against the reference, the reference against a NumPy formula), and
what is this op's own: decode positions, the splash kernel in interpret mode, the splash and
cuDNN support checks, and argument checks.
"""

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
from tests.ops.attention_op_cases import BF16_RATIO, F32_RATIO, AttentionOpCases, packed_ids

# RMS(Δ)/RMS(ref): the suite's policy (`tests/ops/attention_op_cases.py`)
RATIO = {jnp.float32: F32_RATIO, jnp.bfloat16: BF16_RATIO}


def _naive(q, k, v, mask):
    """Per-head loops in NumPy float64: the formula, nothing shared with the code under test."""
    b, t, h, kd = q.shape
    g = k.shape[2]
    mask = np.broadcast_to(mask, (b, t, k.shape[1]))
    out = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            s = q[bi, :, hi] @ k[bi, :, gi].T / np.sqrt(kd)
            s = np.where(mask[bi], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, gi]
    return out


def _op(q, k, v, *, impl, block, causal, segment_ids_BT, **kw):
    """`attention`, or impl="blocked": `attention_blocked` with `block` query rows a step."""
    if impl == "blocked":
        return attention_blocked(q, k, v, block=block, causal=causal, scale=None,
                                 segment_ids_BT=segment_ids_BT)  # fmt: skip
    return attention(q, k, v, impl=impl, causal=causal, segment_ids_BT=segment_ids_BT, **kw)


class TestAttention(AttentionOpCases):
    """The shared suite (`tests/ops/attention_op_cases.py`): the XLA form, `auto` (the XLA form
    on the CPU) and the blocked GPU fallback for packed rows against the reference."""

    op = staticmethod(_op)
    formula = staticmethod(_naive)
    impls = ("xla", "auto", "blocked")
    fast_impl = "xla"
    # (B, T, H, G, K, V, block, causal, packed): MHA not causal, MQA, GQA with packed rows
    # (row 0's first document one token); the blocked form in 3 steps of 8 query rows.
    cases = (
        (1, 9, 4, 4, 8, 8, None, False, False),
        (2, 9, 6, 1, 8, 8, None, True, False),
        (2, 11, 4, 2, 8, 8, None, True, True),
        (2, 24, 4, 2, 8, 8, 8, True, False),
        (2, 24, 4, 2, 8, 8, 8, True, True),
    )

    @classmethod
    def runs(cls, impl, case):
        """blocked: T a multiple of the block; auto (the XLA form on the CPU): the cases of
        T < 24 (MQA, packed GQA), as it is traced the same there."""
        t, block = case[1], case[6]
        if impl == "blocked":
            return block is not None and t % block == 0 and t > block
        return impl != "auto" or t < 24


@pytest.mark.parametrize("impl", ["reference", "xla", "auto"])
def test_decode_positions_match_naive(impl):
    """2 queries at absolute positions 3, 4 against a 7-slot cache."""
    q, k, v, _ = TestAttention().inputs(1, 2, 2, 2, 4, 4, S=7, seed=1)
    got = attention(
        q, k, v, q_positions_BT=jnp.array([[3, 4]]), kv_positions_BS=jnp.arange(7)[None],
        impl=impl,
    )  # fmt: skip
    m = np.arange(7)[None, :] <= np.array([3, 4])[:, None]
    want = _naive(*(np.asarray(x, np.float64) for x in (q, k, v)), m[None])
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_blocked_form_with_positions_matches_reference(packed):
    """A prefill of 13 queries at positions 5..17 against a 24-slot cache (the decoder's
    call), 8 query rows a step: T is padded to 16 and the padding cut off; outputs and the
    q/k/v gradients (all-gather sequence parallelism differentiates this call)."""
    q, k, v, _ = TestAttention().inputs(2, 13, 4, 2, 8, 8, S=24, seed=4)
    kw = dict(q_positions_BT=(5 + jnp.arange(13))[None], kv_positions_BS=jnp.arange(24)[None])
    if packed:
        # row 1's queries at positions < 9 see no key of theirs: zero rows
        kv_seg = jnp.where(jnp.arange(24) < 9, 1, 2)[None].repeat(2, 0)
        kw |= dict(segment_ids_BT=jnp.array([[1], [2]]).repeat(13, 1), kv_segment_ids_BS=kv_seg)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

    blocked = lambda q, k, v: attention_blocked(
        q, k, v, block=8, causal=True, scale=None,
        **{"segment_ids_BT": None, **kw},
    )  # fmt: skip
    ref = lambda q, k, v: attention_reference(q, k, v, **kw)
    assert_close("o", ref(q, k, v), blocked(q, k, v), F32_RATIO)
    for name, a, w in zip("qkv", jax.grad(loss(blocked), (0, 1, 2))(q, k, v),
                          jax.grad(loss(ref), (0, 1, 2))(q, k, v)):  # fmt: skip
        assert_close(f"d{name}", w, a, F32_RATIO)


def test_long_prefill_holds_no_full_score_matrix():
    """`auto` with positions and more than BLOCK queries (a long prompt against the cache)
    takes the blocked form on every platform: the CPU program holds [B, H, 512, S] scores,
    never [B, H, T, S]."""
    t, s = 600, 1024
    q = jax.ShapeDtypeStruct((1, t, 2, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, s, 1, 8), jnp.float32)
    fn = lambda q, k, v: attention(q, k, v, q_positions_BT=jnp.arange(t)[None],
                                   kv_positions_BS=jnp.arange(s)[None])  # fmt: skip
    text = jax.jit(fn).lower(q, kv, kv).as_text()
    assert f"x{t}x{s}x" not in text and f"x512x{s}x" in text


def test_query_block():
    """The blocked form's rows per step (its values: the suite's `blocked` impl)."""
    assert (query_block(2048, 2048), query_block(384, 384), query_block(128, 128)) == (
        512,
        128,
        None,
    )
    assert query_block(100, 100) is None and query_block(1, 512) is None


def _packed(b, t, h, g, kd, seed=2, dtype=jnp.float32):
    """Random q [B, T, H, K], k, v [B, T, G, K] and segment ids [B, T] of 3 documents whose
    boundaries differ per row (the first row's first document has one token)."""
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, t, h, kd), dtype)
    k = jax.random.normal(ks[1], (b, t, g, kd), dtype)
    v = jax.random.normal(ks[2], (b, t, g, kd), dtype)
    return q, k, v, packed_ids(b, t)


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
    one 128-token block, head dim 80 (Hunyuan-Large's: run zero-padded to 128). Forward only
    here (interpret mode is slow on the CPU); the gradients and larger shapes are the `slow`
    variants below."""
    _splash_matches_reference(1, 128, 2, 1, 80, causal=True, packed=True, dtype=jnp.float32,
                              grads=False)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("t", "h", "g", "kd", "causal", "packed", "dtype"),
    [
        (128, 2, 1, 64, True, True, jnp.float32),
        (128, 2, 1, 80, True, True, jnp.float32),  # padded head dim: gradients sliced back
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
        "dtypes": (_sds(256, 4, 128, jnp.float16), {}),
    }
    for reason, (args, kw) in cases.items():
        assert reason in attention_splash.unsupported(*args, **{**none, **kw}), reason
    # head dims off the 64 grid are padded, not refused
    for kd in (32, 80, 200):
        assert attention_splash.unsupported(*_sds(256, 4, kd), **none) is None
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
        attention(x, x, x, impl="flash2")
    assert attention_reference(x, x, x).shape == (1, 2, 1, 4)
