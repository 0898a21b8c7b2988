"""HGRN2 and cosFormer2 layers on 8 CPU devices with a `sequence` mesh axis: traced under
`use_rules` / `use_impl` they run LASP-2 or LASP-1 (`jaxllm.parallel.sequence`), and their
output and gradients (every parameter and the input) equal the single-device layer's, at 2, 4
and 8 sequence shards with data parallelism on the rest, on packed rows whose documents start
at, just after and far from the shard boundaries (T/8 = 4 tokens per shard).

Tolerance as tests/parallel/test_sequence.py: float32, the same sums regrouped across shards
(2e-5 on outputs, 1e-4 on gradients). Packed resets are exact both inside a shard and across
shards."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.layers.hgrn2 import HGRN2, HGRN2Config
from jaxllm.layers.lightning import CosFormer2, CosFormer2Config
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import use_rules
from jaxllm.parallel.sequence import use_impl

B, T, D = 4, 32, 32
OUT_TOL, GRAD_TOL = 2e-5, 1e-4
DIMS = dict(d_model=D, n_heads=4, n_kv_heads=4, head_dim=8, d_ff=32, dtype="float32")
LAYERS = {"hgrn2": (HGRN2, HGRN2Config), "cosformer2": (CosFormer2, CosFormer2Config)}
FAST = {("hgrn2", "lasp2", 4), ("hgrn2", "lasp1", 8), ("cosformer2", "lasp2", 8),
        ("cosformer2", "lasp1", 2)}  # fmt: skip


def _cases():
    return [
        pytest.param(name, impl, seq, marks=() if (name, impl, seq) in FAST else pytest.mark.slow)
        for name in LAYERS
        for impl in ("lasp2", "lasp1")
        for seq in (2, 4, 8)
    ]


def _inputs():
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=(B, T, D)), jnp.float32)
    row = [1] * 4 + [2] * 5 + [3] * 15 + [4] * 5 + [0] * 3
    seg = np.stack([row, row[::-1], [7] * T, np.arange(T)]).astype(np.int32)
    # positions restart at each document, as the packed data pipeline gives them
    starts = np.concatenate([np.ones((B, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(starts, np.arange(T), 0), axis=1)
    pos = np.arange(T) - first
    return x, jnp.asarray(pos, jnp.int32), jnp.asarray(seg)


def _run(layer, x, pos, seg, mesh=None, impl="auto"):
    """(output, gradients w.r.t. (parameters, x)) of Σ y·w, traced on `mesh` if given, where
    the layer must run the LASP collective (all-gather for lasp2, ppermute for lasp1)."""
    graphdef, params = nnx.split(layer)
    w = jnp.asarray(np.random.default_rng(9).normal(size=(B, T, D)), jnp.float32)
    carry = getattr(layer, "uses_carry", False)

    def f(params, x):
        kw = {"carry": {}} if carry else {}
        y, _ = nnx.merge(graphdef, params)(x, positions_BT=pos, segment_ids_BT=seg, **kw)
        return y

    loss = lambda params, x: jnp.sum(f(params, x) * w)
    with contextlib.ExitStack() as ctx:
        if mesh is not None:
            ctx.enter_context(use_rules(mesh))
            ctx.enter_context(use_impl(impl))
            collective = {"lasp2": "all_gather", "lasp1": "ppermute"}[impl]
            assert collective in str(jax.make_jaxpr(f)(params, x))
        return jax.jit(f)(params, x), jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("name,impl,seq", _cases())
def test_layer_sequence_parallel_matches_single_device(name, impl, seq):
    cls, cfg_cls = LAYERS[name]
    layer = cls(cfg_cls(**DIMS, layer_index=1, n_layers=2, chunk_size=4), rngs=nnx.Rngs(0))
    x, pos, seg = _inputs()
    y_ref, g_ref = _run(layer, x, pos, seg)
    y_sp, g_sp = _run(layer, x, pos, seg, make_mesh({"data": 8 // seq, "sequence": seq}), impl)
    np.testing.assert_allclose(y_sp, y_ref, atol=OUT_TOL, rtol=OUT_TOL)
    flat_sp, flat_ref = jax.tree.leaves(g_sp), jax.tree.leaves(g_ref)
    assert len(flat_sp) == len(flat_ref) > 2
    for a, b in zip(flat_sp, flat_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=GRAD_TOL, rtol=GRAD_TOL)
