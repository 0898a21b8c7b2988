"""Ahead-of-time compiles of the gated linear attention kernel for TPU topologies, from this
CPU host (marker `tpu_aot`, needs libtpu): Mosaic accepts the forward and both backward
kernels, with and without document resets, at the head dims HGRN2 uses, with one and with
several V tiles."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from jaxllm import compile as aot
from kernels_pallas.gated_linear_attention import gated_linear_attention

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])"),
]

MOSAIC = "tpu_custom_call"


def _device(topology):
    return aot.topology_devices(aot.parse_topology(topology))[0]


@pytest.mark.parametrize(
    "topology,head_dim,packed,block_v",
    [
        ("v5e:2x2", 128, True, None),
        ("v5p:2x2x1", 256, False, 128),
        ("v6e:2x2", 64, True, None),
    ],
)
def test_kernel_compiles_for_tpu(topology, head_dim, packed, block_v):
    B, T, H = 2, 1000, 2

    def loss(q, g, h0, seg):
        o, hT = gated_linear_attention(q, q, q, g, initial_state=h0, return_final_state=True,
                                       segment_ids=seg, block_v=block_v)  # fmt: skip
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(hT**2)

    sharding = SingleDeviceSharding(_device(topology))

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    args = (arg((B, T, H, head_dim), jnp.bfloat16), arg((B, T, H, head_dim), jnp.float32),
            arg((B, H, head_dim, head_dim), jnp.float32),
            arg((B, T), jnp.int32) if packed else None)  # fmt: skip
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    hlo = grad.trace(*args).lower().compile().as_text()
    # forward, dq sweep, dk/dv sweep; no interpret-mode loop lowered beside them
    assert hlo.count(MOSAIC) == 3
