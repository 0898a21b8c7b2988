"""The train step's FP8-LM gradient all-reduce on 8 CPU devices: the reduced gradient against
the exact sum, μ's rule step by step, everything else the step computes against one
micro-batch per replica, loss curves against bfloat16, bit-exact resume, the layouts whose
model shard_maps nest in the per-replica one, and the runs that keep GSPMD's float32
reduction."""

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxllm import compile as aot
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import use_rules
from jaxllm.parallel.fp8_allreduce import (
    GROWTH_STEPS,
    MU_HIGH,
    MU_LOW,
    OVERFLOW_THRESHOLD,
    data_parallel_fp8,
)
from jaxllm.parallel.sequence import use_impl
from jaxllm.training import step as step_lib
from jaxllm.training.loop import train
from jaxllm.training.state import Model, Trainer, uses_fp8_allreduce
from tests.helpers import tiny
from tests.precision.test_fp8_training import _batches

DP8 = ("parallel.mesh.data=8",)
# 16 rows: a micro-batch of a replica holds whole rows for each fsdp shard (check_batch_layout)
DP2_FSDP2_TP2 = ("parallel.mesh.data=2", "parallel.mesh.fsdp=2", "parallel.mesh.tensor=2")
DP4_FSDP2_MICRO2 = (
    "parallel.mesh.data=4",
    "parallel.mesh.fsdp=2",
    "train.microbatches=2",
    "data.batch_size=16",
)


def _trainer(*overrides):
    cfg = tiny(*overrides)
    return Trainer.create(cfg, make_mesh(cfg.parallel.mesh.resolve(jax.device_count())))


@pytest.mark.parametrize(
    "layout",
    [
        # data8 (plain O1) also runs by default in the μ and wire tests below; micro-batches
        # accumulated before the FP8 reduce, with fsdp, only here
        pytest.param(DP8, marks=pytest.mark.slow),
        DP4_FSDP2_MICRO2,
        pytest.param(DP2_FSDP2_TP2, marks=pytest.mark.slow),
    ],
    ids=["data8", "data4-fsdp2-micro2", "data2-fsdp2-tensor2"],
)
def test_reduced_gradient_is_the_sum_within_the_e4m3_bound(layout):
    """No FP8 in the forward (the per-replica gradients are exact float32), so the only error
    is the all-reduce's. In units of one payload step u = N·amax/(448·μ), replica i sends
    q_i = E4M3(g_i/u), off by at most 2^-4·|g_i/u| + 2^-10 (half an E4M3 ulp: 3 mantissa
    bits; 2^-10 below the normals); the exact float32 sum T of the q_i, |T| ≤ 448 for μ ≤ 1
    (no saturation), is rounded to E4M3 once more. So, elementwise,
        |reduced − Σ g_i| ≤ (2^-3 + 2^-8)·Σ|g_i| + (1.0625·N + 1)·2^-10·u,
    plus float32 slack (1e-5·Σ|g_i|) for the replicas' own summation order. data × fsdp ×
    tensor: two split axes left in the per-replica map (`avoid_split_gathers`)."""
    _check_reduced_gradient(_trainer(*layout), mus=(0.5, 1.0))


