"""LLaMA-MoE v2 from a dense model: with all experts active and unit combine weights the
MLP-MoE and the attention-MoE equal the dense layers they were cut from; the attention-MoE's
decode path equals its parallel pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.layers.attention import Attention, AttentionConfig
from jaxllm.layers.attention_moe import AttnMoEConfig
from jaxllm.layers.mlp import SwiGLU, SwiGLUConfig
from jaxllm.layers.moe import MoEConfig
from jaxllm.models.from_dense import attention_moe_from_dense, moe_from_dense, neuron_order
from jaxllm.ops.moe import experts_dropless
from jaxllm.ops.moe_routing import Routing

# float32; the split only regroups the sum over neurons / heads
REL = 2e-5


def _close(a, b, rel=REL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= rel * max(np.max(np.abs(b)), 1e-30)


_FWD = nnx.jit(lambda m, *a: m.forward(*a))

DIMS = dict(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, dtype="float32")


@pytest.mark.parametrize("method", ["sequential", "random", "clustered"])
@pytest.mark.parametrize("residual", [0, 8])
def test_mlp_moe_with_all_experts_equals_dense(method, residual):
    dense = SwiGLU(SwiGLUConfig(d_ff=40, **DIMS), rngs=nnx.Rngs(0))
    shared = {"n_shared": 1, "shared_d_ff": residual} if residual else {}
    cfg = MoEConfig(n_experts=4, top_k=1, expert_d_ff=(40 - residual) // 4, **shared, **DIMS)
    moe = moe_from_dense(dense, cfg, method=method, seed=1)
    x = jax.random.normal(jax.random.key(1), (24, 16))
    every = Routing(jnp.tile(jnp.arange(4), (24, 1)), jnp.ones((24, 4)), jnp.ones((24, 4), bool))
    y = jax.jit(experts_dropless)(x, every, [g.weights() for g in moe.groups])
    if residual:
        y = y + nnx.jit(lambda m, x: m(x))(moe.shared, x[None])[0]
    _close(y, nnx.jit(lambda m, x: m(x))(dense, x[None])[0])


def test_clustered_split_is_balanced_and_groups_similar_neurons():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16))
    w = np.concatenate([centres[i] + 0.05 * rng.normal(size=(10, 16)) for i in range(4)]).T
    order = neuron_order(w[:, rng.permutation(40)], 4, "clustered")
    assert sorted(order) == list(range(40))
    w_perm = w[:, rng.permutation(40)]
    order = neuron_order(w_perm, 4, "clustered")
    feats = w_perm.T[order].reshape(4, 10, 16)
    spread = np.mean([np.linalg.norm(f - f.mean(0), axis=1).mean() for f in feats])
    assert spread < 0.5  # each expert holds one of the four well-separated neuron families


def test_attention_moe_with_all_experts_equals_dense_gqa():
    dense = Attention(AttentionConfig(**DIMS, impl="reference"), rngs=nnx.Rngs(0))
    moe = attention_moe_from_dense(dense, AttnMoEConfig(top_k=2, **DIMS))
    x = jax.random.normal(jax.random.key(1), (2, 11, 16))
    pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
    y_dense, _ = nnx.jit(lambda m, x: m(x, positions_BT=pos))(dense, x)
    ones = jnp.ones((2, 11, 2))
    y, _ = _FWD(moe, x, ones, ones > 0, pos)
    _close(y, y_dense)


def test_attention_moe_experts_see_only_their_tokens_and_decode_matches():
    moe = attention_moe_from_dense(
        Attention(AttentionConfig(**DIMS), rngs=nnx.Rngs(0)), AttnMoEConfig(top_k=1, **DIMS)
    )
    x = jax.random.normal(jax.random.key(2), (1, 9, 16))
    pos = jnp.arange(9)[None]
    w, routed = nnx.jit(lambda m, x: m.route(x))(moe, x)
    y, _ = _FWD(moe, x, w, routed, pos)
    # expert e's output at a token routed to it, from a compacted sequence of its tokens only
    e0 = np.flatnonzero(np.asarray(routed[0, :, 0]))
    assert 0 < len(e0) < 9
    sub = x[:, e0]
    ones = jnp.ones((1, len(e0), 2))
    only0 = ones.at[..., 1].set(0)
    y_sub, _ = _FWD(moe, sub, only0 * w[:, e0], only0 > 0, pos[:, e0])
    # tokens routed only to expert 0 (top-1): the whole output comes from expert 0
    _close(y[:, e0], y_sub)
    # prefill 5 then decode 4 one at a time = the parallel pass
    cache = moe.init_cache(1, 16)
    outs = []
    step = nnx.jit(lambda m, x, p, c: m(x, positions_BT=p, cache=c))
    y5, cache = step(moe, x[:, :5], pos[:, :5], cache)
    outs.append(y5)
    for t in range(5, 9):
        yt, cache = step(moe, x[:, t : t + 1], pos[:, t : t + 1], cache)
        outs.append(yt)
    _close(jnp.concatenate(outs, axis=1), y)
