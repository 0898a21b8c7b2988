"""CO2: the outer step against a NumPy transcription; τ = 1 equals synchronous data parallelism
on 8 devices; a CO2 run trains, checkpoints and resumes bit-exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError
from jaxllm.optim import co2
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.training.loop import train
from jaxllm.training.state import Trainer
from jaxllm.training.step import make_train_step
from tests.helpers import tiny


def _numpy_outer(theta, m, start, average, *, lr, beta, penalty, clip):
    """The outer step of CO2 as the official code writes it, with a clip that clips."""
    m = beta * m + (start - average) / penalty
    if clip is not None:
        m = np.minimum(np.maximum(m, -clip), clip)
    return theta - lr * m, m


@pytest.mark.parametrize("clip", [None, 0.05])
def test_outer_update_matches_numpy(clip):
    rng = np.random.default_rng(0)
    shapes = {"w": (4, 3), "b": (5,)}
    theta = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    m = {k: rng.normal(size=s).astype(np.float32) * 0.1 for k, s in shapes.items()}
    start = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    avg = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    kw = dict(lr=0.7, beta=0.5, penalty=2.0, clip=clip)
    for _ in range(3):  # several rounds: the momentum carries over
        delta = co2.pseudo_gradient(start, avg, kw["penalty"])
        new_theta, new_m = co2.outer_update(
            theta, m, delta, outer_lr=kw["lr"], outer_momentum=kw["beta"], clip=clip
        )
        for k in shapes:
            want_theta, want_m = _numpy_outer(theta[k], m[k], start[k], avg[k], **kw)
            # float32 arithmetic on both sides, a handful of operations: 1e-6 relative.
            np.testing.assert_allclose(new_m[k], want_m, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(new_theta[k], want_theta, rtol=1e-6, atol=1e-7)
        if clip is not None:
            assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(new_m)) <= np.float32(
                clip
            )
            # The clip is active here (the unclipped momentum exceeds it), so it really clips.
            raw = 0.5 * m["w"] + (start["w"] - avg["w"]) / 2.0
            assert np.max(np.abs(raw)) > clip
        theta, m = jax.tree.map(np.asarray, new_theta), jax.tree.map(np.asarray, new_m)


def test_outer_step_with_gap_penalty_by_hand():
    """The official ``gmb.mul_(β).sub_(p, 1/gap).add_(old, 1/gap); old -= lr·gmb``, by hand.

    θ_old = 1.0, replica mean 0.4, m = 0.2, β = 0.5, gap = 2, outer lr = 0.8:
    Δ = (1.0 − 0.4)/2 = 0.3; m = 0.5·0.2 + 0.3 = 0.4; θ = 1.0 − 0.8·0.4 = 0.68.
    With clip 0.25 the momentum is clamped to 0.25 and θ = 1.0 − 0.8·0.25 = 0.8.
    """
    delta = co2.pseudo_gradient({"x": jnp.float32(1.0)}, {"x": jnp.float32(0.4)}, 2.0)
    assert float(delta["x"]) == pytest.approx(0.3, rel=1e-6)
    kw = dict(outer_lr=0.8, outer_momentum=0.5)
    theta, m = co2.outer_update({"x": jnp.float32(1.0)}, {"x": jnp.float32(0.2)}, delta, **kw)
    assert (float(theta["x"]), float(m["x"])) == (pytest.approx(0.68), pytest.approx(0.4))
    theta, m = co2.outer_update(
        {"x": jnp.float32(1.0)}, {"x": jnp.float32(0.2)}, delta, clip=0.25, **kw
    )
    assert (float(theta["x"]), float(m["x"])) == (pytest.approx(0.8), pytest.approx(0.25))


@pytest.mark.parametrize("carry", [False, True])
def test_stale_rounds_with_gap_penalty_by_hand(carry):
    """Two replicas pulled to targets 2 and 4 by one SGD step of lr 0.5 (τ = 1), so a replica
    starting at s ends at (s + target)/2. Penalty 2, β = 0.5, outer lr 1, θ_0 = 0.

    Round 0: both start at 0 and end at [1, 2]; nothing is pending, so θ_1 = 0.
    Round 1, carry_local=False: both restart at θ_1 = 0 and end at [1, 2] again; the stale
    Δ = −mean([1, 2] − 0)/2 = −0.75, m = −0.75, θ_2 = 0.75.
    Round 1, carry_local=True: the replicas restart at θ_1 + [1, 2] = [1, 2] and end at
    [1.5, 3]; Δ and θ_2 = 0.75 are the same (round 0's progress, one round late).
    Round 2, reset: progress [1, 2] again, Δ = −0.75, m = 0.5·(−0.75) − 0.75 = −1.125,
    θ_3 = 0.75 + 1.125 = 1.875.
    flush after round 1, carry: round 1's progress [0.5, 1], Δ = −0.75/2 = −0.375,
    m = 0.5·(−0.75) − 0.375 = −0.75, θ = 0.75 + 0.75 = 1.5.
    """
    import optax

    class Cfg:
        outer_lr, outer_momentum, staleness_penalty, clip, stale = 1.0, 0.5, 2.0, None, True

    Cfg.carry_local = carry

    def local_grad(p, batch, norm):
        g = {"x": (p["x"] - batch["target"][0]) * batch["loss_mask"].sum() / norm}
        zero = jnp.zeros(())
        return g, {"sums": {"nll": zero, "z": zero, "aux": zero}, "layer": {}}

    tx = optax.sgd(0.5)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": {"x": jnp.zeros(())},
        "opt_state": jax.vmap(tx.init)({"x": jnp.zeros((2,))}),
        "co2": co2.init_co2_state({"x": jnp.zeros(())}, 2),
    }
    batches = {"target": jnp.array([[2.0, 4.0]]), "loss_mask": jnp.ones((1, 2, 1))}  # τ=1, B=2
    round_fn = jax.jit(lambda s: co2.co2_round(local_grad, tx, Cfg, s, batches, 2))
    thetas = []
    for _ in range(2):
        state, _ = round_fn(state)
        thetas.append(float(state["params"]["x"]))
    assert thetas == [0.0, pytest.approx(0.75)]
    if carry:
        np.testing.assert_allclose(state["co2"]["prev_local"]["x"], [1.5, 3.0])
        assert float(co2.flush(Cfg, state["params"], state["co2"])["x"]) == pytest.approx(1.5)
    else:
        np.testing.assert_allclose(state["co2"]["prev_local"]["x"], [1.0, 2.0])
        state, _ = round_fn(state)
        assert float(state["params"]["x"]) == pytest.approx(1.875)


def _numpy_rounds(theta0, local_results, *, lr, beta, penalty, clip, stale, carry=False):
    """Outer parameters after each round, given every round's replica results ``[R, ...]``
    as a function of the replicas' start points ``[R, ...]``."""
    theta, m = theta0, np.zeros_like(theta0)
    prev_start = prev_local = np.broadcast_to(theta0, (2, *theta0.shape))
    out = []
    for t in range(len(local_results)):
        begin = theta + (prev_local - prev_start if carry else 0.0)
        begin = np.broadcast_to(begin, (2, *theta0.shape))
        local = local_results[t](begin)
        if stale:
            start, avg = prev_start.mean(0), prev_local.mean(0)
        else:
            start, avg = theta, local.mean(0)
        prev_start, prev_local = begin, local
        theta, m = _numpy_outer(theta, m, start, avg, lr=lr, beta=beta, penalty=penalty, clip=clip)
        out.append(theta)
    return out, (m, prev_start, prev_local)


@pytest.mark.parametrize("stale,carry", [(True, False), (True, True), (False, False)])
def test_staleness_over_rounds_matches_numpy(stale, carry):
    """co2_round with a toy inner 'gradient' (each replica pulls towards its own target)."""

    class Cfg:
        outer_lr, outer_momentum, staleness_penalty, clip = 0.8, 0.5, 1.5, 0.3

    Cfg.stale, Cfg.carry_local = stale, carry
    targets = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]], np.float32)  # R = 2 replicas
    inner_lr, tau = 0.25, 3

    def local_grad(p, batch, norm):
        g = {"x": (p["x"] - batch["target"][0]) * batch["loss_mask"].sum() / norm}
        zero = jnp.zeros(())
        return g, {"sums": {"nll": zero, "z": zero, "aux": zero}, "layer": {}}

    import optax

    tx = optax.sgd(inner_lr)
    theta0 = np.zeros(3, np.float32)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": {"x": jnp.asarray(theta0)},
        "opt_state": jax.vmap(tx.init)({"x": jnp.zeros((2, 3))}),
        "co2": co2.init_co2_state({"x": jnp.asarray(theta0)}, 2),
    }
    batches = {  # [τ, B=2 (one row per replica), ...]
        "target": jnp.broadcast_to(jnp.asarray(targets)[None], (tau, 2, 3)),
        "loss_mask": jnp.ones((tau, 2, 1)),
    }
    round_fn = jax.jit(lambda s: co2.co2_round(local_grad, tx, Cfg, s, batches, 2))
    got = []
    for _ in range(4):
        state, _ = round_fn(state)
        got.append(np.asarray(state["params"]["x"]))

    def local_result(begin):  # τ SGD steps towards each replica's target, in closed form
        return targets + (begin - targets) * (1 - inner_lr) ** tau

    want, (m, prev_start, prev_local) = _numpy_rounds(
        theta0, [local_result] * 4, lr=0.8, beta=0.5, penalty=1.5, clip=0.3, stale=stale,
        carry=carry,
    )  # fmt: skip
    # float32 over 4 rounds of a few operations each: 1e-5 relative.
    np.testing.assert_allclose(np.stack(got), np.stack(want), rtol=1e-5, atol=1e-6)
    # flush: the pending stale average consumed by one more outer step (nothing pending if not
    # stale), same tolerance.
    flushed = np.asarray(co2.flush(Cfg, state["params"], state["co2"])["x"])
    want_flush = want[-1]
    if stale:
        want_flush, _ = _numpy_outer(want[-1], m, prev_start.mean(0), prev_local.mean(0),
                                     lr=0.8, beta=0.5, penalty=1.5, clip=0.3)  # fmt: skip
        assert not np.allclose(want_flush, want[-1])
    np.testing.assert_allclose(flushed, want_flush, rtol=1e-5, atol=1e-6)
    if stale:  # round 0's progress only lands at the end of round 1
        np.testing.assert_array_equal(got[0], theta0)
    if carry:  # the replicas of round 1 restart apart, each from its own round-0 progress
        begin1 = np.asarray(state["co2"]["prev_start"]["x"])  # round 3's starts here
        assert not np.allclose(begin1[0], begin1[1])


