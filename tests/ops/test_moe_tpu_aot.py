"""Ahead-of-time TPU compile of the dropless MoE experts (marker `tpu_aot`, needs libtpu): on
v5e the expert GEMMs lower to megablox's grouped kernels (`gmm` for the products and their row
gradients, `tgmm` for the weight gradients) and cost the routed FLOPs. XLA's own lowering of
`lax.ragged_dot` groups the first two but does the weight gradient, grouped over the contracted
rows, as a masked product over every expert."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxllm import compile as aot
from jaxllm.ops import moe as M
from jaxllm.ops.moe_routing import Routing
from jaxllm.parallel import expert as ep
from jaxllm.parallel.core.rules import use_rules
from jaxllm.precision.grouped_matmul import grouped_matmul

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])"),
]


@functools.cache
def _v5e_chip():
    device = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices[0]
    return jax.sharding.SingleDeviceSharding(device)


def _spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=_v5e_chip())


def _compile(fn, *args):
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"], compiled.as_text()


def _kernels(hlo, name):
    return re.findall(rf"%{name}(?:\.\d+)? = .*custom_call_target=\"tpu_custom_call\"", hlo)


def test_dropless_experts_lower_to_megablox_at_routed_flops():
    t, d, f, e, k = 2048, 512, 1024, 8, 2

    def loss(ws, x, experts, weights):
        routing = Routing(experts, weights, jnp.ones(experts.shape, bool))
        y = M.moe_experts(x, routing, [ws], impl="dropless", dtype=jnp.bfloat16)
        return jnp.sum(y**2)

    ws = (_spec((e, d, f), jnp.bfloat16), _spec((e, d, f), jnp.bfloat16),
          _spec((e, f, d), jnp.bfloat16))  # fmt: skip
    args = (ws, _spec((t, d), jnp.bfloat16), _spec((t, k), jnp.int32),
            _spec((t, k), jnp.float32))  # fmt: skip
    flops, hlo = _compile(loss, *args)
    # 3 forward products and their 3 row gradients; 3 weight gradients
    assert len(_kernels(hlo, "gmm")) == 6 and len(_kernels(hlo, "tgmm")) == 3
    # 3 GEMMs forward and 6 backward over the t·k routed rows, 2·D·F FLOPs per row each
    ideal = 9 * 2 * t * k * d * f
    assert ideal <= flops <= 1.1 * ideal, (flops, ideal)


def test_megablox_weight_gradient_is_grouped_where_ragged_dot_is_dense():
    n, d, f, e = 4096, 512, 1024, 8

    def loss(impl):
        return lambda x, w, sizes: jnp.sum(
            grouped_matmul(x, w, sizes, impl=impl).astype(jnp.float32) ** 2
        )

    args = (_spec((n, d), jnp.bfloat16), _spec((e, d, f), jnp.bfloat16), _spec((e,), jnp.int32))
    ideal = 3 * 2 * n * d * f
    mega, mega_hlo = _compile(loss("auto"), *args)
    xla, xla_hlo = _compile(loss("xla"), *args)
    assert _kernels(mega_hlo, "tgmm") and not _kernels(mega_hlo, "ragged-dot-none")
    assert _kernels(xla_hlo, "ragged-dot-none")
    assert ideal <= mega <= 1.1 * ideal, (mega, ideal)
    # XLA: Y and dX grouped (2 of the 3 GEMMs), dW dense over all E experts
    assert xla >= (2 + e) / 3 * ideal * 0.9, (xla, ideal)


@pytest.mark.parametrize(
    "layout, mesh_shape, megablox",
    [
        ("gspmd", {"data": 2, "tensor": 2}, False),
        ("expert_parallel", {"expert": 4}, True),
        # the train mesh: expert parallelism leaves `tensor` automatic; at size 1 it splits
        # nothing, so the kernels still apply (before: ragged_dot, whose weight gradient is a
        # dense product over the whole worst-case receive buffer)
        ("expert_parallel", {"data": 1, "fsdp": 1, "tensor": 1, "expert": 4}, True),
        ("expert_parallel", {"tensor": 2, "expert": 2}, False),
    ],
)
def test_megablox_only_where_the_experts_run_unpartitioned(layout, mesh_shape, megablox):
    """Mosaic kernels cannot be partitioned by GSPMD: where an automatic mesh axis of size > 1
    remains (a (data, tensor) mesh, or `tensor` beside the expert-parallel map) the experts
    keep ragged_dot; where every axis that splits is manual they take megablox."""
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    t, d, f, e, k = 1024, 256, 512, 8, 2
    mesh = Mesh(np.array(devices).reshape(*mesh_shape.values()), tuple(mesh_shape))
    if layout == "gspmd":
        w_specs = (P(None, None, "tensor"), P(None, None, "tensor"), P(None, "tensor", None))
        tok = P("data")
    else:
        w_specs = (P("expert"),) * 3
        tok = P(tuple(a for a in mesh.axis_names if a != "tensor"))

    def loss(ws, x, experts, weights):
        routing = Routing(experts, weights, jnp.ones(experts.shape, bool))
        if layout == "gspmd":
            y = M.moe_experts(x, routing, [ws], impl="dropless", dtype=jnp.bfloat16)
        else:
            # a2a="auto", lowered for TPU from this CPU host: the ragged exchange
            y, _ = ep.expert_parallel_ffn(x, routing, weights, [ws], capacity_factor=None,
                                          dtype=jnp.bfloat16, mesh=mesh)  # fmt: skip
        return jnp.sum(y**2)

    def spec(shape, dtype, pspec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, pspec))

    shapes = ((e, d, f), (e, d, f), (e, f, d))
    ws = tuple(spec(s, jnp.bfloat16, p) for s, p in zip(shapes, w_specs, strict=True))
    args = (ws, spec((t, d), jnp.bfloat16, tok), spec((t, k), jnp.int32, tok),
            spec((t, k), jnp.float32, tok))  # fmt: skip
    with use_rules(mesh):
        _, hlo = _compile(loss, *args)
    mega = len(_kernels(hlo, "gmm")) + len(_kernels(hlo, "tgmm"))
    xla = len(_kernels(hlo, "ragged-dot-none"))
    assert (mega, xla > 0) == ((9, False) if megablox else (0, True)), (mega, xla)
    assert ("ragged-all-to-all" in hlo) == (layout == "expert_parallel")