def _check_reduced_gradient(trainer, mus=(1.0,)):
    """The step's FP8-reduced gradient against the float64 sum of each replica's gradient of
    its own rows, computed alone (no mesh rules: no shard_map of the model, plain ops), within
    the bound above; the token sums equal. Returns the traced program's jaxpr."""
    n = trainer.mesh.shape["data"]
    accumulate = step_lib._accumulator(trainer)
    params_sharding = trainer.state_shardings["params"]
    reduced = jax.jit(data_parallel_fp8(accumulate, trainer.mesh, params_sharding))
    state = trainer.init_state(0)
    params, fp8_state = state["params"], state.get("fp8_state")
    batch = next(_batches(1, b=trainer.cfg.data.batch_size, vocab=260, seed=3))
    rows = trainer.cfg.data.batch_size // n
    # each replica's gradient on its own rows (the batch is split over `data` first)
    per_replica = [
        jax.jit(accumulate)(
            params, fp8_state, {k: v[r * rows : (r + 1) * rows] for k, v in batch.items()}
        )
        for r in range(n)
    ]
    want = jax.tree.map(lambda *g: sum(np.asarray(x, np.float64) for x in g),
                        *[p[0] for p in per_replica])  # fmt: skip
    mass = jax.tree.map(lambda *g: sum(np.abs(np.asarray(x, np.float64)) for x in g),
                        *[p[0] for p in per_replica])  # fmt: skip
    amax = jax.tree.map(lambda *g: max(float(jnp.max(jnp.abs(x))) for x in g),
                        *[p[0] for p in per_replica])  # fmt: skip
    sharded = jax.device_put(batch, trainer.batch_sharding)
    jaxpr = None
    for mu in mus:
        with use_rules(trainer.mesh), use_impl(trainer.cfg.parallel.sequence_impl):
            traced = reduced.trace(params, fp8_state, sharded, jnp.float32(mu))
            got, sums, _, _, overflow = traced.lower().compile()(
                params, fp8_state, sharded, jnp.float32(mu)
            )
        jaxpr = traced.jaxpr
        assert float(overflow) == 0.0
        want_nll = sum(float(p[1]["nll"]) for p in per_replica)
        assert float(sums["nll"]) == pytest.approx(want_nll, rel=1e-5)
        errs, norms = [], []
        for g, w, a, m in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                              jax.tree.leaves(amax), jax.tree.leaves(mass)):  # fmt: skip
            u = n * a / (448.0 * mu)
            bound = (2**-3 + 2**-8) * m + (1.0625 * n + 1) * 2**-10 * u + 1e-5 * m
            err = np.abs(np.asarray(g, np.float64) - w)
            assert np.all(err <= bound), (mu, g.shape, float(np.max(err - bound)))
            errs.append(np.sum(err**2))
            norms.append(np.sum(w**2))
        rel = float(np.sqrt(sum(errs) / sum(norms)))
        # two E4M3 roundings of ~2-3% RMS each; 0 would mean no FP8 was involved
        assert 0.005 < rel < 0.08, (mu, rel)
    return jaxpr


# the model's own shard_maps, nested in the per-replica one over `data` (parallel.rules.map_mesh)
NESTED = {
    "expert": ("model.ffn=moe", "model.ffns.moe.n_experts=4", "model.ffns.moe.impl=dropless",
               "parallel.mesh.data=2", "parallel.mesh.expert=4", "parallel.mesh.fsdp=1"),
    "lasp2": ("model.mixer=lightning", "parallel.sequence_impl=lasp2", "parallel.mesh.data=2",
              "parallel.mesh.sequence=4", "parallel.mesh.fsdp=1"),
    "allgather": ("parallel.sequence_impl=allgather", "parallel.mesh.data=2",
                  "parallel.mesh.sequence=2", "parallel.mesh.fsdp=2"),
    "ulysses": ("parallel.sequence_impl=ulysses", "model.n_kv_heads=4", "parallel.mesh.data=2",
                "parallel.mesh.sequence=4", "parallel.mesh.fsdp=1"),
    "fp8-pallas": ("precision.fp8_impl=pallas", "parallel.mesh.data=2", "parallel.mesh.fsdp=4"),
    "lightning-pallas": ("model.mixer=lightning", "model.mixers.lightning.impl=pallas",
                         "parallel.mesh.data=2", "parallel.mesh.fsdp=4"),
}  # fmt: skip
# what runs inside the nested map: the all-to-all of the experts, the sequence exchanges, the
# kernels (interpreted on the CPU)
NESTED_OP = {"expert": "all_to_all", "lasp2": "all_gather", "allgather": "all_gather",
             "ulysses": "all_to_all", "fp8-pallas": "pallas_call",
             "lightning-pallas": "pallas_call"}  # fmt: skip


