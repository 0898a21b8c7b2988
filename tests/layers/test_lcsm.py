"""LCSM: each oscillation of the EOS mixer against m_t = diag(o_t) m_{t−1} + e_t i_tᵀ,
y_t = m_tᵀ s_t written out token by token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.layers.lcsm import LCSM, LCSMConfig
from jaxllm.layers.lightning import tnl_log_decay

F32 = dict(atol=2e-5, rtol=2e-5)  # float32; chunked ops vs a token loop
DIMS = dict(d_model=16, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=24, dtype="float32")


@pytest.mark.parametrize(
    "options",
    [
        dict(oscillation="none", expand="elu1", shrink="elu1"),
        dict(oscillation="static", expand="silu", shrink="silu"),
        dict(oscillation="data", expand="sigmoid", shrink="none", tau=4.0),
        dict(oscillation="data", expand="one_minus_gate", shrink="silu", state_dim=4),
    ],
)
def test_eos_recurrence(options):
    cfg = LCSMConfig(**DIMS, layer_index=1, n_layers=3, **options)
    layer = LCSM(cfg, rngs=nnx.Rngs(params=0))
    x = jax.random.normal(jax.random.key(1), (2, 10, 16))
    y, _ = layer(x, positions_BT=jnp.broadcast_to(jnp.arange(10), (2, 10)))

    act = {
        "none": lambda z: z,
        "silu": jax.nn.silu,
        "sigmoid": jax.nn.sigmoid,
        "elu1": lambda z: jax.nn.elu(z) + 1,
    }
    proj = lambda w: jnp.einsum("BTD,DHK->BTHK", x, w[...])
    s, i = act[cfg.shrink](proj(layer.ws)), proj(layer.wi)
    K = cfg.state_dim or 8
    if cfg.oscillation == "data":
        o = jnp.exp(jax.nn.log_sigmoid(proj(layer.wg)) / cfg.tau)
    elif cfg.oscillation == "static":
        # Initialised at TNL's official decay of this layer.
        lam = jnp.exp(tnl_log_decay(2, 1, 3))
        np.testing.assert_allclose(jnp.exp(-jax.nn.softplus(layer.decay_rho[...])), lam, rtol=1e-5)
        o = jnp.broadcast_to(lam[None, None, :, None], (2, 10, 2, K))
    else:
        o = jnp.ones((2, 10, 2, K))
    e = 1 - o if cfg.expand == "one_minus_gate" else act[cfg.expand](proj(layer.we))
    m = jnp.zeros((2, 2, K, 8))
    ys = []
    for t in range(10):
        m = o[:, t, :, :, None] * m + jnp.einsum("BHK,BHV->BHKV", e[:, t], i[:, t])
        ys.append(jnp.einsum("BHKV,BHK->BHV", m, s[:, t]))
    yy = jnp.stack(ys, axis=1)
    yy = yy / jnp.sqrt(jnp.mean(yy**2, axis=-1, keepdims=True) + cfg.norm_eps)
    want = jnp.einsum("BTHV,HVD->BTD", yy * layer.norm_scale[...].reshape(2, 8), layer.wo[...])
    np.testing.assert_allclose(y, want, **F32)


def test_tied_expand_needs_data_oscillation():
    with pytest.raises(ValueError, match="one_minus_gate needs oscillation=data"):
        LCSMConfig(**DIMS, oscillation="static", expand="one_minus_gate")
