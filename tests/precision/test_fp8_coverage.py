"""Every weight projection of every mixer and of the MoE experts runs in the configured
precision: the grouped expert GEMM (`project_ragged`) against `ragged_dot`, and each layer
family through a whole model (its delayed-FP8 state names its projections, FP8 and ExMy change
its output and gradients by no more than the formats' rounding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import config, models
from jaxllm.layers.moe import MoE, MoEConfig
from jaxllm.precision import (
    PrecisionSpec,
    parse_exmy,
    project_ragged,
    record_delayed_keys,
    update_delayed_state,
    use_precision,
)
from jaxllm.precision import ragged as rg

N, D, F, E = 40, 32, 24, 4
SIZES = jnp.array([10, 5, 0, 20], jnp.int32)  # an empty expert, and 5 rows past the end
# experts four decades apart in magnitude: one scale per expert keeps each one's precision
W_MAG = jnp.array([1.0, 0.01, 10.0, 0.1])


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def xwdy():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (N, D))
    w = jax.random.normal(k[1], (E, D, F)) * W_MAG[:, None, None]
    return x, w, jax.random.normal(k[2], (N, F))


def _vjp(f, x, w, dy):
    @jax.jit
    def run(x, w, dy):
        y, back = jax.vjp(f, x, w)
        return (y, *back(dy))

    return run(x, w, dy)


def test_ragged_current_is_the_scaled_fp8_gemm(xwdy):
    """Forward: exactly ragged_dot of E4M3(x·s_x)/s_x and E4M3(w_e·s_e)/s_e (s_e = 448 /
    amax of expert e), to float32 rounding. Backward: within E5M2 error of the exact grads."""
    x, w, dy = xwdy
    y, dx, dw = _vjp(lambda a, b: rg.fp8_ragged_current(a, b, SIZES), x, w, dy)
    sx = 448.0 / jnp.max(jnp.abs(x))
    sw = 448.0 / jnp.max(jnp.abs(w), axis=(1, 2))
    xq = (x * sx).astype(jnp.float8_e4m3fn).astype(jnp.float32) / sx
    wq = (w * sw[:, None, None]).astype(jnp.float8_e4m3fn).astype(jnp.float32) / sw[:, None, None]
    np.testing.assert_allclose(y, jax.lax.ragged_dot(xq, wq, SIZES), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(y[35:]))) == 0.0  # rows past the groups stay zero
    y0, dx0, dw0 = _vjp(lambda a, b: jax.lax.ragged_dot(a, b, SIZES), x, w, dy)
    # E4M3 rounds each operand by ≤ 2^-4 relative (RMS ~3.6%), E5M2 by ≤ 2^-3 (RMS ~7%):
    # a product's relative RMS error is ~5% forward and ~8% backward; 0 would mean no FP8.
    assert 0.01 < _rel(y, y0) < 0.07
    assert 0.01 < _rel(dx, dx0) < 0.1
    for e in (0, 1, 3):  # every non-empty expert, the 0.01-magnitude one included
        assert 0.01 < _rel(dw[e], dw0[e]) < 0.1, e
    assert float(jnp.max(jnp.abs(dw[2]))) == 0.0


@pytest.mark.parametrize(
    "mode",
    [("blockwise", 128), ("blockwise", 8), ("exmy", (parse_exmy("e4m3/8"),) * 6)],
    ids=["blockwise128", "blockwise8", "exmy-e4m3-8"],
)
def test_ragged_qdq_within_the_format_error(xwdy, mode):
    x, w, dy = xwdy
    y, dx, dw = _vjp(lambda a, b: rg.qdq_ragged(a, b, SIZES, mode), x, w, dy)
    y0, dx0, dw0 = _vjp(lambda a, b: jax.lax.ragged_dot(a, b, SIZES), x, w, dy)
    for got, want in ((y, y0), (dx, dx0), *((dw[e], dw0[e]) for e in (0, 1, 3))):
        assert 0.005 < _rel(got, want) < 0.07  # E4M3 on both operands of every GEMM


def test_ragged_exmy_quantizes_only_the_chosen_inputs(xwdy):
    """Only P2 (forward weight) quantized: dX and dW are exact, Y is not."""
    x, w, dy = xwdy
    specs = (None, parse_exmy("e2m1/8"), None, None, None, None)
    y, dx, dw = _vjp(lambda a, b: rg.qdq_ragged(a, b, SIZES, ("exmy", specs)), x, w, dy)
    y0, dx0, dw0 = _vjp(lambda a, b: jax.lax.ragged_dot(a, b, SIZES), x, w, dy)
    assert _rel(y, y0) > 0.05
    np.testing.assert_allclose(dx, dx0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, dw0, rtol=1e-5, atol=1e-5)


def test_ragged_delayed_records_per_expert_amax(xwdy):
    x, w, dy = xwdy
    spec = PrecisionSpec(fp8="delayed", amax_history_len=4)
    state = record_delayed_keys(spec, lambda: project_ragged(x, w, SIZES, name="experts"))
    assert list(state) == ["000_experts"]
    assert state["000_experts"]["w"]["history"].shape == (4, E)
    assert state["000_experts"]["w"]["scale"].shape == (E,)

    def loss(x, w, st):
        with use_precision(spec, st):
            return jnp.sum(project_ragged(x, w, SIZES, name="experts") * dy)

    for _ in range(2):
        rec = jax.grad(loss, argnums=2)(x, w, state)
        state = update_delayed_state(state, rec)
    amax_w = jnp.max(jnp.abs(w), axis=(1, 2))
    entry = state["000_experts"]
    # TE's window: roll by -1, write slot 0, so the previous step's amax sits in the last slot
    np.testing.assert_allclose(entry["w"]["history"][jnp.array([0, -1])], jnp.stack([amax_w] * 2),
                               rtol=1e-6)  # fmt: skip
    assert float(jnp.max(jnp.abs(entry["w"]["history"][1:-1]))) == 0.0
    np.testing.assert_allclose(entry["w"]["scale"], 448.0 / amax_w, rtol=1e-6)
    np.testing.assert_allclose(entry["x"]["scale"], 448.0 / jnp.max(jnp.abs(x)), rtol=1e-6)
    np.testing.assert_allclose(entry["dy"]["scale"], 57344.0 / jnp.max(jnp.abs(dy)), rtol=1e-6)
    # with the carried scales equal to this step's, delayed = current
    with use_precision(spec, state):
        y_delayed = project_ragged(x, w, SIZES, name="experts")
    np.testing.assert_allclose(y_delayed, rg.fp8_ragged_current(x, w, SIZES), rtol=1e-6)


@pytest.mark.parametrize(
    "impl",
    ["dropless", *(pytest.param(i, marks=pytest.mark.slow) for i in ("blocked", "capacity"))],
)
def test_moe_layer_fp8_matches_bf16(impl):
    """The MoE layer (bf16 compute) with FP8 experts against the same layer in bf16: the
    router stays high precision, so the routing is identical and only the expert GEMMs differ."""
    cfg = MoEConfig(d_model=32, d_ff=48, n_experts=4, top_k=2, dtype="bfloat16", impl=impl,
                    capacity_factor=None if impl != "capacity" else 2.0)  # fmt: skip
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 32))
    graph, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(p, spec):
        with use_precision(spec):
            y = nnx.merge(graph, p, rest)(x).astype(jnp.float32)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, y0), g0 = fn(params, PrecisionSpec())
    (_, y8), g8 = fn(params, PrecisionSpec(fp8="current"))
    # bf16 itself is ~0.4% off; three chained E4M3 GEMMs (gate, up, down) ~5% each
    assert 0.01 < _rel(y8, y0) < 0.12
    for path in ("w_gate", "w_up", "w_down"):
        a, b = g8["groups"][0][path][...], g0["groups"][0][path][...]
        assert bool(jnp.all(jnp.isfinite(a)))
        assert 0.01 < _rel(a, b) < 0.2, path


# ---------------------------------------------------------------- every layer family

MODELS = {
    "cog": (("model.mixer=cog", "model.mixers.cog.block=4"), {"q", "k", "v", "o"}),
    "cla": (("model.mixer=cla",), {"q", "k", "v", "o"}),
    "clla": (("model.mixer=clla",), {"dkv", "uk", "uv", "q", "o"}),
    "dape2": (("model.mixer=dape2",), {"q", "k", "v", "o"}),
    "infini": (("model.mixer=infini", "model.mixers.infini.segment_len=4"),
               {"q", "k", "v", "o"}),
    "attn_moe": (("model.mixer=attn_moe",), {"q", "k", "v", "o"}),
    "lightning": (("model.mixer=lightning",), {"q", "k", "v", "u", "o"}),
    "cosformer2": (("model.mixer=cosformer2",),
                   {"q", "k", "v", "gate_down", "gate_up", "o"}),
    "hgrn2": (("model.mixer=hgrn2",), {"q", "f", "i", "o"}),
    "lcsm": (("model.mixer=lcsm",), {"q", "k", "v", "g", "o"}),
    "moe-dropless": (("model.ffn=moe", "model.ffns.moe.n_experts=4",
                      "model.ffns.moe.impl=dropless"),
                     {"expert_gate", "expert_up", "expert_down"}),
    "moe-capacity": (("model.ffn=moe", "model.ffns.moe.n_experts=4",
                      "model.ffns.moe.capacity_factor=2.0", "model.ffns.moe.impl=capacity"),
                     {"expert_gate", "expert_up", "expert_down"}),
}  # fmt: skip
SWIGLU = {"gate", "up", "down"}


def _model(overrides):
    base = [
        "model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=48", "model.vocab_size=64", "model.max_seq_len=32", "model.dtype=float32",
        "data.seq_len=16",
    ]  # fmt: skip
    return models.build(config.load("default", [*base, *overrides]).model, 0)


# By default one of each projection code path: `QKVO` (cog, cla, dape, infini), CLLA, attention
# MoE, the dropless experts; the rest are slow. (Delayed FP8 through a train step: below and
# test_fp8_training.py.)
FAST = {"cla", "clla", "attn_moe", "moe-dropless"}


@pytest.mark.parametrize(
    "name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in MODELS]
)
def test_layer_runs_in_fp8_and_exmy(name):
    overrides, mixer_names = MODELS[name]
    model = _model(overrides)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 64)
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, spec, fp8_state=None):
        with use_precision(spec, fp8_state):
            logits = nnx.merge(graph, p, rest)(tokens)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    # Delayed FP8 state: one entry per projection called, named after it.
    delayed = PrecisionSpec(fp8="delayed")
    state = record_delayed_keys(delayed, lambda: nnx.merge(graph, params, rest)(tokens))
    names = {k.split("_", 1)[1] for k in state}
    expected = mixer_names if name.startswith("moe") else mixer_names | SWIGLU
    if name.startswith("moe"):
        expected = expected | {"q", "k", "v", "o"}
    assert names == expected, names

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, y0), g0 = fn(params, PrecisionSpec())
    leaves0 = jax.tree.leaves(g0)
    specs = {
        "current": PrecisionSpec(fp8="current"),
        "exmy": PrecisionSpec(quantize=(parse_exmy("e4m3/16"),) * 6),
    }
    for label, spec in specs.items():
        (_, y), g = fn(params, spec)
        # ~5% relative noise per projection, a few projections deep: logits move but stay close
        assert 0.002 < _rel(y, y0) < 0.1, (label, _rel(y, y0))
        leaves = jax.tree.leaves(g)
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in leaves)
        # gradients flow through the quantized projections and stay near the exact ones
        total = _rel(jnp.concatenate([a.ravel() for a in leaves]),
                     jnp.concatenate([a.ravel() for a in leaves0]))  # fmt: skip
        assert 0.002 < total < 0.2, (label, total)


def test_moe_delayed_state_through_the_train_step():
    """A tiny MoE model trained two steps with delayed FP8: the experts' entries carry [L, E]
    histories and [E] scales, updated by the step from each expert's own amax."""
    from jaxllm.parallel.core.mesh import make_mesh
    from jaxllm.training.state import Trainer
    from jaxllm.training.step import make_train_step
    from tests.helpers import tiny

    cfg = tiny("model.n_layers=1", "model.ffn=moe", "model.ffns.moe.n_experts=4",
               "model.ffns.moe.impl=dropless", "precision.fp8=delayed",
               "precision.amax_history_len=4", "train.steps=2")  # fmt: skip
    trainer = Trainer.create(cfg, make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    state = trainer.init_state(0)
    step = make_train_step(trainer)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = (np.arange(b * (t + 1)).reshape(b, t + 1) * 7 % 251).astype(np.int32)
    batch = {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
    }  # fmt: skip
    for _ in range(2):
        # the weights this step runs (copied: the step donates the state)
        used = jax.tree.map(np.asarray, state["params"]["blocks"][0]["ffn"]["groups"][0])
        state, metrics = step(state, jax.device_put(batch, trainer.batch_sharding))
        assert np.isfinite(float(metrics["loss"]))
    experts = {k: v for k, v in state["fp8_state"].items() if "expert_" in k}
    assert len(experts) == 3  # gate, up, down
    for key, entry in experts.items():
        assert entry["w"]["history"].shape == (4, 4) and entry["w"]["scale"].shape == (4,)
        amax_E = np.max(np.abs(used["w_" + key.split("expert_")[1]]), axis=(1, 2))
        # slot 0: the last step's per-expert amax; the scale: 448 / the window's max
        np.testing.assert_allclose(entry["w"]["history"][0], amax_E, rtol=1e-6)
        window_max = jnp.max(entry["w"]["history"], axis=0)
        np.testing.assert_allclose(entry["w"]["scale"], 448.0 / window_max, rtol=1e-6)