@pytest.mark.slow  # ~30 s each on two CPU cores
@pytest.mark.parametrize("case", list(NESTED))
def test_nested_shard_maps_reduce_in_fp8(case):
    """The layouts that used to fall back to GSPMD's float32 reduction: FP8 training
    (current scaling, one layer) on data = 2 × another axis reduces in FP8. The model's
    shard_map nests in the per-replica one, splitting a replica's rows (or tokens, or heads)
    over the other axis, and the FP8-reduced gradient is the sum of what each replica's rows
    give alone (plain ops, no mesh) within the all-reduce's E4M3 bound."""
    cfg = tiny("precision.fp8=current", "model.n_layers=1", *NESTED[case])
    mesh = make_mesh(cfg.parallel.mesh.resolve(jax.device_count()))
    assert uses_fp8_allreduce(cfg, mesh)
    if case == "expert":
        # no FP8 in the forward here: the experts' current scaling takes the amax of the rows
        # a device receives under expert parallelism, of all the replica's rows without it
        cfg = tiny("model.n_layers=1", *NESTED[case])
    trainer = Trainer.create(cfg, mesh)
    jaxpr = _check_reduced_gradient(trainer)
    # inside the per-replica map, besides the all-reduce's own map (its last equation that is
    # one): the model's, manual over other axes than `data`, with its op in it
    (outer,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    assert set(outer.params["newly_manual_axes"]) == {"data"}
    body = outer.params["jaxpr"]
    reduce = [e for e in body.eqns if e.primitive.name == "shard_map"][-1]
    nested = [e for e in _eqns(body) if e.primitive.name == "shard_map" and e is not reduce]
    assert nested and all("data" not in e.params["newly_manual_axes"] for e in nested)
    ops = {x.primitive.name for e in nested for x in _eqns(e.params["jaxpr"])}
    assert NESTED_OP[case] in ops, sorted(ops)


def _eqns(jaxpr):
    """Every equation of a jaxpr, those of the jaxprs in its equations' params included."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # a ClosedJaxpr's
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from _eqns(sub)


def test_mu_halves_after_an_overflow_step_and_grows_otherwise():
    """precision.fp8=current O1 on 8 replicas. Step 0 runs at μ = 2 with the same rows on every
    replica: their payloads agree, and at least each tensor's amax element sums to
    8 · E4M3(2 · 448 / 8) = 896 > 448, so ≥ 21 of 35,232 values (6e-4 > 0.001%) hit the max and
    μ drops to 1/2. Then different rows: below μ = 1 no sum can reach the max, and μ grows by
    4^(1/1000) a step. Checked against the rule in NumPy float32, step by step."""
    trainer = _trainer("precision.fp8=current", *DP8, "train.steps=5")
    assert trainer.fp8_allreduce
    step = step_lib.make_train_step(trainer)
    state = trainer.init_state(0)
    state["fp8_comm"]["mu"] = jax.device_put(jnp.float32(2.0), state["fp8_comm"]["mu"].sharding)
    same = next(_batches(1, vocab=260, seed=5))
    same = {k: np.repeat(v[:1], v.shape[0], axis=0) for k, v in same.items()}
    batches = [same, *_batches(4, vocab=260, seed=6)]
    mu_model, growth = np.float32(2.0), np.float32((MU_HIGH / MU_LOW) ** (1.0 / GROWTH_STEPS))
    overflows = []
    for batch in batches:
        state, m = step(state, jax.device_put(batch, trainer.batch_sharding))
        assert float(m["fp8_mu"]) == mu_model
        overflows.append(float(m["fp8_overflow"]))
        if overflows[-1] > OVERFLOW_THRESHOLD:
            mu_model = np.float32(MU_LOW)
        else:
            mu_model = np.minimum(mu_model * growth, np.float32(MU_HIGH))
    assert float(state["fp8_comm"]["mu"]) == mu_model
    assert overflows[0] > 21 / 35232 * 0.999
    assert overflows[1:] == [0.0] * 4
    # halved once, then grew four times (float32 rounding of the four products)
    assert float(mu_model) == pytest.approx(0.5 * 4 ** (4 / 1000), rel=1e-6)


def _first_step(trainer, batch):
    state, metrics = step_lib.make_train_step(trainer)(
        trainer.init_state(0), jax.device_put(batch, trainer.batch_sharding)
    )
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize(
    ("fp8", "layers"),
    [
        ("current", ("model.n_layers=1",)),
        pytest.param("delayed", ("model.n_layers=1",), marks=pytest.mark.slow),
        pytest.param(
            "delayed", ("model.n_layers=2", "model.scan_layers=true"), marks=pytest.mark.slow
        ),
    ],
    ids=["current", "delayed", "delayed-scanned"],
)
def test_a_replica_counts_as_a_micro_batch(fp8, layers):
    """What the step computes besides the gradient (loss, layer-sown aux losses and metrics,
    the MoE router bias's own update, the delayed-FP8 amax histories) is the single-device
    step's with one micro-batch per replica's rows: equal up to float32 rounding. A tiny MoE
    with load-balancing loss, router z-loss and the aux-loss-free bias, one row per replica;
    also with its layers scanned (stacked router biases and FP8 state)."""
    common = (*layers, "model.ffn=moe", "model.ffns.moe.n_experts=4",
              "model.ffns.moe.impl=dropless", "model.ffns.moe.z_loss=0.001",
              "model.ffns.moe.aux_free_rate=0.01", f"precision.fp8={fp8}")  # fmt: skip
    data_parallel = _trainer(*common, *DP8)
    assert data_parallel.fp8_allreduce
    one = jax.devices()[:1]
    micro = Trainer.create(
        tiny(*common, "train.microbatches=8"), make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, one)
    )
    batch = next(_batches(1, vocab=260, seed=7))
    state_dp, m_dp = _first_step(data_parallel, batch)
    state_mb, m_mb = _first_step(micro, batch)
    assert set(m_dp) == {*m_mb, "fp8_mu", "fp8_overflow"}
    assert {"aux_loss", "moe_lb_loss", "moe_router_z_loss", "moe_load_max"} <= set(m_mb)
    for key in set(m_mb) - {"grad_norm"}:
        np.testing.assert_allclose(m_dp[key], m_mb[key], rtol=1e-5, err_msg=key)
    # the norm is taken after the FP8 all-reduce here and before O1's FP8 cast there: by the
    # triangle inequality they differ by at most the all-reduce's error, ~4% RMS (bound test)
    np.testing.assert_allclose(m_dp["grad_norm"], m_mb["grad_norm"], rtol=0.05)
    scanned = "model.scan_layers=true" in layers
    bias = lambda s: s["params"]["scan" if scanned else "blocks"][0]["ffn"]["router_bias"]
    assert np.any(bias(state_mb) != 0)
    np.testing.assert_allclose(bias(state_dp), bias(state_mb), rtol=1e-5, atol=1e-9)
    if fp8 == "delayed":
        got, want = state_dp["fp8_state"], state_mb["fp8_state"]
        for path, a in jax.tree_util.tree_leaves_with_path(want):
            b = dict(jax.tree_util.tree_leaves_with_path(got))[path]
            np.testing.assert_allclose(b, a, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def bf16_curve():
    return _curve("precision.fp8=none", *DP8)


def _curve(*overrides, steps=12):
    # 16 rows for every layout, so that all curves see the same batches
    trainer = _trainer(
        "model.dtype=bfloat16", f"train.steps={steps}", *overrides, "data.batch_size=16"
    )
    step = step_lib.make_train_step(trainer)
    state = trainer.init_state(0)
    losses, mus = [], []
    for batch in _batches(steps, b=trainer.cfg.data.batch_size):
        state, m = step(state, jax.device_put(batch, trainer.batch_sharding))
        losses.append(float(m["loss"]))
        mus.append(float(m.get("fp8_mu", 0.0)))
    return np.array(losses), np.array(mus)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [("O1", *DP8), ("O2", *DP4_FSDP2_MICRO2)], ids=["O1-data8", "O2-data4-fsdp2-micro2"]
)
def test_fp8_allreduce_tracks_the_bf16_loss_curve(layout, bf16_curve):
    level, *mesh = layout
    losses, mus = _curve("precision.fp8=current", f"precision.fp8_level={level}", *mesh)
    ref = bf16_curve[0]
    assert ref[-1] < ref[0] - 0.5  # the curve being tracked does fall
    # 0.5% of the loss at every step: the FP8 GEMMs and the all-reduce's two E4M3 roundings
    # (~3% RMS per gradient tensor) are noise that moved this 12-step curve by < 0.05% when
    # written (O1: 0.03%, O2 with fsdp and micro-batches: 0.04%, the FP8 GEMMs alone: 0.02%);
    # the all-reduce's exactness is the bound test's job above (through Adam a gradient off by
    # a constant factor would not even show here).
    rel = np.abs(losses - ref) / ref
    assert rel.max() < 0.005, rel
    assert not np.array_equal(losses, ref)
    assert np.all(mus > 0)  # the FP8 all-reduce ran, every step


def _records(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["fp8_mu"]) for r in lines if "loss" in r]


def _state(run_dir, step):
    mngr = ocp.CheckpointManager(run_dir / "checkpoints")
    out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mngr.close()
    return out["state"]


@pytest.mark.slow  # ~110 s; the default suite resumes bit-exactly in test_train.py
def test_resume_is_bit_exact_with_the_fp8_allreduce(tmp_path):
    common = ["precision.fp8=current", *DP4_FSDP2_MICRO2, "train.steps=6", "logging.every=1",
              "train.eval_every=0", "checkpoint.every=2"]  # fmt: skip
    full, split = tmp_path / "full", tmp_path / "split"
    train(tiny(*common, f"train.run_dir={full}"))
    first = train(tiny(*common, "train.stop_at=3", f"train.run_dir={split}"))
    assert first["step"] == 3 and first["stopped"]
    train(tiny(*common, f"train.run_dir={split}"))
    assert _records(full) == _records(split)  # losses and the μ of every step
    a, b = _state(full, 6), _state(split, 6)
    assert set(a) == {"step", "params", "opt_state", "fp8_comm"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _collectives(hlo: str) -> list[tuple[str, str, int]]:
    """(op, element type, elements) of each collective in compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        m = re.search(
            r"=\s*(.+?)\s(all-reduce|all-gather|all-to-all|reduce-scatter)(-start)?\(", line
        )
        if m:
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
                out.append((m.group(2), dtype, math.prod(int(d) for d in dims.split(",") if d)))
    return out


@pytest.mark.parametrize(
    "target",
    [
        "cpu",
        pytest.param("v5e:2x2", marks=[pytest.mark.tpu_aot, pytest.mark.skipif(
            not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])")]),
    ],
)  # fmt: skip
def test_the_gradients_cross_the_wire_as_fp8_bytes(target):
    """In the compiled step (XLA:CPU on 8 devices, or ahead of time for a TPU v5e 2x2 from
    this host) the gradients leave as a uint8 all-to-all of at least one byte per parameter,
    and no floating-point collective is larger than the per-tensor scalars (amaxes, token
    sums): nothing of the gradient crosses in float32. On the CPU the summed slices come back
    as a uint8 all-gather; XLA:TPU turns some of those into all-reduces of the same bytes
    packed in uint32 (zero-padded, so they cost more than the all-gather would)."""
    cfg = tiny("precision.fp8=current", *DP8)
    if target == "cpu":
        trainer = Trainer.create(cfg, make_mesh(cfg.parallel.mesh.resolve(8)))
        keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
        batch = {
            k: jax.ShapeDtypeStruct(
                (8, 32), jnp.float32 if k == "loss_mask" else jnp.int32,
                sharding=trainer.batch_sharding,
            )
            for k in keys
        }  # fmt: skip
        lowered = step_lib.make_train_step(trainer).lower(trainer.abstract_state(), batch)
    else:
        cfg = tiny("precision.fp8=current")  # data = the 4 chips
        lowered, mesh = aot.lower_train_step(cfg, aot.parse_topology(target))
        assert dict(mesh.shape)["data"] == 4
    n_params = 35232
    ops = _collectives(lowered.compile().as_text())
    u8 = lambda op: sum(n for o, t, n in ops if o == op and t == "u8")
    assert u8("all-to-all") >= n_params
    if target == "cpu":
        assert u8("all-gather") >= n_params
    floats = [n for _, t, n in ops if t.startswith(("f", "bf"))]
    assert max(floats) < 200  # 21 tensors' amaxes, a few token sums


@pytest.mark.tpu_aot
@pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])")
@pytest.mark.parametrize(
    "nest",
    [
        ("model.ffn=moe", "model.ffns.moe.n_experts=4", "model.ffns.moe.impl=dropless",
         "parallel.mesh.expert=2"),
        ("model.mixer=lightning", "parallel.mesh.sequence=2"),
        ("parallel.sequence_impl=ulysses", "parallel.mesh.sequence=2"),
    ],
    ids=["expert", "lasp2", "ulysses"],
)  # fmt: skip
def test_nested_shard_maps_compile_for_tpu(nest):
    """The expert all-to-all (ragged on TPU) and the sequence exchanges nested in the
    per-replica map, compiled for a v5e 2x2 (data 2 × expert / sequence 2), with the
    gradients crossing as FP8 bytes."""
    cfg = tiny("precision.fp8=current", "parallel.mesh.data=2", "parallel.mesh.fsdp=1", *nest)
    lowered, mesh = aot.lower_train_step(cfg, aot.parse_topology("v5e:2x2"))
    assert uses_fp8_allreduce(cfg, mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(Model.create(cfg).abstract_params))
    ops = _collectives(lowered.compile().as_text())
    # a device's block of each gradient tensor crosses in u8 (the experts' are split in two)
    assert sum(n for o, t, n in ops if o == "all-to-all" and t == "u8") >= n_params // 2


@pytest.mark.parametrize(
    ("overrides", "used"),
    [
        (("precision.fp8=current", *DP8), True),
        (("precision.fp8=delayed", "parallel.mesh.data=2", "parallel.mesh.fsdp=2",
          "parallel.mesh.tensor=2"), True),
        (("precision.fp8=none", *DP8), False),
        (("precision.fp8=current", "parallel.mesh.data=1", "parallel.mesh.fsdp=8"), False),
        (("precision.fp8=current", "precision.fp8_impl=pallas", *DP8), True),
        (("precision.fp8=current", "parallel.mesh.data=4", "parallel.mesh.sequence=2"), True),
        (("precision.fp8=current", "model.ffn=moe", "model.ffns.moe.n_experts=4",
          "parallel.mesh.data=2", "parallel.mesh.expert=4", "parallel.mesh.fsdp=1"), True),
        (("precision.fp8=current", "optim.co2.enabled=true", "optim.co2.local_steps=2",
          "train.steps=4", *DP8), False),
    ],
)  # fmt: skip
def test_which_runs_reduce_in_fp8(overrides, used):
    cfg = tiny(*overrides)
    mesh = make_mesh(cfg.parallel.mesh.resolve(jax.device_count()))
    assert uses_fp8_allreduce(cfg, mesh) == used
    trainer = Trainer.create(cfg, mesh)
    assert trainer.fp8_allreduce == used
    assert ("fp8_comm" in trainer.abstract_state()) == used
