"""CAME against a float64 NumPy transcription of the official code and a came-pytorch fixture.

``came_fixture.npz`` holds parameter trajectories of ``came_pytorch.CAME`` 0.1.3 (torch 2.13 CPU,
float32); ``python tests/optim/test_came.py`` regenerates it where torch and came-pytorch are
installed. The tests themselves need neither.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm.optim.came import CameState, came, scale_by_came

FIXTURE = pathlib.Path(__file__).with_name("came_fixture.npz")


class CameNumpy:
    """Line-by-line float64 transcription of ``came_pytorch/CAME.py`` (0.1.3) for one param."""

    def __init__(self, lr, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip=1.0, wd=0.0):
        self.lr, self.betas, self.eps, self.clip, self.wd = lr, betas, eps, clip, wd
        self.state = {}

    @staticmethod
    def _rms(x):
        return np.linalg.norm(x.ravel()) / np.sqrt(x.size)

    @staticmethod
    def _approx_sq_grad(row, col):
        r_factor = (1.0 / np.sqrt(row / row.mean(axis=-1, keepdims=True)))[..., None]
        c_factor = (1.0 / np.sqrt(col))[..., None, :]
        return r_factor * c_factor

    def step(self, p, grad, lr=None):
        """Returns the new parameter; ``lr`` overrides the constant one (a schedule's value)."""
        lr = self.lr if lr is None else lr
        b1, b2, b3 = self.betas
        grad = np.asarray(grad, np.float64)
        p = np.asarray(p, np.float64)
        st = self.state
        factored = grad.ndim >= 2
        if not st:
            st["exp_avg"] = np.zeros_like(grad)
            if factored:
                st["row"] = np.zeros(grad.shape[:-1])
                st["col"] = np.zeros(grad.shape[:-2] + grad.shape[-1:])
                st["res_row"] = np.zeros(grad.shape[:-1])
                st["res_col"] = np.zeros(grad.shape[:-2] + grad.shape[-1:])
            else:
                st["exp_avg_sq"] = np.zeros_like(grad)
        update = grad**2 + self.eps[0]
        if factored:
            st["row"] = st["row"] * b2 + (1 - b2) * update.mean(axis=-1)
            st["col"] = st["col"] * b2 + (1 - b2) * update.mean(axis=-2)
            update = self._approx_sq_grad(st["row"], st["col"]) * grad
        else:
            st["exp_avg_sq"] = st["exp_avg_sq"] * b2 + (1 - b2) * update
            update = grad / np.sqrt(st["exp_avg_sq"])
        update = update / max(self._rms(update) / self.clip, 1.0)
        st["exp_avg"] = st["exp_avg"] * b1 + (1 - b1) * update
        res = (update - st["exp_avg"]) ** 2 + self.eps[1]
        if factored:
            st["res_row"] = st["res_row"] * b3 + (1 - b3) * res.mean(axis=-1)
            st["res_col"] = st["res_col"] * b3 + (1 - b3) * res.mean(axis=-2)
            update = self._approx_sq_grad(st["res_row"], st["res_col"]) * st["exp_avg"]
        else:
            update = st["exp_avg"].copy()
        if self.wd != 0:
            p = p - self.wd * lr * p
        return p - lr * update


def _grads(shape, steps, seed):
    """Gradients whose scale changes by 10^4 across steps, so RMS clipping fires on some."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 1) for _ in range(steps)]


def _run(tx, params, grads_seq):
    """Applies ``tx`` over the gradient sequence; returns every intermediate params tree."""
    state = tx.init(params)
    out = []
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(params)
    return out, state


def _max_rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


@pytest.mark.parametrize(
    "shape", [(), (7,), (6, 9), (1, 5), (3, 4, 5), (2, 3, 4, 6)], ids=lambda s: f"shape{s}"
)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_numpy_transcription(shape, weight_decay):
    steps, lr = 8, 1e-2
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(shape)
    grads = _grads(shape, steps, seed=2)
    traj, _ = _run(
        came(lr, weight_decay=weight_decay),
        jnp.asarray(p0, jnp.float32),
        [jnp.asarray(g, jnp.float32) for g in grads],
    )
    ref, p = CameNumpy(lr, wd=weight_decay), p0
    for t, g in enumerate(grads):
        p_new = ref.step(p, g)
        # The per-step change, not just the params, so a wrong update cannot hide under p.
        prev = p0 if t == 0 else np.asarray(traj[t - 1], np.float64)
        got_delta = np.asarray(traj[t], np.float64) - prev
        assert _max_rel_err(got_delta, p_new - p) < 2e-4, t
        np.testing.assert_allclose(np.asarray(traj[t]), p_new, rtol=1e-5, atol=1e-6)
        p = p_new


def test_first_step_by_hand():
    # Equal |g|: v = (1-b2)·g², so u = sign(g)/sqrt(1-b2) with RMS 31.6 > 1, clipped to sign(g);
    # m = (1-b1)·sign(g); a 1-D param's update is m.
    lr = 0.5
    g = jnp.array([2.0, -2.0, 2.0, 2.0])
    updates, _ = came(lr).update(g, came(lr).init(jnp.zeros(4)), jnp.zeros(4))
    np.testing.assert_allclose(updates, -lr * 0.1 * np.sign(g), rtol=1e-6)


@pytest.mark.skipif(not FIXTURE.exists(), reason="came_fixture.npz not generated")
def test_matches_came_pytorch_fixture():
    data = np.load(FIXTURE)
    lr, wd = float(data["lr"]), float(data["weight_decay"])
    names = [k[len("p0_") :] for k in data.files if k.startswith("p0_")]
    assert names
    params = {k: jnp.asarray(data[f"p0_{k}"]) for k in names}
    steps = data[f"grads_{names[0]}"].shape[0]
    grads = [{k: jnp.asarray(data[f"grads_{k}"][t]) for k in names} for t in range(steps)]
    traj, _ = _run(came(lr, weight_decay=wd), params, grads)
    for k in names:
        got = np.stack([np.asarray(t[k]) for t in traj])
        # float32 against float32: a few ulps of the O(1) parameters.
        np.testing.assert_allclose(got, data[f"traj_{k}"], rtol=0, atol=2e-6)


def test_bf16_gradients_keep_float32_statistics():
    shape, steps, lr = (6, 10), 6, 1e-2
    rng = np.random.default_rng(3)
    p0 = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    grads = [jnp.asarray(g, jnp.bfloat16) for g in _grads(shape, steps, seed=4)]
    traj, state = _run(came(lr, weight_decay=0.05), p0, grads)
    came_state = state[0]
    assert isinstance(came_state, CameState)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(came_state[1:]))
    assert traj[-1].dtype == jnp.float32
    ref, p = CameNumpy(lr, wd=0.05), np.asarray(p0, np.float64)
    for g in grads:
        p = ref.step(p, np.asarray(g.astype(jnp.float32)))
    np.testing.assert_allclose(np.asarray(traj[-1]), p, rtol=1e-5, atol=1e-6)


def test_bf16_params_get_bf16_updates():
    p = jnp.ones((4, 8), jnp.bfloat16)
    g = jnp.full((4, 8), 0.25, jnp.bfloat16)
    tx = came(1e-2)
    updates, state = tx.update(g, tx.init(p), p)
    assert updates.dtype == jnp.bfloat16
    assert state[0].mu.dtype == jnp.float32
    # Without params the update takes the gradient's dtype.
    updates, _ = tx.update(g.astype(jnp.float32), tx.init(p))
    assert updates.dtype == jnp.float32


def test_state_beside_momentum_is_linear_in_width():
    d = 512
    state = came(1e-3).init({"w": jnp.zeros((d, d)), "b": jnp.zeros((d,))})[0]
    assert state.mu["w"].size == d * d
    w_stats = sum(
        getattr(state, f)["w"].size for f in ("v_row", "v_col", "v", "res_row", "res_col")
    )
    # row + col for the second moment and for the instability, plus a one-element placeholder.
    assert w_stats == 4 * d + 1
    b_stats = sum(
        getattr(state, f)["b"].size for f in ("v_row", "v_col", "v", "res_row", "res_col")
    )
    assert b_stats == d + 4


def test_jit_matches_eager():
    rng = np.random.default_rng(5)
    params = {"w": jnp.asarray(rng.standard_normal((5, 6)), jnp.float32), "b": jnp.ones((6,))}
    grads = jax.tree.map(lambda x: 0.3 * x + 0.1, params)
    tx = came(3e-3, weight_decay=0.1)
    state = tx.init(params)
    eager = tx.update(grads, state, params)
    jitted = jax.jit(tx.update)(grads, state, params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_chain_with_clip_by_global_norm():
    rng = np.random.default_rng(6)
    shapes = {"w": (4, 6), "b": (6,)}
    p0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s) * 3.0 for k, s in shapes.items()} for _ in range(5)]
    tx = optax.chain(optax.clip_by_global_norm(0.5), came(1e-2, weight_decay=0.1))
    traj, _ = _run(
        tx,
        {k: jnp.asarray(v, jnp.float32) for k, v in p0.items()},
        [{k: jnp.asarray(v, jnp.float32) for k, v in g.items()} for g in grads],
    )
    refs = {k: CameNumpy(1e-2, wd=0.1) for k in shapes}
    p = dict(p0)
    for g in grads:
        norm = np.sqrt(sum(np.sum(v**2) for v in g.values()))
        scale = min(1.0, 0.5 / norm)
        p = {k: refs[k].step(p[k], g[k] * scale) for k in shapes}
    for k in shapes:
        np.testing.assert_allclose(np.asarray(traj[-1][k]), p[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["pytree", "callable"])
def test_weight_decay_mask(mask_kind):
    rng = np.random.default_rng(7)
    p0 = {"w": rng.standard_normal((4, 5)), "b": rng.standard_normal((5,))}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p0.items()} for _ in range(5)]
    mask_tree = {"w": True, "b": False}
    mask = mask_tree if mask_kind == "pytree" else (lambda params: {"w": True, "b": False})
    traj, _ = _run(
        came(1e-2, weight_decay=0.2, mask=mask),
        {k: jnp.asarray(v, jnp.float32) for k, v in p0.items()},
        [{k: jnp.asarray(v, jnp.float32) for k, v in g.items()} for g in grads],
    )
    refs = {"w": CameNumpy(1e-2, wd=0.2), "b": CameNumpy(1e-2, wd=0.0)}
    p = dict(p0)
    for g in grads:
        p = {k: refs[k].step(p[k], g[k]) for k in p0}
    for k in p0:
        np.testing.assert_allclose(np.asarray(traj[-1][k]), p[k], rtol=1e-5, atol=1e-6)


def test_schedule_uses_step_count_from_zero():
    schedule = optax.linear_schedule(1e-2, 1e-3, transition_steps=4)
    rng = np.random.default_rng(8)
    p0 = rng.standard_normal((3, 4))
    grads = _grads((3, 4), 6, seed=9)
    traj, _ = _run(
        came(schedule, weight_decay=0.1),
        jnp.asarray(p0, jnp.float32),
        [jnp.asarray(g, jnp.float32) for g in grads],
    )
    ref, p = CameNumpy(None, wd=0.1), p0
    for t, g in enumerate(grads):
        p = ref.step(p, g, lr=float(schedule(t)))
    np.testing.assert_allclose(np.asarray(traj[-1]), p, rtol=1e-5, atol=1e-6)


def test_scale_by_came_is_the_direction():
    # came = scale_by_came, then decay, then -lr: with wd = 0 the update is -lr times it.
    g = jnp.asarray(np.random.default_rng(10).standard_normal((3, 5)), jnp.float32)
    p = jnp.zeros((3, 5))
    direction, _ = scale_by_came().update(g, scale_by_came().init(p))
    updates, _ = came(0.25).update(g, came(0.25).init(p), p)
    np.testing.assert_allclose(updates, -0.25 * direction, rtol=1e-6)


def test_trains_an_nnx_model():
    from flax import nnx

    model = nnx.Linear(8, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, came(3e-2, weight_decay=1e-4), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = x @ jnp.arange(8.0)[:, None] / 8.0

    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(m)
        opt.update(m, grads)
        return loss

    first = float(step(model, optimizer))
    for _ in range(60):
        last = float(step(model, optimizer))
    assert last < 0.1 * first


def _write_fixture_with_torch():
    """Regenerates came_fixture.npz with came-pytorch (needs torch and came-pytorch==0.1.3)."""
    import torch
    from came_pytorch import CAME

    shapes = {"vec": (7,), "mat": (6, 9), "bmat": (3, 4, 5), "scalar": ()}
    steps, lr, wd = 10, 1e-2, 0.1
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = {
        k: np.stack([g.astype(np.float32) for g in _grads(s, steps, seed=i)])
        for i, (k, s) in enumerate(shapes.items())
    }
    params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    opt = CAME(list(params.values()), lr=lr, weight_decay=wd)
    traj = {k: [] for k in shapes}
    for t in range(steps):
        for k, p in params.items():
            p.grad = torch.tensor(grads[k][t])
        opt.step()
        for k, p in params.items():
            traj[k].append(p.detach().numpy().copy())
    arrays = {"lr": np.float64(lr), "weight_decay": np.float64(wd)}
    for k in shapes:
        arrays[f"p0_{k}"] = p0[k]
        arrays[f"grads_{k}"] = grads[k]
        arrays[f"traj_{k}"] = np.stack(traj[k])
    np.savez_compressed(FIXTURE, **arrays)


if __name__ == "__main__":
    _write_fixture_with_torch()
