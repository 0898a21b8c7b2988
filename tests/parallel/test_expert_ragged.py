"""The ragged expert-parallel exchange (`a2a="ragged"`, `lax.ragged_all_to_all`).

XLA:CPU has no `ragged-all-to-all` (jax 0.10.2: "HLO opcode `ragged-all-to-all` is not
supported by XLA:CPU ThunkEmitter"), so on CPU `a2a="auto"` takes the padded all_to_all, and the
ragged path's offset / size bookkeeping is checked here against an emulation of the op built
from all_gather (the op's documented semantics). On GPU/TPU the real op runs.
"""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxllm.layers.moe import MoE, MoEConfig
from jaxllm.parallel.core.rules import use_rules
from tests.parallel.test_expert import _close, _mesh, _run


def _ragged_all_to_all_emulated(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`lax.ragged_all_to_all` from all_gather: source i's rows
    operand_i[input_offsets_i[me] + r], r < send_sizes_i[me], land at
    output[output_offsets_i[me] + r]; a `recv_sizes` that disagrees with what is sent writes
    nothing (so a bookkeeping error shows in the result)."""
    me = jax.lax.axis_index(axis_name)
    src_NMD = jax.lax.all_gather(operand, axis_name)
    in_off, size, out_off = (jax.lax.all_gather(a, axis_name)[:, me]
                             for a in (input_offsets, send_sizes, output_offsets))  # fmt: skip
    m = operand.shape[0]
    r = jnp.arange(m)
    rows = src_NMD[jnp.arange(src_NMD.shape[0])[:, None], jnp.clip(in_off[:, None] + r, 0, m - 1)]
    ok = (r < size[:, None]) & (size == recv_sizes)[:, None]
    dest = jnp.where(ok, out_off[:, None] + r, output.shape[0])
    return output.at[dest.reshape(-1)].set(rows.reshape(-1, *operand.shape[1:]), mode="drop")


@pytest.fixture
def ragged_op(monkeypatch):
    if jax.default_backend() == "cpu":
        monkeypatch.setattr(jax.lax, "ragged_all_to_all", _ragged_all_to_all_emulated)


@pytest.mark.parametrize(
    "case,layout",
    [("dropless", {"expert": 8}), ("capacity_no_drop", {"data": 2, "expert": 4})],
    ids=["dropless-expert8", "capacity_no_drop-data2-expert4"],
)
def test_ragged_exchange_equals_single_device(ragged_op, case, layout):
    kw = {"top_k": 2, "n_shared": 1, "a2a": "ragged"}
    if case == "capacity_no_drop":
        kw |= {"capacity_factor": 8.0}
    cfg = MoEConfig(d_model=16, d_ff=24, n_experts=16, dtype="float32", **kw)
    layer = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 6, 16))
    y1, g1, _ = _run(layer, x)
    y8, g8, _ = _run(layer, x, _mesh(layout))
    _close(y8, y1)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        _close(a, b)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU fallback")
def test_cpu_takes_the_padded_all_to_all():
    cfg = MoEConfig(d_model=16, d_ff=24, n_experts=8, top_k=2, dtype="float32")
    graphdef, state = nnx.split(MoE(cfg, rngs=nnx.Rngs(0)))
    x = jnp.zeros((8, 6, 16))
    with use_rules(_mesh({"expert": 8})):
        hlo = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).as_text()
    assert "all_to_all" in hlo and "ragged_all_to_all" not in hlo
