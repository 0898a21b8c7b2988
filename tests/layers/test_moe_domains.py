"""PanGu-Σ RRE domains end to end: `data.domains` gives each document a domain, batches carry it
per token, and the hash router sends a token to its own domain's expert group — in the layer and
through the trainer's forward pass (on one device and with an `expert` mesh axis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ConfigError
from jaxllm.data import Pipeline
from jaxllm.layers.moe import MoE, MoEConfig
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.training.state import Trainer
from jaxllm.training.step import _forward_loss, _under_rules
from tests.helpers import tiny


def _text_pipeline(tmp_path, **domains):
    for name, char in (("lib", "a"), ("test", "b")):
        (tmp_path / name).mkdir()
        for i in range(6):
            (tmp_path / name / f"{i}.txt").write_text(char * (20 + 7 * i))
    overrides = ["data.source=text", f"data.path={tmp_path}", "data.val_fraction=0.1"]
    cfg = tiny(*overrides, *(f"data.domains.{k}={v}" for k, v in domains.items()))
    return Pipeline(cfg.data, seed=0)


def test_batches_carry_the_documents_domain(tmp_path):
    pipe = _text_pipeline(tmp_path, **{"^test/": 1})
    tok = pipe.tokenizer
    a, b = tok.encode("a")[0], tok.encode("b")[0]
    it = pipe.train_iterator()
    batches = [next(it) for _ in range(4)]
    for batch in batches:
        inputs, domain = batch["inputs"], batch["domain"]
        assert domain.dtype == np.int32 and domain.shape == inputs.shape
        # every "b" comes from a test/ document (domain 1), every "a" from lib/, PAD is 0
        np.testing.assert_array_equal(domain[inputs == b], 1)
        np.testing.assert_array_equal(domain[inputs == a], 0)
        np.testing.assert_array_equal(domain[inputs == tok.pad_id], 0)
    assert {0, 1} <= set(np.unique(np.concatenate([x["domain"] for x in batches])))


def test_batches_have_no_domain_unless_configured(tmp_path):
    batch = next(_text_pipeline(tmp_path).train_iterator())
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}


def test_domain_beyond_the_routers_groups_is_a_config_error():
    with pytest.raises((ConfigError, ValueError), match="n_domains"):
        tiny("data.domains.x=2", name="pangu-rre-tiny")


def _hash_layer(**kw):
    cfg = MoEConfig(d_model=16, d_ff=24, dtype="float32", n_experts=8, top_k=1, router="hash",
                    n_domains=2, **kw)  # fmt: skip
    return MoE(cfg, rngs=nnx.Rngs(0))


def test_tokens_route_to_their_domains_expert_group():
    layer = _hash_layer()
    tokens_BT = jax.random.randint(jax.random.key(0), (4, 16), 0, 260)
    domain_BT = jax.random.randint(jax.random.key(1), (4, 16), 0, 2)
    x_BTD = jax.random.normal(jax.random.key(2), (4, 16, 16))
    routing, _, _ = layer.route(x_BTD.reshape(64, 16), tokens_BT.reshape(-1), domain_BT.reshape(-1))
    e_T, d_T = np.asarray(routing.experts_TK[:, 0]), np.asarray(domain_BT.reshape(-1))
    assert np.all(e_T // 4 == d_T)  # domain d's group is experts 4d .. 4d+3
    # the same token id takes the same place inside either group
    r0, _, _ = layer.route(x_BTD.reshape(64, 16), tokens_BT.reshape(-1), jnp.zeros(64, jnp.int32))
    np.testing.assert_array_equal(e_T % 4, np.asarray(r0.experts_TK[:, 0]))

    # a mixed batch's output is, token by token, that of the layer fixed to the token's domain
    def run(m, **kw):
        return nnx.jit(lambda m, x, t: m(x, tokens_BT=t, **kw))(m, x_BTD, tokens_BT)

    y = nnx.jit(lambda m, x, t, d: m(x, tokens_BT=t, domain_BT=d))(
        layer, x_BTD, tokens_BT, domain_BT
    )
    y0, y1 = run(_hash_layer(domain=0)), run(_hash_layer(domain=1))
    np.testing.assert_allclose(y, jnp.where(domain_BT[..., None] == 1, y1, y0), rtol=1e-6)


def _grads_fn(layout, cfg):
    """A jitted params-gradient of the train step's loss (`_forward_loss`) under `layout`, and
    the initial params: one compile for several batches."""
    mesh = make_mesh(layout, devices=jax.devices()[: int(np.prod(list(layout.values())))])
    trainer = Trainer.create(cfg, mesh)
    params = trainer.init_state(seed=0)["params"]
    grad = jax.jit(jax.grad(lambda p, b: _forward_loss(trainer, p, b)[0]))
    fn = _under_rules(trainer, grad)

    def grads(batch):
        sharded = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}
        return jax.device_get(fn(params, sharded))

    return grads


def _expert_grads(grads):
    """|grad| summed per expert of the one MoE layer (layer 1; layer 0 is dense)."""
    g = grads["blocks"][1]["ffn"]["groups"][0]["w_up"]
    return np.abs(np.asarray(g, np.float64)).sum(axis=(1, 2))


@pytest.mark.slow  # ~40 s; test_tokens_route_to_their_domains_expert_group checks the routing
def test_trainer_routes_by_the_batch_domain():
    """The pangu-rre-tiny preset's batches hold both domains (the corpus's test files are domain
    1); through the train step's forward pass, domain-1 tokens reach experts 4..7, with the
    batch's domain zeroed no gradient reaches them, and an expert-parallel mesh gives the same
    gradients."""
    cfg = tiny("model.ffns.moe.dense_layers=[0]", "model.ffns.moe.expert_d_ff=16",
               name="pangu-rre-tiny")  # fmt: skip
    batch = next(Pipeline(cfg.data, seed=0).train_iterator())
    assert {0, 1} <= set(np.unique(batch["domain"][batch["loss_mask"] > 0]))
    zeroed = {**batch, "domain": np.zeros_like(batch["domain"])}
    one = _grads_fn({"data": 1}, cfg)
    g, g0 = one(batch), one(zeroed)
    assert np.all(_expert_grads(g) > 0)
    assert np.all(_expert_grads(g0)[4:] == 0) and np.all(_expert_grads(g0)[:4] > 0)
    g_ep = _grads_fn({"data": 2, "expert": 4}, cfg)(batch)
    for a, b in zip(jax.tree.leaves(g_ep), jax.tree.leaves(g), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.max(np.abs(a - b)) <= 1e-4 * max(np.max(np.abs(b)), 1e-30)
