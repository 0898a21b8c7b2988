"""The optimizer factory: every `optim.name`, its own defaults, decay masks, state shardings,
and every name training the tiny model on 8 devices (data=4, fsdp=2)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from jaxllm.optim import build_optimizer, optimizer, resolved
from jaxllm.optim.came import CameState
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.training.loop import train
from jaxllm.training.state import Trainer
from tests.helpers import tiny

NAMES = ["adamw", "came", "lion", "signum", "sign_sgd", "sgd"]


def _params():
    return {"w": jnp.full((4, 3), 2.0), "scale": jnp.full((3,), 2.0)}


def _one_update(name, grads_value, *overrides):
    cfg = tiny(f"optim.name={name}", "optim.warmup_steps=0", "optim.schedule=constant",
               "optim.grad_clip=null", *overrides)  # fmt: skip
    tx, _ = build_optimizer(cfg.optim, 10)
    p = _params()
    g = jax.tree.map(lambda x: jnp.full_like(x, grads_value), p)
    updates, _ = tx.update(g, tx.init(p), p)
    return cfg, updates


def test_defaults_are_per_optimizer():
    assert resolved(tiny("optim.name=lion").optim) == {"lr": 3e-3, "b2": 0.99, "weight_decay": 0.3}
    cfg = tiny("optim.name=adamw", "optim.lr=null")
    adamw = optimizer("adamw").defaults
    assert resolved(cfg.optim) == adamw == {"lr": 3e-4, "b2": 0.95, "weight_decay": 0.1}
    # Sign-based: lr below AdamW's, decay above it, so that lr·wd stays comparable.
    for name in ("lion", "signum", "sign_sgd"):
        own = optimizer(name).defaults
        assert adamw["lr"] / own["lr"] == pytest.approx(3.0)
        assert own["weight_decay"] / adamw["weight_decay"] == pytest.approx(3.0)


@pytest.mark.parametrize("name", ["lion", "signum", "sign_sgd", "sgd", "adamw", "came"])
def test_zero_weight_decay_means_none(name):
    """With zero gradients and optim.weight_decay=0 nothing moves (optax.lion alone would
    decay by its default 1e-3)."""
    _, updates = _one_update(name, 0.0, "optim.weight_decay=0", "optim.lr=0.1")
    for u in jax.tree.leaves(updates):
        np.testing.assert_array_equal(u, 0.0)


@pytest.mark.parametrize("name", ["lion", "signum", "sign_sgd", "sgd", "adamw"])
def test_decoupled_decay_on_matrices_only(name):
    """Zero gradients: the update is -lr·wd·p on matrices and 0 on vectors (the mask)."""
    _, updates = _one_update(name, 0.0, "optim.weight_decay=0.5", "optim.lr=0.1")
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["scale"], 0.0)


@pytest.mark.parametrize("name", ["lion", "signum", "sign_sgd"])
def test_sign_updates_have_size_lr(name):
    _, updates = _one_update(name, 0.3, "optim.weight_decay=0", "optim.lr=0.01")
    for u in jax.tree.leaves(updates):
        np.testing.assert_allclose(u, -0.01, rtol=1e-6)


def test_came_state_shardings_on_fsdp():
    """The first moment mirrors its parameter's sharding; the factored row/column statistics
    (O(d), small), vectors' second moments and placeholders are replicated."""
    cfg = tiny("optim.name=came", "parallel.mesh.data=4", "parallel.mesh.fsdp=2")
    trainer = Trainer.create(cfg, make_mesh(cfg.parallel.mesh.resolve(jax.device_count())))
    params_sh = trainer.state_shardings["params"]
    is_came = lambda x: isinstance(x, CameState)
    (came_state,) = [
        s for s in jax.tree.leaves(trainer.state_shardings["opt_state"], is_leaf=is_came)
        if is_came(s)
    ]  # fmt: skip
    flat_p = jax.tree.leaves(params_sh)
    assert jax.tree.leaves(came_state.mu) == flat_p
    assert any(s.spec != PartitionSpec() for s in flat_p)  # fsdp really shards something
    for field in ("v_row", "v_col", "v", "res_row", "res_col"):
        for s in jax.tree.leaves(getattr(came_state, field)):
            # Replicated (the full second moment of a vector mirrors its vector: P(None)).
            assert all(a is None for a in s.spec), (field, s.spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_trains_on_fsdp(tmp_path, name):
    lr = {"adamw": 3e-3, "came": 3e-3, "lion": 1e-3, "signum": 1e-3, "sign_sgd": 1e-3, "sgd": 1.0}
    cfg = tiny(f"optim.name={name}", f"optim.lr={lr[name]}", "train.steps=24", "logging.every=4",
               "train.eval_every=0", "checkpoint.every=0", "parallel.mesh.data=4",
               "parallel.mesh.fsdp=2", f"train.run_dir={tmp_path}")  # fmt: skip
    losses = [r["loss"] for r in train(cfg)["records"] if "loss" in r]
    assert all(np.isfinite(losses))
    # From ~5.6 (uniform over 260 bytes) the tiny model learns byte frequencies quickly.
    assert losses[-1] < losses[0] - 0.5, losses
