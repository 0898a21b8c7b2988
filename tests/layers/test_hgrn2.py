"""HGRN2: the layer against its recurrence written out token by token, and the forget gate's
layer-monotone lower bound."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.layers.hgrn2 import CARRY_KEY, HGRN2, HGRN2Config

F32 = dict(atol=2e-5, rtol=2e-5)  # float32; chunked GLA vs a token loop
DIMS = dict(d_model=16, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=24, dtype="float32")


def _layers(n_layers=4, **kw):
    cfgs = [HGRN2Config(**DIMS, layer_index=i, n_layers=n_layers, **kw) for i in range(n_layers)]
    return [HGRN2(c, rngs=nnx.Rngs(params=i)) for i, c in enumerate(cfgs)]


def test_lower_bound_is_l_over_L_at_init_and_monotone():
    layers = _layers(4)
    carry = {}
    z = jax.random.normal(jax.random.key(0), (1, 3, 2, 8)) * 3
    bounds = []
    for layer in layers:
        log_f, k = layer.gates(z, carry)
        gamma = -jnp.expm1(carry[CARRY_KEY])
        bounds.append(gamma)
        f = jnp.exp(log_f)
        # f = γ + (1 − γ)σ(z) and k = 1 − f exactly.
        np.testing.assert_allclose(f, gamma + (1 - gamma) * jax.nn.sigmoid(z), **F32)
        np.testing.assert_allclose(k, 1 - f, **F32)
    np.testing.assert_allclose([float(b.mean()) for b in bounds], [0, 0.25, 0.5, 0.75], atol=1e-6)
    # Whatever the learned logits, each layer's floor is at least the one below it.
    layers[2].lower_bound_logit[...] = jnp.full((16,), -9.0)
    carry = {}
    prev = None
    for layer in layers:
        layer.gates(z, carry)
        gamma = -jnp.expm1(carry[CARRY_KEY])
        if prev is not None:
            assert bool(jnp.all(gamma >= prev))
        prev = gamma


def test_layer_matches_hgrn2_recurrence():
    layer = _layers(3)[1]
    x = jax.random.normal(jax.random.key(1), (2, 13, 16))
    pos = jnp.broadcast_to(jnp.arange(13), (2, 13))
    y, _ = layer(x, positions_BT=pos, carry={})

    gamma = 1.0 / 3.0  # layer 1 of 3 at initialisation
    q = jax.nn.silu(jnp.einsum("BTD,DHK->BTHK", x, layer.wq[...]))
    f = gamma + (1 - gamma) * jax.nn.sigmoid(jnp.einsum("BTD,DHK->BTHK", x, layer.wf[...]))
    i = jnp.einsum("BTD,DHV->BTHV", x, layer.wi[...])
    S = jnp.zeros((2, 2, 8, 8))
    outs = []
    for t in range(13):
        S = f[:, t, :, :, None] * S + jnp.einsum("BHK,BHV->BHKV", 1 - f[:, t], i[:, t])
        outs.append(jnp.einsum("BHK,BHKV->BHV", q[:, t], S))
    o = jnp.stack(outs, axis=1).reshape(2, 13, 16)
    o = o / jnp.sqrt(jnp.mean(o**2, axis=-1, keepdims=True) + 1e-5)
    o = o * layer.norm_scale[...]
    want = jnp.einsum("BTHV,HVD->BTD", o.reshape(2, 13, 2, 8), layer.wo[...])
    np.testing.assert_allclose(y, want, **F32)


def test_expand_ratio_sets_heads_and_state():
    layer = HGRN2(HGRN2Config(**DIMS, expand_ratio=4), rngs=nnx.Rngs(params=0))
    assert (layer.h, layer.k, layer.v) == (4, 4, 4)
    assert layer.init_cache(3, 100)["state"].shape == (3, 4, 4, 4)


def test_packed_documents_equal_documents_alone():
    """A packed row (chunks of 4: a document start at a chunk boundary, inside a chunk, and a
    one-token document) gives each document the output it gets alone."""
    layer = HGRN2(HGRN2Config(**DIMS, layer_index=1, n_layers=3, chunk_size=4),
                  rngs=nnx.Rngs(params=0))  # fmt: skip
    lengths = [4, 5, 1, 3]
    x = jax.random.normal(jax.random.key(2), (1, sum(lengths), 16))
    seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
    pos = jnp.zeros_like(seg)
    y, _ = layer(x, positions_BT=pos, segment_ids_BT=seg, carry={})
    start = 0
    for n in lengths:
        alone, _ = layer(x[:, start : start + n], positions_BT=pos[:, :n], carry={})
        np.testing.assert_allclose(y[:, start : start + n], alone, **F32)
        start += n
