"""`model.scan_layers`: the scanned decoder is the unrolled one, in values, gradients,
decoding, training steps and layouts (jaxllm.models.scan)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import config, models
from jaxllm.data import Pipeline
from jaxllm.models.scan import ScanPlan, plan_layers, stack_params, unstack_params
from jaxllm.optim import came
from jaxllm.optim.stacked import per_layer
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import spec_for
from jaxllm.training.state import Trainer
from jaxllm.training.step import make_train_step
from tests.helpers import tiny

# Float32 throughout. The scan runs the same ops in the same order; XLA may fuse them
# differently, so values agree to float32 rounding of each tensor's own scale.
REL = 2e-5


def _close(a, b, rel=REL, floor=1e-30):
    """max|a − b| within `rel` of b's largest entry (or of `floor`, if larger)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.max(np.abs(b)), floor)
    assert np.max(np.abs(a - b)) <= rel * scale, (np.max(np.abs(a - b)), scale)


def test_plan_finds_the_longest_repeating_run():
    assert plan_layers(["a"] * 6) == ScanPlan(0, 1, 6, 6)
    # a hybrid: seven linear layers then softmax, twice
    hybrid = (["lin"] * 7 + ["soft"]) * 2
    assert plan_layers(hybrid) == ScanPlan(0, 8, 2, 16)
    # CLA-2: producer / consumer alternate
    assert plan_layers(["p", "c"] * 3) == ScanPlan(0, 2, 3, 6)
    # unrolled ends (Cog's plain-softmax first and last layers, a dense first MoE layer)
    assert plan_layers(["x"] + ["a"] * 5 + ["y"]) == ScanPlan(1, 1, 5, 7)
    # the shortest period wins a tie, then the earliest start
    assert plan_layers(["a"] * 4).period == 1
    assert plan_layers(["a", "b", "c"]) is None
    plan = ScanPlan(1, 2, 3, 8)
    assert [plan.where(i) for i in (0, 1, 2, 4, 6, 7)] == [
        ("blocks", 0), ("scan", 0, 0), ("scan", 1, 0), ("scan", 1, 1), ("scan", 1, 2),
        ("tail", 0),
    ]  # fmt: skip


def _models(preset: str, *overrides: str):
    base = ["model.dtype=float32", *overrides]
    flat = models.build(config.load(preset, base).model, 0)
    scanned = models.build(config.load(preset, [*base, "model.scan_layers=true"]).model, 0)
    return flat, scanned


def _inputs(vocab: int):
    tok = jax.random.randint(jax.random.key(1), (2, 37), 0, vocab)
    seg = jnp.concatenate([jnp.zeros((2, 20), jnp.int32), jnp.ones((2, 17), jnp.int32)], 1)
    pos = jnp.concatenate([jnp.arange(20), jnp.arange(17)])[None].repeat(2, 0)
    dom = (tok % 2).astype(jnp.int32)
    return tok, {"positions_BT": pos, "segment_ids_BT": seg, "domain_BT": dom}


def _loss_and_grads(model, tok, kw):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        m = nnx.merge(graphdef, params)
        return jnp.mean(m(tok, **kw) ** 2)

    value, grads = jax.value_and_grad(loss)(params)
    return float(value), nnx.to_pure_dict(grads)


# one preset per family by default (softmax, linear with a per-layer decay, MoE with per-layer
# hash seeds); the others are `slow`
FAST = ["default", "tnl-tiny", "pangu-rre-tiny"]
SLOW = [
    "hgrn2-tiny", "cla-tiny", "cog-tiny", "cosformer2-tiny", "clla-tiny",
    "dape-tiny", "infini-tiny", "lcsm-tiny", "hybrid-tiny", "hmoe-tiny", "hunyuan-large-tiny",
    "llama-moe-v2-tiny", "mixtral-tiny",
]  # fmt: skip


@pytest.mark.parametrize("preset", FAST + [pytest.param(p, marks=pytest.mark.slow) for p in SLOW])
def test_scanned_equals_unrolled(preset):
    flat, scanned = _models(preset)
    assert scanned.plan is not None and scanned.plan.units >= 2
    p_flat = nnx.to_pure_dict(nnx.state(flat, nnx.Param))
    p_scan = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    # the same initial values, laid out per the plan, and back
    jax.tree.map(np.testing.assert_array_equal, stack_params(p_flat, scanned.plan), p_scan)
    jax.tree.map(np.testing.assert_array_equal, unstack_params(p_scan, scanned.plan), p_flat)
    tok, kw = _inputs(flat.cfg.vocab_size)
    loss_flat, g_flat = _loss_and_grads(flat, tok, kw)
    loss_scan, g_scan = _loss_and_grads(scanned, tok, kw)
    _close(loss_scan, loss_flat)
    # Gradients that are zero up to rounding (a router gets ~1e-11 when its choice is flat)
    # are compared on the scale of the model's largest gradient instead of their own.
    ref = jax.tree.leaves(stack_params(g_flat, scanned.plan))
    floor = 1e-3 * max(float(np.max(np.abs(b))) for b in ref)
    for a, b in zip(jax.tree.leaves(g_scan), ref, strict=True):
        _close(a, b, REL, floor)


@pytest.mark.parametrize(
    "preset",
    ["default", *(pytest.param(p, marks=pytest.mark.slow) for p in ("hgrn2-tiny", "cla-tiny"))],
)
def test_scanned_decode_equals_forward(preset):
    _, model = _models(preset)
    tok, _ = _inputs(model.cfg.vocab_size)
    full = model(tok)
    cache = model.init_cache(2, 64)
    logits, cache = model(tok[:, :30], cache=cache)
    steps = [logits]
    for t in range(30, 37):
        logits, cache = model(tok[:, t : t + 1], cache=cache)
        steps.append(logits)
    _close(jnp.concatenate(steps, axis=1), full)


