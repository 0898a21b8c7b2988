"""Ahead-of-time compiles of the lightning attention kernel for TPU topologies, from this CPU
host (marker `tpu_aot`, needs libtpu): Mosaic accepts the forward and both backward kernels,
and a TNL model's gradient lowered for TPU picks the kernel (impl="auto")."""

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import SingleDeviceSharding

from jaxllm import compile as aot
from jaxllm import config
from jaxllm.models.decoder import Decoder
from kernels_pallas.lightning_attention import lightning_attention, tpu

pytestmark = [
    pytest.mark.tpu_aot,
    pytest.mark.skipif(not aot.tpu_available(), reason="needs libtpu (pip install .[tpu])"),
]

MOSAIC = "tpu_custom_call"


def _device(topology):
    # Descriptions only: several compiles may share libtpu instead of failing on its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
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


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_kernel_compiles_at_the_tables_block_sizes(topology):
    """The per-chip table's (block_t, chunk), which a compile from a CPU host does not pick."""
    device = _device(topology)
    block_t, chunk = tpu.default_block_sizes(device.device_kind)
    B, H, T, K = 2, 4, 4096, 128
    kw = dict(seq_len=T - 3, block_t=block_t, block_v=K, chunk=chunk)

    def fwd_bwd(q, g, s0):
        o, sT = tpu.forward(q, q, q, g, s0, **kw)
        return o, sT, tpu.backward(q, q, q, g, s0, o, sT, **kw)

    args = (jax.ShapeDtypeStruct((B, H, T, K), jnp.bfloat16),
            jax.ShapeDtypeStruct((H,), jnp.float32),
            jax.ShapeDtypeStruct((B, H, K, K), jnp.float32))  # fmt: skip
    hlo = jax.jit(fwd_bwd).trace(*_abstract(args, device)).lower().compile().as_text()
    assert hlo.count(MOSAIC) == 3


def test_tnl_model_gradient_uses_the_kernel():
    """A TNL preset's model, differentiated and compiled for a v5e: the lightning layers lower
    to the Mosaic kernel (the unpacked path: the layer's packed-documents path, taken when the
    batch has segment ids, is the XLA form)."""
    cfg = config.load("tnl-tiny", ["model.n_layers=2", "model.dtype=bfloat16"])
    model = nnx.eval_shape(lambda: Decoder(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model)

    def loss(params, tokens_BT):
        logits = nnx.merge(graphdef, params)(tokens_BT)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)
    args = _abstract((params, tokens), _device("v5e:2x2"))
    hlo = jax.jit(jax.grad(loss)).trace(*args).lower().compile().as_text()
    assert hlo.count(MOSAIC) == 3 * cfg.model.n_layers
