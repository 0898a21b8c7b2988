"""Every `train.remat` policy computes the same loss and gradients as no checkpointing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import models
from jaxllm.training.remat import POLICIES, block_remat, checkpoint_policy
from tests.helpers import tiny


@pytest.fixture(scope="module")
def setup():
    cfg = tiny()
    graphdef, params = nnx.split(models.build(cfg.model, 0), nnx.Param)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)

    def loss_and_grads(remat):
        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens, remat=remat)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

        return jax.jit(jax.value_and_grad(loss))(params)

    return loss_and_grads, loss_and_grads(None)


@pytest.mark.parametrize(
    ("policy", "fraction"), [(p, 0.0) for p in POLICIES[1:]] + [("offload", 0.5), ("offload", 1.0)]
)
def test_policy_gives_the_loss_and_grads_of_none(setup, policy, fraction):
    loss_and_grads, (loss0, grads0) = setup
    loss, grads = loss_and_grads(block_remat(policy, fraction))
    # Recomputation replays the same float32 ops; XLA may fuse the replay differently, so
    # gradients agree to float32 rounding (~1e-7 relative), not bit for bit.
    np.testing.assert_allclose(loss, loss0, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match=r"train\.remat"):
        checkpoint_policy("sometimes")