def _run_steps(cfg, n_steps, seed=0):
    mesh = make_mesh(cfg.parallel.mesh.resolve(jax.device_count()))
    trainer = Trainer.create(cfg, mesh)
    step = make_train_step(trainer)
    state = trainer.init_state(cfg.train.seed)
    rng = np.random.default_rng(seed)
    losses = []
    B, T = cfg.data.batch_size, cfg.data.seq_len
    for _ in range(n_steps):
        tokens = rng.integers(0, 256, size=(B, T + 1)).astype(np.int32)
        batch = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": np.ones((B, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            "loss_mask": np.ones((B, T), np.float32),
        }
        k = trainer.steps_per_call
        if trainer.round_sharding is not None:
            batch = {key: np.stack([v] * k) for key, v in batch.items()}
        batch = jax.device_put(batch, trainer.train_batch_sharding)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"])


@pytest.mark.slow
def test_tau_one_equals_synchronous_data_parallel():
    """8 replicas (data=8), τ = 1, β = 0, outer lr 1, no staleness: one step of synchronous
    data parallelism with the same (linear) inner optimizer."""
    common = ["optim.name=sgd", "optim.lr=0.5", "optim.b1=0.9", "optim.weight_decay=0.01",
              "optim.grad_clip=null", "optim.warmup_steps=0", "parallel.mesh.data=8",
              "train.steps=3"]  # fmt: skip
    sync_losses, sync_params = _run_steps(tiny(*common), 3)
    co2_losses, co2_params = _run_steps(
        tiny(*common, "optim.co2.enabled=true", "optim.co2.local_steps=1",
             "optim.co2.outer_momentum=0", "optim.co2.outer_lr=1", "optim.co2.stale=false"),
        3,
    )  # fmt: skip
    # Same sums in a different order (per replica, then the mean): float32 rounding only.
    np.testing.assert_allclose(co2_losses, sync_losses, rtol=1e-5)
    assert sync_losses[-1] < sync_losses[0]
    for a, b in zip(jax.tree.leaves(co2_params), jax.tree.leaves(sync_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_co2_trains_and_resumes_bit_exactly(tmp_path):
    common = ["train.steps=8", "logging.every=2", "train.eval_every=0", "checkpoint.every=4",
              "optim.co2.enabled=true", "optim.co2.local_steps=2", "optim.co2.clip=0.1",
              "parallel.mesh.data=4", "parallel.mesh.fsdp=2"]  # fmt: skip
    full = train(tiny(*common, f"train.run_dir={tmp_path / 'full'}"))
    first = train(tiny(*common, "train.stop_at=4", f"train.run_dir={tmp_path / 'split'}"))
    assert first["step"] == 4 and first["stopped"]
    split = train(tiny(*common, f"train.run_dir={tmp_path / 'split'}"))
    la = [(r["step"], r["loss"]) for r in full["records"] if "loss" in r]
    lb = [(r["step"], r["loss"]) for r in split["records"] if "loss" in r]
    assert [s for s, _ in la] == [2, 4, 6, 8] and la == lb
    assert la[-1][1] < la[0][1]
    assert full["val_loss"] == split["val_loss"]


@pytest.mark.parametrize("bad", ["train.steps=7", "train.microbatches=2", "train.stop_at=3"])
def test_co2_config_errors(bad):
    with pytest.raises(ConfigError, match="co2"):
        tiny("optim.co2.enabled=true", "optim.co2.local_steps=2", "train.steps=8", bad)
