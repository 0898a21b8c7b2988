import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import sample_logits
from tests.helpers import assert_greedy_generation, tiny

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def _draws(n=4000, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    toks = jax.vmap(lambda k: sample_logits(LOGITS, k, **kw)[0])(keys)
    return np.bincount(np.asarray(toks), minlength=4) / n


def test_greedy_and_temperature():
    assert int(sample_logits(LOGITS, jax.random.key(0), temperature=0)[0]) == 0
    np.testing.assert_allclose(_draws(), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # Temperature 0.5 squares the probabilities (then renormalises).
    p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    np.testing.assert_allclose(_draws(temperature=0.5), p / p.sum(), atol=0.03)


def test_top_k_and_top_p():
    np.testing.assert_allclose(_draws(top_k=2), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)
    # Nucleus 0.7: 0.5 alone is below 0.7, so the second token joins; the third does not.
    np.testing.assert_allclose(_draws(top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.03)
    # p so small that only the top token is kept.
    assert _draws(top_p=0.1)[0] == 1.0


def test_greedy_generation_equals_argmax_of_full_forward():
    prompt = np.array([[256, 100, 101, 102], [256, 40, 41, 42]])
    assert_greedy_generation(tiny(), prompt, max_new_tokens=6)


@pytest.mark.parametrize("scan", [False, True])
def test_sampling_from_layers_that_sow(scan):
    # MoE layers sow load metrics (and a scanned decoder its stacked intermediates) on every
    # call: the decode loop must not mutate a module merged outside its own trace (issue 23).
    cfg = tiny("model.ffn=moe", "model.ffns.moe.n_experts=4", f"model.scan_layers={scan}")
    assert_greedy_generation(cfg, np.array([[256, 100, 101, 102]]), max_new_tokens=5)
