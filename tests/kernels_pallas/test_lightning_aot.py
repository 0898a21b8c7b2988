"""Ahead-of-time compiles of the lightning attention kernel for TPU topologies, from this CPU
host (marker `tpu_aot`, needs libtpu): Mosaic accepts the forward and both backward kernels
(with and without document resets), the unpacked op compiles on a batch × heads sharded mesh
(its kernel in a shard_map), and a TNL preset's train step lowered for TPU picks the packed
kernel (impl="auto")."""

import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxllm import compile as aot
from jaxllm import config
from jaxllm.ops.lightning_attention import lightning_attention as op_lightning_attention
from jaxllm.parallel.core.mesh import make_mesh
from jaxllm.parallel.core.rules import use_rules
from kernels_pallas.lightning_attention import lightning_attention, tpu

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])"),
]

MOSAIC = "tpu_custom_call"


def _device(topology):
    return aot.topology_devices(aot.parse_topology(topology))[0]


def _abstract(tree, device):
    sharding = SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_compiles_for_tpu(topology, head_dim):
    B, T, H = 1, 2048, 4

    def loss(q, k, v, g, s0):
        o, sT = lightning_attention(q, k, v, g, initial_state=s0, return_final_state=True)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(sT**2)

    x = jax.ShapeDtypeStruct((B, T, H, head_dim), jnp.bfloat16)
    args = (x, x, x, jax.ShapeDtypeStruct((H,), jnp.float32),
            jax.ShapeDtypeStruct((B, H, head_dim, head_dim), jnp.float32))  # fmt: skip
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4)))
    hlo = grad.trace(*_abstract(args, _device(topology))).lower().compile().as_text()
    # forward, dq sweep, dk/dv sweep; no interpret-mode loop lowered beside them
    assert hlo.count(MOSAIC) == 3


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_kernel_compiles_at_the_tables_block_sizes(topology, packed):
    """The per-chip table's (block_t, chunk), which a compile from a CPU host does not pick;
    packed: with document runs (resets)."""
    device = _device(topology)
    block_t, chunk = tpu.default_block_sizes(device.device_kind)
    B, H, T, K = 2, 4, 4096, 128
    kw = dict(seq_len=T - 3, block_t=block_t, block_v=K, chunk=chunk)

    def fwd_bwd(q, g, s0, run):
        o, sT = tpu.forward(q, q, q, g, s0, run_BT=run, **kw)
        return o, sT, tpu.backward(q, q, q, g, s0, o, sT, run_BT=run, **kw)

    args = (jax.ShapeDtypeStruct((B, H, T, K), jnp.bfloat16),
            jax.ShapeDtypeStruct((H,), jnp.float32),
            jax.ShapeDtypeStruct((B, H, K, K), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32) if packed else None)  # fmt: skip
    hlo = jax.jit(fwd_bwd).trace(*_abstract(args, device)).lower().compile().as_text()
    assert hlo.count(MOSAIC) == 3


def test_packed_kernel_compiles_with_64_token_blocks():
    """block_t = 64 with resets, over several blocks: the row of runs is blocked as
    [B, T/64, 1, 64], since Mosaic rejects a (1, 1, 64) block of a [B, 1, T] row (64 lanes)."""
    B, T, H, K = 2, 300, 2, 64

    def loss(q, g, s0, seg):
        o, sT = lightning_attention(q, q, q, g, initial_state=s0, return_final_state=True,
                                    segment_ids=seg, block_t=64)  # fmt: skip
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(sT**2)

    args = (jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16),
            jax.ShapeDtypeStruct((H,), jnp.float32),
            jax.ShapeDtypeStruct((B, H, K, K), jnp.float32),
            jax.ShapeDtypeStruct((B, T), jnp.int32))  # fmt: skip
    grad = jax.jit(jax.grad(loss, argnums=(0, 2)))
    hlo = grad.trace(*_abstract(args, _device("v5e:2x2"))).lower().compile().as_text()
    assert hlo.count(MOSAIC) == 3


