"""Sequence parallelism on 8 CPU devices: forward and gradients of every mixer and impl equal
the single-device op, at 2, 4 and 8 sequence shards, with data parallelism on the rest.

Tolerance: float32 inputs; the sharded forms regroup the same sums (chunk boundaries move,
states are combined across shards), so values agree to float32 rounding over T ≤ 64 terms:
atol = rtol = 2e-5 for outputs, 1e-4 for gradients (sums over B·T·H more terms)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.ops.attention import attention_reference
from jaxllm.ops.gated_linear_attention import gated_linear_attention_reference
from jaxllm.ops.lightning_attention import lightning_attention_reference
from jaxllm.ops.lightning_attention_packed import lightning_attention_packed_reference
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.sequence import (
    attention_sp,
    gated_linear_attention_sp,
    lightning_attention_sp,
    zigzag_order,
)

B, T, H, G, K = 4, 32, 8, 2, 8
OUT_TOL, GRAD_TOL = 2e-5, 1e-4


def _cases(impls, fast):
    """Every (impl, shards) pair; those not in `fast` are slow (compiles dominate)."""
    return [
        pytest.param(i, n, marks=() if (i, n) in fast else pytest.mark.slow)
        for i in impls
        for n in (2, 4, 8)
    ]


def _mesh(seq: int):
    return make_mesh({"data": 8 // seq, "sequence": seq})


def _inputs(seed=0, heads_kv=H):
    r = np.random.default_rng(seed)
    q = r.normal(size=(B, T, H, K)).astype(np.float32) * 0.5
    k = r.normal(size=(B, T, heads_kv, K)).astype(np.float32) * 0.5
    v = r.normal(size=(B, T, heads_kv, K)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _check(f_sp, f_ref, args):
    """Loss = Σ o·w with a fixed random w: gradients w.r.t. every input."""
    w = jnp.asarray(np.random.default_rng(9).normal(size=f_ref(*args).shape), jnp.float32)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * w)
    o_sp = jax.jit(f_sp)(*args)
    np.testing.assert_allclose(o_sp, f_ref(*args), atol=OUT_TOL, rtol=OUT_TOL)
    argn = tuple(range(len(args)))
    g_sp = jax.jit(jax.grad(loss(f_sp), argnums=argn))(*args)
    g_ref = jax.grad(loss(f_ref), argnums=argn)(*args)
    for a, b in zip(g_sp, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=GRAD_TOL, rtol=GRAD_TOL)


@pytest.mark.parametrize("impl,seq", _cases(["lasp2", "lasp1"], {("lasp2", 4), ("lasp1", 2)}))
def test_lightning(impl, seq):
    q, k, v = _inputs()
    log_decay = -jnp.asarray([0.05, 0.2, 0.5, 1.5] * 2, jnp.float32)  # up to λ^T ≈ e^-48
    mesh = _mesh(seq)
    f_sp = lambda q, k, v, g: lightning_attention_sp(q, k, v, g, mesh=mesh, impl=impl, chunk_size=4)
    f_ref = lambda q, k, v, g: lightning_attention_reference(q, k, v, g)
    _check(f_sp, f_ref, (q, k, v, log_decay))


@pytest.mark.parametrize("impl,seq", _cases(["lasp2", "lasp1"], {("lasp2", 8), ("lasp1", 8)}))
def test_lightning_packed(impl, seq):
    """Documents that start exactly at, just after and far from shard boundaries (T/8 = 4),
    one spanning several shards, and padding (id 0) at the end."""
    q, k, v = _inputs(4)
    log_decay = -jnp.asarray([0.05, 0.2, 0.5, 1.5] * 2, jnp.float32)
    row = [1] * 4 + [2] * 5 + [3] * 15 + [4] * 5 + [0] * 3
    seg = jnp.asarray(np.stack([row, row[::-1], [7] * T, np.arange(T)]), jnp.int32)
    mesh = _mesh(seq)
    f_sp = lambda q, k, v, g: lightning_attention_sp(
        q, k, v, g, mesh=mesh, impl=impl, segment_ids_BT=seg, chunk_size=4
    )
    f_ref = lambda q, k, v, g: lightning_attention_packed_reference(q, k, v, g, seg)
    _check(f_sp, f_ref, (q, k, v, log_decay))


@pytest.mark.parametrize("impl,seq", _cases(["lasp2", "lasp1"], {("lasp2", 8), ("lasp1", 4)}))
def test_gated_linear_attention(impl, seq):
    q, k, v = _inputs(1)
    r = np.random.default_rng(2)
    log_gate = jnp.asarray(jax.nn.log_sigmoid(r.normal(size=(B, T, H, K)) + 2.0), jnp.float32)
    mesh = _mesh(seq)
    f_sp = lambda q, k, v, g: gated_linear_attention_sp(q, k, v, g, mesh=mesh, impl=impl)
    _check(f_sp, gated_linear_attention_reference, (q, k, v, log_gate))


@pytest.mark.parametrize("impl,seq", _cases(["lasp2", "lasp1"], {("lasp2", 4), ("lasp1", 8)}))
def test_gated_linear_attention_packed(impl, seq):
    """Packed rows as in `test_lightning_packed` (documents starting at, just after and far
    from the shard boundaries) against the single-device packed GLA reference."""
    q, k, v = _inputs(5)
    r = np.random.default_rng(6)
    log_gate = jnp.asarray(jax.nn.log_sigmoid(r.normal(size=(B, T, H, K)) + 2.0), jnp.float32)
    row = [1] * 4 + [2] * 5 + [3] * 15 + [4] * 5 + [0] * 3
    seg = jnp.asarray(np.stack([row, row[::-1], [7] * T, np.arange(T)]), jnp.int32)
    mesh = _mesh(seq)
    f_sp = lambda q, k, v, g: gated_linear_attention_sp(
        q, k, v, g, mesh=mesh, impl=impl, segment_ids_BT=seg, chunk_size=4
    )
    f_ref = lambda q, k, v, g: gated_linear_attention_reference(q, k, v, g, segment_ids_BT=seg)
    _check(f_sp, f_ref, (q, k, v, log_gate))


@pytest.mark.parametrize(
    "impl,seq", _cases(["allgather", "zigzag", "ulysses"], {("zigzag", 4), ("ulysses", 8)})
)
def test_softmax_packed_gqa(impl, seq):
    zigzag = impl == "zigzag"
    impl = "allgather" if zigzag else impl
    q, k, v = _inputs(3, heads_kv=G)
    # three packed documents per row, boundaries crossing the shard boundaries
    seg = jnp.asarray(np.repeat([[0] * 5 + [1] * 14 + [2] * 13], B, axis=0), jnp.int32)
    mesh = _mesh(seq)
    f_sp = lambda q, k, v: attention_sp(
        q, k, v, mesh=mesh, impl=impl, segment_ids_BT=seg, zigzag=zigzag
    )
    f_ref = lambda q, k, v: attention_reference(q, k, v, segment_ids_BT=seg)
    _check(f_sp, f_ref, (q, k, v))


def test_zigzag_order_balances_causal_work():
    order = zigzag_order(16, 4).reshape(4, 4)
    assert sorted(order.ravel().tolist()) == list(range(16))
    work = (order + 1).sum(axis=1)  # causal keys attended to per shard
    assert work.min() == work.max()


@pytest.mark.slow  # two tiny trainings: ~2 min on a loaded 2-core machine
def test_hybrid_trains_with_sequence_axis(tmp_path):
    """hybrid-tiny (lightning + softmax layers) on a mesh data=2 × fsdp=2 × sequence=2: the
    batch, positions and segment ids are split along T, and the losses match sequence=1
    (same batches; only the reduction order differs: rtol 1e-4)."""
    from jaxllm.training.loop import train
    from tests.helpers import tiny

    common = ["model.n_layers=2", "model.layer_pattern=[lightning,softmax]", "train.steps=3",
              "logging.every=1", "checkpoint.every=0", "train.eval_every=100"]  # fmt: skip
    runs = {}
    for seq in (1, 2):
        cfg = tiny(*common, f"parallel.mesh.sequence={seq}", "parallel.mesh.fsdp=2",
                   f"train.run_dir={tmp_path / str(seq)}", name="hybrid-tiny")  # fmt: skip
        runs[seq] = [r["loss"] for r in train(cfg)["records"] if "loss" in r]
    assert len(runs[2]) == 3
    np.testing.assert_allclose(runs[2], runs[1], rtol=1e-4)
