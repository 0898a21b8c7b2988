"""Expert parallelism on 8 CPU devices: the `moe` layer under a mesh with an `expert` axis gives
the single-device outputs and gradients (dropless; capacity when nothing is dropped), capacity is
counted per device, and a whole model's loss and gradients match across layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.data import Pipeline
from jaxllm.layers.moe import MoE, MoEConfig
from jaxllm.parallel import expert as ep
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import use_rules
from tests.helpers import tiny

# float32; the exchange only moves rows, the grouped matmuls see the same rows in another order
REL = 2e-5


def _close(a, b, rel=REL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= rel * max(np.max(np.abs(b)), 1e-30), np.max(np.abs(a - b))


def _mesh(layout):
    n = int(np.prod(list(layout.values())))
    return make_mesh(layout, devices=jax.devices()[:n])


def _run(layer, x, mesh=None):
    """(y, grads wrt (params, x), sown metrics) of sum(sin(layer(x)))."""
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def f(params, x):
        def loss(params, x):
            m = nnx.merge(graphdef, params, rest)
            y = m(x)
            sown = nnx.pop(m, nnx.Intermediate)
            metrics = {str(p[0]): v.get_value()[0] for p, v in nnx.to_flat_state(sown)}
            return jnp.sum(jnp.sin(y)), (y, metrics)

        g, (y, metrics) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, g, metrics

    if mesh is None:
        return jax.jit(f)(params, x)
    with use_rules(mesh):
        return jax.jit(f)(params, x)


E8, D2E4, F2T2E2 = {"expert": 8}, {"data": 2, "expert": 4}, {"fsdp": 2, "tensor": 2, "expert": 2}
_FAST = {
    ("dropless", "data2-expert4"),
    ("capacity_no_drop", "expert8"),
    ("hmoe", "fsdp2-tensor2-expert2"),
}
CASES = [
    pytest.param(
        case, layout, id=f"{case}-{lid}", marks=() if (case, lid) in _FAST else pytest.mark.slow
    )
    for case in ("dropless", "hmoe", "capacity_no_drop")
    for layout, lid in ((E8, "expert8"), (D2E4, "data2-expert4"), (F2T2E2, "fsdp2-tensor2-expert2"))
]


@pytest.mark.parametrize("case,layout", CASES)
def test_expert_parallel_equals_single_device(layout, case):
    kw = {"top_k": 2, "n_shared": 1, "z_loss": 1e-3}
    if case == "hmoe":
        kw |= {"expert_d_ff": [8] * 8 + [16] * 8, "router": "top_p", "top_k": 4}
    if case == "capacity_no_drop":
        # per-device capacity ceil(cf·T_dev·K/E) ≥ T_dev: no choice can be dropped
        kw |= {"capacity_factor": 8.0, "drop_policy": "recycle"}
    cfg = MoEConfig(d_model=16, d_ff=24, n_experts=16, dtype="float32", **kw)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 6, 16))
    mesh = _mesh(layout)
    assert ep.active(mesh)
    y1, g1, m1 = _run(layer, x)
    y8, g8, m8 = _run(layer, x, mesh)
    _close(y8, y1)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        _close(a, b)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)
    if case == "capacity_no_drop":
        assert float(m8["metric_moe_dropped_fraction"]) == 0


def test_capacity_is_counted_per_device():
    """With drops, the expert-parallel layer equals the single-device layer applied to each
    device's tokens separately (capacity ceil(cf·T_dev·K/E) and priority among its own tokens),
    and reports the dropped fraction over all devices."""
    cfg = MoEConfig(d_model=16, d_ff=24, n_experts=8, top_k=2, dtype="float32",
                    capacity_factor=0.75, lb_loss=0.0)  # fmt: skip
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 6, 16))
    y8, _, m8 = _run(layer, x, _mesh({"expert": 4}))
    parts = [_run(layer, xs) for xs in jnp.split(x, 4)]
    _close(y8, jnp.concatenate([p[0] for p in parts]))
    dropped = np.mean([float(p[2]["metric_moe_dropped_fraction"]) for p in parts])
    assert 0 < float(m8["metric_moe_dropped_fraction"]) == pytest.approx(dropped, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [D2E4, F2T2E2], ids=["data2-expert4", "fsdp2-tensor2-expert2"])
def test_model_loss_and_grads_match_with_expert_axis(layout):
    from tests.parallel.test_layouts import _loss_and_grads

    cfg = tiny("model.ffn=moe", "model.ffns.moe.n_experts=4", "model.ffns.moe.top_k=2",
               "model.d_ff=64", "model.n_heads=4", "model.n_kv_heads=2")  # fmt: skip
    batch = next(Pipeline(cfg.data, seed=0).train_iterator())
    _, _, loss1, g1 = _loss_and_grads({"data": 1, "fsdp": 1, "tensor": 1}, cfg, batch)
    _, _, loss8, g8 = _loss_and_grads(layout, cfg, batch)
    assert loss8 == pytest.approx(loss1, rel=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        _close(a, b, 1e-4)
