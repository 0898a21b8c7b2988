"""On 8 CPU devices, data / FSDP / tensor layouts give the single-device loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.data import Pipeline
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import spec_for
from jaxllm.training.state import Trainer
from jaxllm.training.step import _forward_loss, _under_rules
from tests.helpers import tiny

# Float32 throughout; layouts only reorder the sums of partial products, so errors are
# measured against each tensor's own scale (its largest entry).
REL = 1e-5


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= REL * max(np.max(np.abs(b)), 1e-30)


def _loss_and_grads(layout: dict[str, int], cfg, batch):
    devices = jax.devices()[: int(np.prod(list(layout.values())))]
    mesh = make_mesh(layout, devices=devices)
    trainer = Trainer.create(cfg, mesh)
    state = trainer.init_state(seed=0)
    sharded = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}

    def f(params, b):
        (total, _), grads = jax.value_and_grad(
            lambda p: _forward_loss(trainer, p, b), has_aux=True
        )(params)
        return total, grads

    fn = _under_rules(trainer, jax.jit(f))
    total, grads = fn(state["params"], sharded)
    return trainer, state, float(total), jax.device_get(grads)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny("model.d_model=64", "model.d_ff=128", "model.n_heads=4", "model.n_kv_heads=2")
    batch = next(Pipeline(cfg.data, seed=0).train_iterator())
    ref = _loss_and_grads({"data": 1, "fsdp": 1, "tensor": 1}, cfg, batch)
    return cfg, batch, ref


@pytest.mark.parametrize(
    "layout",
    [
        {"data": 8, "fsdp": 1, "tensor": 1},
        {"data": 1, "fsdp": 8, "tensor": 1},
        {"data": 4, "fsdp": 1, "tensor": 2},
        {"data": 2, "fsdp": 2, "tensor": 2},
    ],
    ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()),
)
def test_layout_matches_single_device(setup, layout):
    cfg, batch, (_, _, ref_loss, ref_grads) = setup
    trainer, state, loss, grads = _loss_and_grads(layout, cfg, batch)
    _close(loss, ref_loss)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        _close(a, b)
    # The parameters really are laid out as the rules say.
    wq = state["params"]["blocks"][0]["mixer"]["wq"]
    expect = spec_for(("embed", "heads", "head_dim"), wq.shape, trainer.mesh)
    assert wq.sharding.spec == expect
    if layout["fsdp"] > 1:
        assert expect[0] == "fsdp"
    if layout["tensor"] > 1:
        assert expect[1] == "tensor"
        assert wq.addressable_shards[0].data.shape[1] == wq.shape[1] // layout["tensor"]


def test_rules_skip_axes_that_do_not_divide():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert spec_for(("batch", "length"), (8, 16), mesh) == jax.P(("data", "fsdp"), None)
    assert spec_for(("batch", "length"), (2, 16), mesh) == jax.P("data", None)
    assert spec_for(("kv_heads",), (1,), mesh) == jax.P(None)
    assert spec_for(("embed", "mlp"), (6, 4), mesh) == jax.P("fsdp", "tensor")
    assert jnp.zeros(()).shape == ()