def test_unpacked_op_compiles_on_a_sharded_mesh():
    """jaxllm.ops.lightning_attention(impl="auto") with q, k, v split data × tensor (batch ×
    heads) on v5e:2x2, as a sharded model's prefill: without its shard_map, XLA fails with
    "Mosaic kernels cannot be automatically partitioned". Every Mosaic call sees one device's
    shard (B/2 rows, H/2 heads, head-major) and nothing is all-gathered."""
    mesh = make_mesh({"data": 2, "tensor": 2}, devices=aot.topology_devices(
        aot.parse_topology("v5e:2x2")))  # fmt: skip
    B, T, H, K = 4, 1024, 4, 128

    def loss(q, k, v, g, s0):
        o, sT = op_lightning_attention(q, k, v, g, initial_state=s0, return_final_state=True)
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(sT**2)

    def spec(shape, dtype, pspec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, pspec))

    x = spec((B, T, H, K), jnp.bfloat16, P("data", None, "tensor"))
    args = (x, x, x, spec((H,), jnp.float32, P("tensor")),
            spec((B, H, K, K), jnp.float32, P("data", "tensor")))  # fmt: skip
    with use_rules(mesh):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 4)))
        hlo = grad.trace(*args).lower().compile().as_text()
    calls = [line for line in hlo.splitlines() if MOSAIC in line]
    assert len(calls) == 3
    local = f"bf16[{B // 2},{H // 2},{T},{K}]"
    for call in calls:
        shapes = re.findall(r"bf16\[[\d,]*\]", call)
        assert local in shapes and f"bf16[{B},{H},{T},{K}]" not in shapes, shapes
    assert "all-gather" not in hlo


def test_tnl_train_step_uses_the_packed_kernel():
    """A TNL preset's real train step (its batches carry segment_ids: packed documents),
    compiled for a v5e:2x2 data-parallel mesh: every lightning layer lowers to the Mosaic
    kernel with document resets (forward, dq sweep, dk/dv sweep; the int32 runs among the
    operands), each inside a shard_map."""
    cfg = config.load("tnl-tiny", ["model.n_layers=2"])
    lowered, mesh = aot.lower_train_step(cfg, aot.parse_topology("v5e:2x2"))
    assert mesh.shape["data"] == 4
    calls = [line for line in lowered.compile().as_text().splitlines() if MOSAIC in line]
    assert len(calls) == 3 * cfg.model.n_layers
    assert all("s32[" in line for line in calls)


@pytest.mark.parametrize("mesh", [("data=2", "fsdp=2"), ("data=4", "fsdp=1")])
def test_tnl_train_step_with_the_fp8_allreduce_nests_the_kernel(mesh):
    """The same step with FP8 training: the gradients are reduced by the FP8 all-reduce, in
    whose per-replica shard_map (manual over `data`) every lightning layer's kernel runs in a
    nested one over the other axes — the Mosaic calls see one device's rows. With data 4 that
    map splits nothing, but jax refuses a Mosaic call in a partly manual context."""
    from jaxllm.training.state import uses_fp8_allreduce

    cfg = config.load("tnl-tiny", ["model.n_layers=2", "precision.fp8=current",
                                   *(f"parallel.mesh.{m}" for m in mesh)])  # fmt: skip
    lowered, mesh = aot.lower_train_step(cfg, aot.parse_topology("v5e:2x2"))
    assert uses_fp8_allreduce(cfg, mesh)
    hlo = lowered.compile().as_text()
    calls = [line for line in hlo.splitlines() if MOSAIC in line]
    assert len(calls) == 3 * cfg.model.n_layers
    rows = cfg.data.batch_size // 4  # of 16: 8 a replica, 4 a device
    for line in calls:
        firsts = {int(n) for n in re.findall(r"(?:bf16|f32)\[(\d+),\d+,\d+,\d+\]", line)}
        assert firsts == {rows}, line
    # the FP8 gradient payload
    assert any("all-to-all" in line and "u8[" in line for line in hlo.splitlines())