def _train(cfg, steps=3):
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    trainer = Trainer.create(cfg, mesh)
    state = trainer.init_state(seed=0)
    step = make_train_step(trainer)
    it = Pipeline(cfg.data, seed=0).train_iterator()
    losses = []
    for _ in range(steps):
        batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in next(it).items()}
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, losses, jax.device_get(state)


@pytest.mark.parametrize(
    "overrides",
    [
        ("optim.name=adamw",),
        pytest.param(("optim.name=came", "train.remat=full"), marks=pytest.mark.slow),
        pytest.param(("precision.fp8=delayed", "train.microbatches=2"), marks=pytest.mark.slow),
    ],
    ids=["adamw", "came-remat", "fp8-delayed"],
)
def test_scanned_train_steps_equal_unrolled(overrides):
    # Two steps: FP8 rounds float32 differences of 1e-7 to whole FP8 steps, so from the third
    # step the two runs drift apart by ~1e-5 even with identical scaling state.
    cfg = tiny("model.n_layers=3", *overrides)
    _, flat_losses, flat = _train(cfg, steps=2)
    trainer, scan_losses, scanned = _train(
        tiny("model.n_layers=3", *overrides, "model.scan_layers=true"), steps=2
    )
    plan = trainer.model.merge(scanned["params"]).plan
    assert plan == ScanPlan(0, 1, 3, 3)
    np.testing.assert_allclose(scan_losses, flat_losses, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(unstack_params(scanned["params"], plan)), jax.tree.leaves(flat["params"]),
        strict=True,
    ):  # fmt: skip
        if "fp8_state" not in flat:
            _close(a, b, 1e-4)
        else:
            # An entry of x or dy on the other side of an FP8 rounding boundary changes a
            # gradient by a whole FP8 step, and Adam (m/√v) turns a changed small gradient
            # into a change of up to lr = 3e-3 in its weight: measured ≤ 1e-4 after two steps.
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)
    if "fp8_state" in flat:
        # layer l's projection j is entry l·P + j of the unrolled state, slice l of the
        # scanned state's entry j: the same histories and scales after two steps
        per_layer = sorted(scanned["fp8_state"])
        assert all(k.startswith("scan/") for k in per_layer)
        flat_keys = sorted(flat["fp8_state"])
        assert len(flat_keys) == 3 * len(per_layer)
        for i, key in enumerate(flat_keys):
            layer, j = divmod(i, len(per_layer))
            got = jax.tree.map(lambda x, l=layer: x[l], scanned["fp8_state"][per_layer[j]])
            jax.tree.map(np.testing.assert_array_equal, got, flat["fp8_state"][key])


def test_per_layer_optimizer_is_the_unrolled_one():
    """CAME factors matrices and leaves vectors whole: a stack of U vectors [U, D] must not be
    factored as a matrix, and each layer's update RMS is clipped on its own."""
    rng = np.random.default_rng(0)
    vec = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    mat = jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.float32)
    stacked = {"vec": vec, "mat": mat, "head": jnp.ones((8, 4))}
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), stacked)
    tx = came(1e-2, weight_decay=0.1)
    tx_stacked = per_layer(tx, {"vec": True, "mat": True, "head": False})
    updates, _ = tx_stacked.update(grads, tx_stacked.init(stacked), stacked)
    for u in range(3):
        one = {"vec": vec[u], "mat": mat[u]}
        g = {"vec": grads["vec"][u], "mat": grads["mat"][u]}
        ref, _ = tx.update(g, tx.init(one), one)
        np.testing.assert_allclose(updates["vec"][u], ref["vec"], rtol=1e-6)
        np.testing.assert_allclose(updates["mat"][u], ref["mat"], rtol=1e-6)
    head = {"head": stacked["head"]}
    ref, _ = tx.update({"head": grads["head"]}, tx.init(head), head)
    np.testing.assert_allclose(updates["head"], ref["head"], rtol=1e-6)


def test_scanned_layout_on_a_mesh():
    """data2 × fsdp2 × tensor2: the stacked weights keep their per-layer layout, the layers
    axis is not split, and loss and gradients are the single-device ones."""
    cfg = tiny("model.n_layers=3", "model.d_model=64", "model.scan_layers=true")
    batch = next(Pipeline(cfg.data, seed=0).train_iterator())

    def run(layout):
        devices = jax.devices()[: int(np.prod(list(layout.values())))]
        trainer = Trainer.create(cfg, make_mesh(layout, devices=devices))
        state = trainer.init_state(seed=0)
        step = make_train_step(trainer)
        b = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch.items()}
        new_state, metrics = step(state, b)
        return trainer, state, float(metrics["loss"]), jax.device_get(new_state["params"])

    _, _, ref_loss, ref_params = run({"data": 1})
    trainer, state, loss, params = run({"data": 2, "fsdp": 2, "tensor": 2})
    _close(loss, ref_loss)
    jax.tree.map(lambda a, b: _close(a, b, 1e-4), params, ref_params)
    wq = state["params"]["scan"][0]["mixer"]["wq"]
    assert wq.shape[0] == 3
    assert wq.sharding.spec == spec_for(("layers", "embed", "heads", "head_dim"), wq.shape,
                                        trainer.mesh)  # fmt: skip
    assert wq.sharding.spec[:3] == (None, "fsdp", "tensor")
