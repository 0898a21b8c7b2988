"""Per-parameter-group learning rates and decay (optax.partition) and the expert lr law."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError
from jaxllm.optim import build_optimizer, group_labels, lr_scale_for_tokens
from jaxllm.scaling import surge_optimal_lr
from tests.helpers import tiny

PARAMS = {
    "embed": jnp.full((6, 4), 2.0),
    "blocks": {
        "0": {"ffn": {"experts": {"w_up": jnp.full((2, 4, 3), 2.0)},
                      "w_gate": jnp.full((4, 2), 2.0)},
              "norm": {"scale": jnp.full((4,), 2.0)}},
        "1": {"ffn": {"experts": {"w_up": jnp.full((2, 4, 3), 2.0)}}},
    },
}  # fmt: skip
GROUPS = ("optim.groups=[{pattern: 'blocks/0/ffn/experts', lr_scale: 0.25, weight_decay: 0.0},"
          " {pattern: 'experts', lr_scale: 0.5}]")  # fmt: skip


def _updates(name, grad, *overrides):
    cfg = tiny(f"optim.name={name}", "optim.lr=0.01", "optim.warmup_steps=0",
               "optim.schedule=constant", "optim.grad_clip=null", GROUPS, *overrides)  # fmt: skip
    tx, _ = build_optimizer(cfg.optim, 10)
    g = jax.tree.map(lambda p: jnp.full_like(p, grad), PARAMS)
    updates, _ = tx.update(g, tx.init(PARAMS), PARAMS)
    return updates


def test_labels_first_match_wins():
    labels = group_labels(["blocks/0/ffn/experts", "experts"], PARAMS)
    assert labels["blocks"]["0"]["ffn"]["experts"]["w_up"] == "group_0"
    assert labels["blocks"]["1"]["ffn"]["experts"]["w_up"] == "group_1"
    assert labels["blocks"]["0"]["ffn"]["w_gate"] == "base"
    assert labels["embed"] == "base"


@pytest.mark.parametrize("name", ["sign_sgd", "adamw", "lion"])
def test_each_group_gets_its_learning_rate(name):
    """Sign-like first steps move every coordinate by exactly the group's lr (no decay)."""
    u = _updates(name, 0.3, "optim.weight_decay=0")
    np.testing.assert_allclose(u["embed"], -0.01, rtol=1e-4)
    np.testing.assert_allclose(u["blocks"]["0"]["ffn"]["w_gate"], -0.01, rtol=1e-4)
    np.testing.assert_allclose(u["blocks"]["0"]["ffn"]["experts"]["w_up"], -0.0025, rtol=1e-4)
    np.testing.assert_allclose(u["blocks"]["1"]["ffn"]["experts"]["w_up"], -0.005, rtol=1e-4)


def test_group_weight_decay_overrides():
    """Zero gradients: only decay moves the params, -lr·scale·wd·p, with the group's own wd."""
    u = _updates("sign_sgd", 0.0, "optim.weight_decay=0.5")
    np.testing.assert_allclose(u["embed"], -0.01 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(u["blocks"]["0"]["ffn"]["experts"]["w_up"], 0.0)  # wd 0
    np.testing.assert_allclose(u["blocks"]["1"]["ffn"]["experts"]["w_up"],
                               -0.005 * 0.5 * 2.0, rtol=1e-6)  # fmt: skip
    np.testing.assert_array_equal(u["blocks"]["0"]["norm"]["scale"], 0.0)  # mask: vectors


def test_groups_through_the_train_state_and_bad_regex():
    tx, _ = build_optimizer(tiny(GROUPS).optim, 10)
    state = tx.init(PARAMS)  # the partition's state is a pytree of arrays
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    with pytest.raises(ConfigError, match="regex"):
        tiny("optim.groups=[{pattern: '(unclosed'}]")


def test_lr_scale_for_tokens():
    assert lr_scale_for_tokens(1, 16, "linear") == pytest.approx(1 / 16)
    assert lr_scale_for_tokens(1, 16, "sqrt") == pytest.approx(0.25)
    # Surge, by hand: f(B) = 1 / (½(√(Bn/B) + √(B/Bn))); Bn = 4·total, total = 16, seen = 1:
    # f(16) = 1/(½(2 + ½)) = 0.8, f(1) = 1/(½(8 + 1/8)) = 0.24615..., ratio 0.30769...
    by_hand = (1 / (0.5 * (8 + 1 / 8))) / (1 / (0.5 * (2 + 1 / 2)))
    assert lr_scale_for_tokens(1, 16, "surge", b_noise=64) == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(0.3077, abs=1e-4)  # Hunyuan-Large's ≈0.31
    assert lr_scale_for_tokens(1, 16, "surge", b_noise=64) == pytest.approx(
        float(surge_optimal_lr(1, 64, 1) / surge_optimal_lr(16, 64, 1))
    )
    # Far below B_noise the Surge ratio tends to the square root.
    assert lr_scale_for_tokens(1, 16, "surge", b_noise=1e9) == pytest.approx(0.25, rel=1e-6)
    assert lr_scale_for_tokens(16, 16, "surge", b_noise=3) == 1.0
    for bad in [dict(law="surge"), dict(law="cubic")]:
        with pytest.raises(ValueError):
            lr_scale_for_tokens(1, 16, **bad)
    assert math.isclose(lr_scale_for_tokens(4, 4, "sqrt"), 1.0)
