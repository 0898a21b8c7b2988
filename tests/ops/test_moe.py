"""MoE routing and expert execution: every path against the dense reference (outputs and
gradients), capacity and recycle routing against a NumPy transcription, routers against
NumPy oracles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops import moe_routing as R
from jaxllm.ops.moe import (
    experts_blocked,
    experts_capacity,
    experts_dropless,
    experts_reference,
)

# float32 throughout; the fast paths reorder sums of products, errors relative to the largest
# entry of the reference.
REL = 2e-5


def _close(a, b, rel=REL):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= rel * max(np.max(np.abs(b)), 1e-30), np.max(np.abs(a - b))


def _groups(key, d, sizes):
    """sizes: [(n_experts, width)] → expert groups."""
    out = []
    for i, (n, f) in enumerate(sizes):
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, i), 3)
        out.append(
            (
                jax.random.normal(k1, (n, d, f)) / np.sqrt(d),
                jax.random.normal(k2, (n, d, f)) / np.sqrt(d),
                jax.random.normal(k3, (n, f, d)) / np.sqrt(f),
            )
        )
    return out


def _routing(key, t, e, k, kind="softmax"):
    logits = 2.0 * jax.random.normal(key, (t, e))
    return R.route(logits, kind=kind, top_k=k, top_p=0.5)


_CAP = jax.jit(R.apply_capacity, static_argnames=("n_experts", "capacity", "policy"))

SIZES = {
    "homogeneous": [(8, 24)],
    "hmoe": [(2, 8), (3, 16), (3, 40)],
}


@pytest.mark.parametrize(
    ("kind", "sizes"),
    [("softmax", "homogeneous"), ("top_p", "hmoe"),
     pytest.param("softmax", "hmoe", marks=pytest.mark.slow),
     pytest.param("top_p", "homogeneous", marks=pytest.mark.slow)],
    ids=["softmax-homogeneous", "top_p-hmoe", "softmax-hmoe", "top_p-homogeneous"],
)  # fmt: skip
def test_dropless_matches_reference(kind, sizes):
    t, d = 37, 16  # odd token count
    key = jax.random.key(0)
    groups = _groups(key, d, SIZES[sizes])
    routing, _ = _routing(jax.random.key(1), t, 8, 3, kind)
    x = jax.random.normal(jax.random.key(2), (t, d))
    _close(jax.jit(experts_dropless)(x, routing, groups), experts_reference(x, routing, groups))

    def loss(fn, x, w, groups):
        r = routing._replace(weights_TK=w)
        return jnp.sum(jnp.sin(fn(x, r, groups)))

    args = (x, routing.weights_TK, groups)
    g_ref = jax.jit(jax.grad(lambda *a: loss(experts_reference, *a), argnums=(0, 1, 2)))(*args)
    blocked = functools.partial(experts_blocked, block=4)  # blocks of 4 rows: padding happens
    _close(jax.jit(blocked)(x, routing, groups), experts_reference(x, routing, groups))
    for fast in (experts_dropless, blocked):
        g_fast = jax.jit(jax.grad(lambda *a, f=fast: loss(f, *a), argnums=(0, 1, 2)))(*args)
        for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
            _close(a, b)


@pytest.mark.parametrize("sizes", list(SIZES), ids=str)
@pytest.mark.parametrize("policy", ["residual", "recycle"])
def test_capacity_matches_reference_on_kept_choices(sizes, policy):
    t, d, e, k = 40, 16, 8, 2
    groups = _groups(jax.random.key(0), d, SIZES[sizes])
    routing, scores = _routing(jax.random.key(1), t, e, k)
    cap = R.capacity_for(t, k, e, 1.0)
    kept, slot, stats = _CAP(
        routing, scores, n_experts=e, capacity=cap, policy=policy, key=jax.random.key(3)
    )
    assert float(stats.dropped) + float(stats.recycled) > 0  # the test exercises drops
    x = jax.random.normal(jax.random.key(2), (t, d))
    y = jax.jit(experts_capacity, static_argnums=4)(x, kept, slot, groups, cap)
    _close(y, jax.jit(experts_reference)(x, kept, groups))
    _close(jax.jit(experts_dropless)(x, kept, groups), y)


def test_capacity_without_drops_equals_dropless():
    t, d, e, k = 32, 16, 8, 2
    groups = _groups(jax.random.key(0), d, SIZES["homogeneous"])
    routing, scores = _routing(jax.random.key(1), t, e, k)
    kept, slot, stats = _CAP(routing, scores, n_experts=e, capacity=t, policy="residual")
    assert float(stats.dropped) == 0
    x = jax.random.normal(jax.random.key(2), (t, d))
    y = jax.jit(experts_capacity, static_argnums=4)(x, kept, slot, groups, t)
    _close(y, jax.jit(experts_dropless)(x, routing, groups))


def _capacity_numpy(experts, valid, c, e):
    """Top-1-first: choice (t, j) ranks by (j, t); keep the first c choices of each expert."""
    t, k = experts.shape
    keep = np.zeros((t, k), bool)
    pos = np.full((t, k), -1)
    fill = np.zeros(e, int)
    for j in range(k):
        for i in range(t):
            if valid[i, j]:
                ex = experts[i, j]
                if fill[ex] < c:
                    keep[i, j], pos[i, j] = True, fill[ex]
                fill[ex] += 1
    return keep, pos


def test_capacity_priority_is_top1_first():
    t, e, k, c = 30, 4, 2, 6
    routing, scores = _routing(jax.random.key(5), t, e, k)
    kept, slot, stats = _CAP(routing, scores, n_experts=e, capacity=c)
    keep, pos = _capacity_numpy(np.asarray(routing.experts_TK), np.asarray(routing.valid_TK), c, e)
    np.testing.assert_array_equal(np.asarray(kept.valid_TK), keep)
    want_slot = np.where(keep, np.asarray(routing.experts_TK) * c + pos, e * c)
    np.testing.assert_array_equal(np.asarray(slot), want_slot)
    np.testing.assert_allclose(float(stats.dropped), 1 - keep.sum() / (t * k), rtol=1e-6)


def test_recycle_fills_free_slots_with_new_expert_scores():
    t, e, k, c = 24, 4, 1, 7  # 28 slots for 24 copies: every dropped copy finds room
    logits = jnp.zeros((t, e)).at[:, 0].set(3.0) + 0.1 * jax.random.normal(
        jax.random.key(0), (t, e)
    )
    routing, scores = R.route(logits, kind="softmax", top_k=k, renormalize=False)
    kept, slot, stats = _CAP(
        routing, scores, n_experts=e, capacity=c, policy="recycle", key=jax.random.key(1)
    )
    assert float(stats.dropped) == 0 and float(stats.recycled) == pytest.approx((t - c) / t)
    s = np.asarray(slot)
    assert len(np.unique(s)) == t and s.max() < e * c  # every copy has its own real slot
    ex = np.asarray(kept.experts_TK)
    np.testing.assert_array_equal(s // c, ex)
    assert np.all(np.bincount(ex.ravel(), minlength=e) <= c)
    moved = ex[:, 0] != np.asarray(routing.experts_TK)[:, 0]
    assert moved.sum() == t - c
    want_w = np.take_along_axis(np.asarray(scores), ex, axis=1)
    np.testing.assert_allclose(np.asarray(kept.weights_TK), want_w, rtol=1e-6)


def test_routers_against_numpy():
    t, e = 20, 6
    logits = np.asarray(jax.random.normal(jax.random.key(0), (t, e)), np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    order = np.argsort(-p, axis=-1)
    # softmax top-2 renormalized, and Hunyuan's unnormalized top-1
    r, _ = R.route(jnp.asarray(logits), kind="softmax", top_k=2)
    w = np.take_along_axis(p, order[:, :2], -1)
    np.testing.assert_array_equal(np.asarray(r.experts_TK), order[:, :2])
    np.testing.assert_allclose(np.asarray(r.weights_TK), w / w.sum(-1, keepdims=True), rtol=1e-5)
    r, _ = R.route(jnp.asarray(logits), kind="softmax", top_k=1, renormalize=False)
    np.testing.assert_allclose(np.asarray(r.weights_TK)[:, 0], p.max(-1), rtol=1e-5)
    # top-p: keep through the first expert whose cumulative mass crosses the threshold
    r, _ = R.route(jnp.asarray(logits), kind="top_p", top_k=e, top_p=0.5)
    ps = np.take_along_axis(p, order, -1)
    n_keep = 1 + np.sum(np.cumsum(ps, -1)[:, :-1] < 0.5, axis=-1)
    np.testing.assert_array_equal(np.asarray(r.valid_TK).sum(-1), n_keep)
    want = np.where(np.asarray(r.valid_TK), ps, 0)
    np.testing.assert_allclose(np.asarray(r.weights_TK), want, rtol=1e-5)
    # sigmoid with a selection bias: the bias picks, the unbiased scores weigh
    bias = jnp.asarray([0, 0, 0, 0, 0, 10.0])
    r, _ = R.route(jnp.asarray(logits), kind="sigmoid", top_k=2, bias_E=bias)
    assert np.all(np.asarray(r.experts_TK)[:, 0] == 5)
    s = 1 / (1 + np.exp(-logits))
    w = np.take_along_axis(s, np.asarray(r.experts_TK), -1)
    np.testing.assert_allclose(np.asarray(r.weights_TK), w / w.sum(-1, keepdims=True), rtol=1e-5)


def test_hash_routing_is_fixed_and_stays_in_domain_group():
    tokens = jnp.arange(4000) % 300
    r = R.hash_route(tokens, n_experts=16, n_domains=4, domain=2, seed=7)
    ex = np.asarray(r.experts_TK)[:, 0]
    assert ex.min() >= 8 and ex.max() < 12
    assert len(np.unique(ex)) == 4  # the group is used...
    np.testing.assert_array_equal(ex[:300], ex[300:600])  # ...by token id, the same each time
    counts = np.bincount(ex - 8, minlength=4)
    assert counts.min() > 0.15 * len(ex)  # roughly uniform over the group


def test_balancing_losses():
    t, e = 64, 4
    # Perfectly balanced: uniform scores, each expert gets t/e tokens → loss 1.
    experts = jnp.tile(jnp.arange(e), t // e)[:, None]
    r = R.Routing(experts, jnp.ones((t, 1)), jnp.ones((t, 1), bool))
    assert float(R.load_balancing_loss(r, jnp.full((t, e), 1 / e))) == pytest.approx(1.0)
    # All on expert 0 with all its mass: loss E.
    r0 = R.Routing(jnp.zeros((t, 1), jnp.int32), jnp.ones((t, 1)), jnp.ones((t, 1), bool))
    p0 = jnp.zeros((t, e)).at[:, 0].set(1.0)
    assert float(R.load_balancing_loss(r0, p0)) == pytest.approx(e)
    # HMoE penalty: the same routing costs more on a larger expert.
    small = R.load_balancing_loss(r0, p0, jnp.asarray([0.5, 1, 1, 1.5]))
    assert float(small) == pytest.approx(e * 0.5)
    logits = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
    lse = np.log(np.exp([1.0, 2, 3, 4]).sum())
    assert float(R.router_z_loss(logits)) == pytest.approx(lse**2, rel=1e-6)
    delta = R.aux_free_bias_update(jnp.asarray([10.0, 0, 0, 2]), 0.1)
    np.testing.assert_allclose(np.asarray(delta), [-0.15, 0.05, 0.05, 0.05], atol=1e-7)
