"""The `moe` channel mixer: its paths agree, shared experts add, balancing is wired into the
trainer (aux losses, metrics, the aux-loss-free bias), and the MoE presets train."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxllm.layers.mlp import SwiGLU
from jaxllm.layers.moe import MoE, MoEConfig
from jaxllm.training.loop import train
from tests.helpers import tiny

# float32; paths differ only in summation order, errors relative to the largest entry
REL = 2e-5


def _close(a, b, rel=REL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= rel * max(np.max(np.abs(b)), 1e-30)


def _layer(**kw):
    cfg = MoEConfig(d_model=16, d_ff=24, dtype="float32", lb_loss=0.0, **kw)
    return MoE(cfg, rngs=nnx.Rngs(0))


def _out_and_grads(layer, x):
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    @jax.jit
    def f(params, x):
        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            return jnp.sum(jnp.sin(m(x))), m(x)

        return jax.grad(loss, has_aux=True)(params)

    g, y = f(params, x)
    return y, g


def test_paths_agree_with_the_reference():
    # (heterogeneous widths: tests/ops/test_moe.py, per path, outputs and gradients)
    kw = {"n_shared": 1, "router": "sigmoid"}
    x = jax.random.normal(jax.random.key(1), (2, 9, 16))
    y_ref, g_ref = _out_and_grads(_layer(impl="reference", **kw), x)
    y_drop, g_drop = _out_and_grads(_layer(impl="dropless", **kw), x)
    # capacity = all tokens: nothing dropped, so it equals the dropless layer
    y_cap, g_cap = _out_and_grads(_layer(capacity_factor=8.0, **kw), x)
    for y, g in ((y_drop, g_drop), (y_cap, g_cap)):
        _close(y, y_ref)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
            _close(a, b)


def test_shared_expert_is_added_and_dense_layers_are_swiglu():
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    layer = _layer(n_shared=2, shared_d_ff=8)
    routed = nnx.jit(lambda m, x: m(x) - m.shared(x))(layer, x)
    assert layer.shared.w_up.shape == (16, 16)  # 2 shared experts of width 8
    alone = _layer()
    alone.w_router, alone.groups = layer.w_router, layer.groups
    _close(routed, nnx.jit(lambda m, x: m(x))(alone, x))
    dense = MoEConfig(d_model=16, d_ff=24, n_layers=4, layer_index=3, dense_layers=[-1])
    m = MoE(dense, rngs=nnx.Rngs(0))
    assert isinstance(m.dense, SwiGLU) and not hasattr(m, "groups")


def test_sown_losses_and_metrics():
    layer = MoEConfig(d_model=16, d_ff=24, dtype="float32", z_loss=1e-3, capacity_factor=1.0)
    m = MoE(layer, rngs=nnx.Rngs(0))
    nnx.jit(lambda m, x: m(x))(m, jax.random.normal(jax.random.key(1), (2, 8, 16)))
    sown = {str(p[0]): v.get_value()[0] for p, v in nnx.to_flat_state(nnx.pop(m, nnx.Intermediate))}
    assert {"aux_loss", "metric_moe_lb_loss", "metric_moe_router_z_loss", "metric_moe_load_max",
            "metric_moe_dropped_fraction", "metric_moe_recycled_fraction"} <= set(sown)  # fmt: skip
    want = 0.01 * sown["metric_moe_lb_loss"] + 1e-3 * sown["metric_moe_router_z_loss"]
    np.testing.assert_allclose(sown["aux_loss"], want, rtol=1e-6)
    assert 0 <= float(sown["metric_moe_dropped_fraction"]) < 1


def _moe_run(tmp_path, *extra, name="mixtral-tiny", steps=6):
    cfg = tiny(f"train.steps={steps}", "logging.every=1", "train.eval_every=0",
               "checkpoint.every=0", f"train.run_dir={tmp_path}", *extra, name=name)  # fmt: skip
    return cfg, train(cfg)


def test_trains_with_aux_free_bias_updated_outside_the_optimizer(tmp_path):
    """One short run of mixtral-tiny with a sigmoid router and the aux-loss-free bias: the loss
    falls, the layer metrics are logged, and the bias moves by centred ±γ sign steps (the
    optimizer, which sees a zero gradient for it, does not move it)."""
    rate, steps = 0.01, 8
    _, out = _moe_run(tmp_path, "optim.lr=1e-2", f"model.ffns.moe.aux_free_rate={rate}",
                      "model.ffns.moe.router=sigmoid", steps=steps)  # fmt: skip
    rec = [r for r in out["records"] if "loss" in r]
    assert rec[-1]["loss"] < rec[0]["loss"] - 0.5
    assert all({"moe_load_max", "moe_lb_loss"} <= set(r) for r in rec)
    assert not any(k.startswith("update:") for r in rec for k in r)
    mngr = ocp.CheckpointManager(tmp_path / "checkpoints")
    params = mngr.restore(steps, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    bias = np.asarray(params["state"]["params"]["blocks"]["0"]["ffn"]["router_bias"])
    # `steps` sign steps of ±γ, each centred: multiples of γ/8 within steps·γ, zero mean
    assert np.abs(bias).max() > 0 and np.abs(bias).max() <= steps * rate + 1e-6
    np.testing.assert_allclose(bias.mean(), 0, atol=1e-6)
    np.testing.assert_allclose(bias * 8 / rate, np.round(bias * 8 / rate), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,extra",
    [
        ("mixtral-tiny", ()),
        ("hunyuan-large-tiny", ()),
        ("hmoe-tiny", ()),
        ("llama-moe-v2-tiny", ("model.n_layers=4",)),
        ("pangu-rre-tiny", ("model.n_layers=4",)),
    ],
)
def test_presets_train(tmp_path, name, extra):
    _, out = _moe_run(tmp_path, "optim.lr=1e-2", *extra, name=name, steps=12)
    rec = [r for r in out["records"] if "loss" in r]
    assert rec[-1]["loss"] < rec[0]["loss"] - 0.5
    if name == "hunyuan-large-tiny":
        assert "moe_recycled_fraction" in rec[-1]
