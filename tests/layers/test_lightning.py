"""TNL and cosFormer2 pieces: decay schedules, LRPE, SGLU, and the `lightning` / `cosformer2`
layers against their equations written out by hand (the packed lightning op:
tests/ops/test_lightning_attention_packed.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.layers.glu import SGLU, SGLUConfig
from jaxllm.layers.lightning import (
    CosFormer2,
    CosFormer2Config,
    Lightning,
    LightningConfig,
    alibi_slopes,
    tnl_log_decay,
)
from jaxllm.layers.lrpe import lrpe, lrpe_theta

# float32 on CPU: chunked sums reorder additions of O(1) terms over ≤ 40 tokens.
F32 = dict(atol=2e-5, rtol=2e-5)
DIMS = dict(d_model=16, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=24, dtype="float32")


def test_official_decay_matches_tnl_slopes():
    # H = 8: s_h = 2^(−(h+1)), layer 0 undamped, the last layer scaled by 1e−5.
    s = np.array([2.0 ** -(h + 1) for h in range(8)])
    np.testing.assert_allclose(-tnl_log_decay(8, 0, 4), s * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(-tnl_log_decay(8, 3, 4), s * 1e-5, rtol=1e-5)
    np.testing.assert_allclose(-tnl_log_decay(8, 1, 3), s * (0.5 + 1e-5), rtol=1e-6)
    # Not a power of two: Press et al.'s interleaving (their reference values for 6 heads).
    ref6 = [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    np.testing.assert_allclose(alibi_slopes(6), ref6)


def test_fla_decay_is_the_other_convention():
    g = tnl_log_decay(8, 1, 4, "fla")
    np.testing.assert_allclose(g, -(8 / 8) * np.arange(8) * (1 - 1 / 4), rtol=1e-6)
    assert float(g[0]) == 0.0  # head 0 never decays under fla's formula


def test_lrpe_gives_cosine_of_relative_position():
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, 5, 2, 6))
    k = jax.random.normal(kk, (1, 5, 2, 6))
    theta = lrpe_theta(2, 4) * 7.0  # a few radians per step, so cos differs clearly from 1
    pos = jnp.arange(5)[None]
    lq, lk = lrpe(q, pos, theta), lrpe(k, pos, theta)
    assert lq.shape == (1, 5, 2, 10)
    got = jnp.einsum("BTHK,BSHK->BHTS", lq, lk)
    rel = (pos[0][:, None] - pos[0][None, :]).astype(jnp.float32)
    cos_HTSR = jnp.cos(theta[:, None, None, :] * rel[None, :, :, None])
    want = jnp.einsum("BTHR,BSHR,HTSR->BHTS", q[..., :4], k[..., :4], cos_HTSR)
    want += jnp.einsum("BTHK,BSHK->BHTS", q[..., 4:], k[..., 4:])
    np.testing.assert_allclose(got, want, **F32)
    # Shifting every position by the same amount changes nothing.
    np.testing.assert_allclose(
        jnp.einsum("BTHK,BSHK->BHTS", lrpe(q, pos + 9, theta), lrpe(k, pos + 9, theta)), got, **F32
    )


def test_sglu_is_a_glu_without_activation():
    layer = SGLU(SGLUConfig(**DIMS), rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 16))
    want = ((x @ layer.w1[...]) * (x @ layer.w2[...])) @ layer.w3[...]
    np.testing.assert_allclose(layer(x), want, **F32)


def _silu(x):
    return x * jax.nn.sigmoid(x)


def _masked_decay(T, log_decay_H):
    t = np.arange(T)
    d = t[:, None] - t[None, :]
    return np.where(d >= 0, np.exp(np.asarray(log_decay_H)[:, None, None] * np.maximum(d, 0)), 0)


@pytest.mark.parametrize("use_lrpe,gate", [(False, "linear"), (True, "low_rank_sigmoid")])
def test_lightning_layer_matches_tnl_equations(use_lrpe, gate):
    cfg = LightningConfig(**DIMS, layer_index=1, n_layers=3, lrpe=use_lrpe, output_gate=gate)
    layer = Lightning(cfg, rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(2), (2, 11, 16))
    pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
    y, _ = layer(x, positions_BT=pos)

    p = {n: getattr(layer, n)[...] for n in ("wq", "wk", "wv", "wo")}
    q = _silu(jnp.einsum("BTD,DHK->BTHK", x, p["wq"]))
    k = _silu(jnp.einsum("BTD,DHK->BTHK", x, p["wk"]))
    if use_lrpe:
        th = layer.theta[...].reshape(2, 8)
        q, k = lrpe(q, pos, th), lrpe(k, pos, th)
    v = jnp.einsum("BTD,DHK->BTHK", x, p["wv"])
    if gate == "linear":
        u = jnp.einsum("BTD,DHK->BTHK", x, layer.wu[...])
    else:
        low = x @ layer.w_gate_down[...]
        u = jax.nn.sigmoid(jnp.einsum("BTR,RHK->BTHK", low, layer.w_gate_up[...]))
    # Layer 1 of 3 under the official schedule: λ_h = exp(−s_h · (1 − 1/2 + 1e−5)).
    log_lam = -np.array([2.0**-4, 2.0**-8]) * (0.5 + 1e-5)  # H = 2: s_h = 2^(−8(h+1)/2)
    scores = jnp.einsum("BTHK,BSHK->BHTS", q, k) * _masked_decay(11, log_lam)
    o = jnp.einsum("BHTS,BSHV->BTHV", scores, v).reshape(2, 11, 16)
    o = o / jnp.sqrt(jnp.mean(o**2, axis=-1, keepdims=True) + cfg.norm_eps)
    want = jnp.einsum("BTHK,HKD->BTD", u * o.reshape(2, 11, 2, 8), p["wo"])
    np.testing.assert_allclose(y, want, **F32)


def test_cosformer2_layer_matches_equations():
    cfg = CosFormer2Config(**DIMS)
    layer = CosFormer2(cfg, rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(3), (1, 9, 16))
    pos = jnp.arange(9)[None] + 3
    y, _ = layer(x, positions_BT=pos)
    q = _silu(jnp.einsum("BTD,DHK->BTHK", x, layer.wq[...]))
    k = _silu(jnp.einsum("BTD,DHK->BTHK", x, layer.wk[...]))
    v = jnp.einsum("BTD,DHK->BTHK", x, layer.wv[...])
    th = layer.theta[...].reshape(2, -1)
    assert th.shape == (2, 4)  # half of the head dim carries the cosine re-weighting
    rel = (pos[0][:, None] - pos[0][None, :]).astype(jnp.float32)
    cos_HTSR = jnp.cos(th[:, None, None, :] * rel[None, :, :, None])
    s = jnp.einsum("BTHR,BSHR,HTSR->BHTS", q[..., :4], k[..., :4], cos_HTSR)
    s += jnp.einsum("BTHK,BSHK->BHTS", q[..., 4:], k[..., 4:])
    s = s * np.tril(np.ones((9, 9)))  # no decay: a plain causal sum
    o = jnp.einsum("BHTS,BSHV->BTHV", s, v)
    o = (
        o
        / jnp.sqrt(jnp.mean(o**2, axis=-1, keepdims=True) + cfg.norm_eps)
        * layer.norm_scale[...].reshape(2, 8)
    )
    gate = jax.nn.sigmoid(x @ layer.w_gate_down[...] @ layer.w_gate_up[...].reshape(8, 16))
    want = jnp.einsum("BTHK,HKD->BTD", gate.reshape(1, 9, 2, 8) * o, layer.wo[...])
    np.testing.assert_allclose(y, want, **F32)
